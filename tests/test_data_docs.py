"""Documents -> text -> instructions, `llmtech data convert`, and lab L1.02 end to end."""

import json

import pytest

from conftest import ROOT, run_cli, run_script
from llmtech import data
from llmtech.data.docs import (ConvertConfig, document_to_instructions, documents_to_instructions,
                               first_sentence, load_document, load_documents, split_sections, trim_text)
from llmtech.errors import DataError

DOCS = ROOT / "data" / "samples" / "docs"
KB = ROOT / "data" / "support" / "kb"
LAB = ROOT / "lessons" / "lesson1" / "02_data_preprocess" / "data_pipeline.py"


def headings(doc):
    return [s.heading for s in doc.sections]


# --------------------------------------------------------------------------- loaders

def test_html_strips_scripts_and_chrome_keeps_headings():
    doc = load_document(DOCS / "h1_speaker_guide.html")
    assert doc.kind == "html" and doc.title == "智能音箱 H1 使用指南"
    assert headings(doc) == ["智能音箱 H1 使用指南", "唤醒与对话", "首次配网", "隐私与麦克风", "音箱没有反应怎么办？"]
    for junk in ("dataLayer", "font-family", "首页", "版权所有", "track("):
        assert junk not in doc.text
    assert "## 唤醒与对话" in doc.text and "### 音箱没有反应怎么办？" in doc.text
    assert "- 确认手机连接的是 2.4 GHz Wi-Fi，H1 不支持 5 GHz 网络。" in doc.text
    assert "唤醒后顶部灯环亮起，这时直接说出指令" in doc.text  # source line break inside <p> joined


def test_html_comments_dropped_pre_kept(tmp_path):
    p = tmp_path / "page.htm"
    p.write_text("<html><body><!-- internal note --><h1>Guide</h1><h2>Code</h2>Run this:"
                 "<pre>def f():\n    return 1</pre><p>Done.</p></body></html>", encoding="utf-8")
    doc = load_document(p)
    assert "internal note" not in doc.text and doc.title == "Guide"
    assert doc.sections[0].text == "Run this:\n\n```\ndef f():\n    return 1\n```\n\nDone."


def test_gbk_text_file_decodes_with_headings():
    path = DOCS / "a2_filter_care.txt"
    raw = path.read_bytes()
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")  # really GBK on disk
    doc = load_document(path)
    assert doc.encoding == "gb18030" and doc.title == "空气净化器 A2 滤芯保养说明"
    assert headings(doc) == ["一、更换周期", "二、如何更换滤芯", "三、日常清洁", "四、购买滤芯"]
    assert "替换滤芯售价 199 元" in doc.text


def test_docx_headings_lists_and_tables():
    doc = load_document(DOCS / "s1_quick_start.docx")
    assert doc.title == "扫地机器人 S1 快速入门"
    assert headings(doc) == ["开箱与充电", "连接「云杉家」App", "指示灯含义", "扫拖一体使用建议"]
    table = next(s for s in doc.sections if s.heading == "指示灯含义").text
    assert "红灯闪烁 | 故障，请在 App 中查看故障代码" in table
    lst = next(s for s in doc.sections if s.heading == "连接「云杉家」App").text
    assert lst.count("\n- ") == 2 and lst.startswith("- 确认手机")


def test_pdf_text_and_numbered_headings():
    doc = load_document(DOCS / "c5_camera_faq.pdf")
    assert doc.kind == "pdf" and doc.title == "C5 Wi-Fi Camera FAQ" and doc.lang == "en"
    assert headings(doc) == ["1. Storage options", "2. Night vision", "3. Camera offline", "4. Sharing with family"]
    # wrapped PDF lines are joined back into one paragraph
    assert "You can also subscribe to the cloud plan for 9.9 yuan" in doc.text


def test_markdown_kb_documents():
    docs = load_documents(KB, relative_to=ROOT)
    assert len(docs) >= 20 and all(d.source.startswith("data/support/kb/") for d in docs)
    langs = {d.lang for d in docs}
    assert langs == {"zh", "en"}
    assert all(d.title and d.sections for d in docs)


@pytest.mark.parametrize("name, content, message", [
    ("notes.xlsx", b"PK\x03\x04", "unsupported document type '.xlsx'"),
    ("broken.pdf", b"%PDF-1.4 this is not really a pdf", "cannot read pdf document"),
    ("broken.docx", b"not a zip file", "cannot read docx document"),
    ("empty.txt", b"   \n\n", "no extractable text"),
])
def test_bad_documents_raise_dataerror_naming_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        load_document(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_missing_file_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_document(tmp_path / "nope.md")
    with pytest.raises(DataError, match="no documents found"):
        load_documents(tmp_path)


# --------------------------------------------------------------------------- sections + instructions

def test_split_sections_without_headings_and_code_fences():
    text = "第一段。\n\n第二段。\n\n" + "长" * 50
    secs = split_sections(text, max_chars=20)
    assert [s.heading for s in secs] == ["", ""] and secs[0].text == "第一段。\n\n第二段。"
    assert secs[1].text == "长" * 50  # a paragraph is never split
    md = "# T\n\nintro\n\n## A\n\n```bash\n# not a heading\necho hi\n```\n\n## B\n\nbody"
    assert [(s.heading, s.level) for s in split_sections(md)] == [("T", 1), ("A", 2), ("B", 2)]
    assert "# not a heading" in split_sections(md)[1].text


def test_first_sentence_and_trim():
    assert first_sentence("- 连续输错 5 次，键盘会锁定。随后 App 通知。") == "连续输错 5 次，键盘会锁定。"
    assert first_sentence("Check the router. Then unplug it.") == "Check the router."
    text = "第一句话。第二句话比较长一些。第三句。"
    assert trim_text(text, 12) == "第一句话。"
    assert trim_text(text, 100) == text


def test_document_to_instructions_fields_and_templates():
    doc = load_document(KB / "returns_zh.md", relative_to=ROOT)
    recs = document_to_instructions(doc)
    assert len(recs) == len([s for s in doc.sections if len(s.text) >= 15])
    first = recs[0]
    assert first["instruction"] == f"请介绍《{doc.title}》中「{doc.sections[0].heading}」的内容。"
    assert first["output"] == doc.sections[0].text
    assert first["source"] == f"data/support/kb/returns_zh.md#{doc.sections[0].heading}"
    assert recs[1]["instruction"].endswith("有哪些要点？")  # templates rotate
    # every record is valid alpaca data
    for r in recs:
        data.formats.normalise(r["source"], r, "alpaca")
    en = document_to_instructions(load_document(DOCS / "c5_camera_faq.pdf"))
    assert en[0]["instruction"] == 'What does "C5 Wi-Fi Camera FAQ" say about 1. Storage options?'
    forced = document_to_instructions(load_document(DOCS / "c5_camera_faq.pdf"), lang="zh")
    assert forced[0]["instruction"].startswith("请介绍《C5 Wi-Fi Camera FAQ》")


def test_untitled_text_uses_first_sentence_and_max_length(tmp_path):
    p = tmp_path / "note.txt"
    p.write_text("这是一段没有标题的说明文字，用来测试。" + "后面还有很多内容。" * 30, encoding="utf-8")
    recs = document_to_instructions(load_document(p), max_output_chars=60)
    assert recs[0]["instruction"] == "请围绕下面这句话展开说明：这是一段没有标题的说明文字，用来测试。"
    assert len(recs[0]["output"]) <= 60 and recs[0]["output"].endswith("。")


def test_conversion_is_deterministic():
    a = documents_to_instructions(load_documents(DOCS, relative_to=ROOT), ConvertConfig())
    b = documents_to_instructions(load_documents(DOCS, relative_to=ROOT), ConvertConfig())
    assert a == b and len(a) == 17


# --------------------------------------------------------------------------- CLI + lab

def test_cli_data_convert(tmp_path):
    out = tmp_path / "docs.jsonl"
    r = run_cli("data", "convert", DOCS, out, "--lang", "zh", timeout=120)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary == {"documents": 4, "sections": 17, "records": 17, "out": str(out)}
    recs = data.load(out)
    assert len(recs) == 17 and all(r["instruction"][0] in "请《" for r in recs)
    r = run_cli("data", "convert", DOCS, out, "--lang", "fr", timeout=120)
    assert r.returncode == 2 and "config key 'lang'" in r.stderr and "Traceback" not in r.stderr


def test_lab_l1_02_quick(tmp_path):
    r = run_script(LAB, "--quick", "--out", tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert m["lab"] == "L1.02" and m["quick"] is True
    assert m["documents"] == 28 - 24 + len(list(KB.glob("*.md")))
    assert m["instructions_from_docs"] >= 140
    assert m["dirty_records"] == 42
    assert m["records_in"] == m["instructions_from_docs"] + 42
    # what was planted in data/samples/dirty_instructions.jsonl is what the pipeline removes
    assert m["removed_exact_dup"] >= 4 and m["removed_near_dup"] >= 4
    assert m["pii_masked"] >= 15 and m["removed_length"] == 6 and m["removed_language"] == 4
    assert m["records_out"] == m["records_in"] - m["removed_length"] - m["removed_language"] \
        - m["removed_exact_dup"] - m["removed_near_dup"]
    if not m["public_skipped"]:
        assert m["public_records_in"] == 1000 and m["public_removed_exact_dup"] == 8
        assert m["public_records_out"] < m["public_records_in"]
    assert len(data.load(tmp_path / "clean.jsonl")) == m["records_out"]
    assert (tmp_path / "quality_report.png").stat().st_size > 5000
    assert "质量报告" in (tmp_path / "report.md").read_text(encoding="utf-8")
