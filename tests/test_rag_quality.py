"""Chunk quality monitor: every issue on crafted chunks, no false alarms on the clean sample data."""

import pytest

from conftest import ROOT, SUPPORT
from llmtech.rag.chunking import ChunkConfig, chunk_text
from llmtech.rag.loaders import load_file, scan
from llmtech.rag.quality import (ISSUES, QualityConfig, check_chunks, filter_chunks,
                                 mojibake_spans)
from llmtech.rag.types import Passage

GBK_FILE = ROOT / "data/samples/docs/a2_filter_care.txt"
ZH = "云杉扫地机器人 S1 的保修期是 24 个月，电池保修 12 个月。购买后 7 天内可无理由退货。"


def issues_of(text, cfg=None):
    report = check_chunks([("c#0", text)], cfg)
    return set(report.by_chunk.get("c#0", []))


def test_real_gbk_file_read_as_latin1_is_mojibake():
    raw = GBK_FILE.read_bytes()
    assert raw.decode("gb18030").startswith("空气净化器 A2")  # the file really is GBK
    garbled = raw.decode("latin-1")                           # what a careless reader sees
    spans = mojibake_spans(garbled)
    assert spans and {k for k, _, _ in spans} == {"gbk_as_latin1"}
    assert ("gbk_as_latin1", "¿ÕÆø¾»»¯Æ÷", "空气净化器") in spans
    report = check_chunks([("a2#0", garbled)])
    assert report.counts["mojibake"] == 1
    assert "空气净化器" in report.examples("mojibake")[0].detail  # the finding shows the repair


@pytest.mark.parametrize("garbled,kind", [
    (ZH.encode("utf-8").decode("gbk", errors="replace"), "utf8_as_gbk"),    # 浣犲ソ...
    (ZH.encode("utf-8").decode("latin-1"), "utf8_as_latin1"),               # ä½ å¥½...
    ("Caf\u00c3\u00a9 au lait, na\u00c3\u00afve", "utf8_as_latin1"),        # cafÃ©
    ("It\u00e2\u20ac\u2122s broken", "utf8_as_latin1"),                     # â€™ (cp1252)
    ("锟斤拷锟斤拷 读取失败", "marker"),
    ("烫烫烫烫烫烫", "marker"),
    ("保修期是 24 个\ufffd月", "replacement_char"),                          # one U+FFFD is enough
])
def test_mojibake_patterns(garbled, kind):
    assert kind in {k for k, _, _ in mojibake_spans(garbled)}
    assert "mojibake" in issues_of(garbled + " padding text to be long enough")


def test_mojibake_survives_the_document_loader(tmp_path):
    # load_document applies NFKC and drops C1 controls, which breaks the byte round trip
    zh = (SUPPORT / "kb/returns_zh.md").read_text(encoding="utf-8")
    (tmp_path / "latin1.md").write_text(zh.encode("utf-8").decode("latin-1"), encoding="utf-8")
    (tmp_path / "gbk_latin1.txt").write_text(GBK_FILE.read_bytes().decode("latin-1"),
                                             encoding="utf-8")
    for name in ("latin1.md", "gbk_latin1.txt"):
        doc = load_file(tmp_path / name, tmp_path)
        chunks = chunk_text(doc.source, doc.text, ChunkConfig(strategy="recursive", size=200))
        report = check_chunks(chunks)
        assert report.counts["mojibake"] == len(chunks) > 1, name


@pytest.mark.parametrize("text", [
    "Café déjà vu: the naïve Müller said Grüße and mäßig, Ærøskøbing is in Denmark.",
    "It’s a “quoted” word — with an en dash – and an ellipsis… ©2024 Yunshan®, 25 °C, ±5 %",
    ZH, "「云杉家」App → 设备 → 固件升级（约 3 分钟）。",
])
def test_no_false_alarm_on_real_text(text):
    assert mojibake_spans(text) == []
    assert not issues_of(text) & {"mojibake", "control_chars", "empty"}


def test_clean_sample_data_has_no_garbling_or_duplicates():
    docs, skipped = scan(SUPPORT / "kb")
    more, skipped2 = scan(ROOT / "data/samples/docs")
    assert not skipped and not skipped2 and len(more) == 4
    chunks = [c for d in docs + more
              for c in chunk_text(d.source, d.text, ChunkConfig(strategy="sentences", size=300))]
    report = check_chunks(chunks)
    bad = {k: v for k, v in report.counts.items()
           if k in ("mojibake", "control_chars", "exact_dup", "near_dup", "empty", "mixed_lang") and v}
    assert bad == {}, report.rows(3)
    assert report.lang_counts["zh"] > 50 and report.lang_counts["en"] > 50
    assert report.bad_ids() == set()


def test_empty_short_long_and_thresholds():
    cfg = QualityConfig(min_chars=10, max_chars=50)
    assert issues_of("   \n\t ", cfg) == {"empty"}
    assert issues_of("---", cfg) == {"empty"}          # a Markdown rule carries nothing
    assert issues_of("退货政策", cfg) == {"too_short"}
    assert issues_of("x" * 51, cfg) == {"too_long"}
    assert issues_of("x" * 50, cfg) == set()
    assert issues_of("退货政策", QualityConfig(min_chars=4)) == set()


def test_exact_and_near_duplicates_keep_the_first():
    base = ("The S1 robot vacuum has a 24-month warranty; the battery is covered for 12 months. "
            "Keep your invoice: it is the proof of purchase for every repair.")
    chunks = [
        {"id": "a#0", "doc_id": "a", "text": base},
        {"id": "b#0", "doc_id": "b", "text": "  " + base.upper().replace(";", ",") + "\n"},
        {"id": "c#0", "doc_id": "c", "text": base.replace("24-month", "two-year")},
        {"id": "d#0", "doc_id": "d", "text": "Completely different text about shipping times."},
        {"id": "e#0", "doc_id": "e", "text": "Short."},
    ]
    kept, report = filter_chunks(chunks)
    assert report.by_chunk["b#0"] == ["exact_dup"]
    assert report.by_chunk["c#0"] == ["near_dup"]
    assert "a#0" in report.examples("exact_dup")[0].detail
    assert "a#0" in report.examples("near_dup")[0].detail
    assert [c["id"] for c in kept] == ["a#0", "d#0", "e#0"]  # too_short only warns
    assert report.by_chunk["e#0"] == ["too_short"]
    off = check_chunks(chunks, QualityConfig(exact_dup=False, near_dup=False))
    assert off.counts["exact_dup"] == off.counts["near_dup"] == 0


def test_control_and_private_use_characters():
    junk = "Page 3 \ue000\ue001\ue002 battery \x00\x01 status " + "\uf8ff" * 3
    assert "control_chars" in issues_of(junk)
    assert "control_chars" not in issues_of("tab\tand\nnewline\r\nare fine in normal text")
    one = "A long and healthy paragraph about the warranty terms and conditions. " * 3 + "\ue000"
    assert "control_chars" not in issues_of(one)          # one stray char in 200: below 1 %


def test_language_mix_and_expected_languages():
    mixed = ("退货期限是签收后七天内，商品需要保持完好。"
             + "Returns are accepted within seven days of delivery if the item is intact.")
    assert "mixed_lang" in issues_of(mixed)
    assert "mixed_lang" not in issues_of("请在「云杉家」App 中打开 Wi-Fi 设置，然后重启 S1 扫地机器人。")
    ja = "これは日本語の文章です。保証期間は二年間です。"
    assert "unexpected_lang" in issues_of(ja, QualityConfig(expected_langs=["zh", "en"]))
    assert "unexpected_lang" not in issues_of(ja)


def test_report_shapes_and_input_kinds():
    passage = Passage("p#0", "p", "云杉扫地机器人 S1 的保修期是 24 个月，电池保修 12 个月。")
    chunk = chunk_text("k.md", "Hello world. " * 5, ChunkConfig(size=100))[0]
    report = check_chunks([passage, chunk, ("t#0", ""), {"id": "d#0", "text": "ok"}],
                          QualityConfig(near_dup=False))
    assert report.n_chunks == 4 and set(report.counts) == set(ISSUES)
    assert report.counts["empty"] == 1 and report.counts["too_short"] == 1
    s = report.summary()
    assert s["chunks"] == 4 and s["flagged"] == 2 and s["skipped"] == 1
    assert all(isinstance(v, (int, float)) for v in s.values())
    rows = report.rows()
    assert {r["issue"] for r in rows} == {"empty", "too_short"}
    assert {r["action"] for r in rows} == {"skip", "warn"}
    assert report.examples("empty")[0].chunk_id == "t#0"
