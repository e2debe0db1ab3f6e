"""Cleaning rules, PII masking, dedup, templates and `llmtech data clean`."""

import json

import pytest

from conftest import ROOT, run_cli, shared_or_skip
from llmtech import data
from llmtech.data import templates
from llmtech.data.clean import (CleanConfig, cjk_ratio, clean_records, detect_lang, id_check_digit,
                                luhn_valid, mask_pii, normalize_text, valid_cn_id)
from llmtech.data.dedup import (CleanDedupConfig, DedupConfig, canonical_text, clean_and_dedup,
                                dedup_records, exact_dedup, jaccard, near_dedup)
from llmtech.errors import DataError

DIRTY = ROOT / "data" / "samples" / "dirty_instructions.jsonl"
# The settings lab L1.02 uses on the dirty sample (bilingual customer-service data).
LAB_CLEAN = CleanDedupConfig(lang="zh+en", lang_match=True, min_chars=5, max_chars=1000,
                             pii_allow=["@spruce-home.example"])


def rec(instruction, output, **kw):
    return {"instruction": instruction, "input": "", "output": output, "history": [], **kw}


# --------------------------------------------------------------------------- normalisation

@pytest.mark.parametrize("raw, expected", [
    ("ＡＢＣ１２３", "ABC123"),                                   # full-width letters/digits
    ("你 好 世界", "你好世界"),                                    # spaces between Chinese removed
    ("a\u200bb\ufeffc", "abc"),                                  # zero-width characters
    ("x\x00y\x07z", "xyz"),                                      # control characters
    ("line1\r\nline2\r\n\r\n\r\n\r\nline3  ", "line1\nline2\n\nline3"),
    ("价格为100元,包邮!", "价格为100元，包邮！"),                     # ASCII punctuation in Chinese
    ("售价 ¥399，可以", "售价 ¥399，可以"),                           # Chinese punctuation kept
    ("Hello，world！", "Hello, world!"),                          # full-width in an English line
    ("f(x) = 1,000 at 9:00", "f(x) = 1,000 at 9:00"),            # code/numbers untouched
    ("Python(编程语言)", "Python（编程语言）"),
    ("云杉设备.", "云杉设备。"),
    ("他说……好吧", "他说……好吧"),                                 # NFKC would give "......"
    ("400 m³/h，适用 28–48 m²", "400 m³/h，适用 28–48 m²"),       # NFKC would give m3 / m2
    ("a  \t b", "a b"),
])
def test_normalize_text(raw, expected):
    assert normalize_text(raw) == expected


def test_normalize_keeps_code_indentation():
    code = "def f():\n    if x:\n        return 1"
    assert normalize_text(code) == code


# --------------------------------------------------------------------------- language

@pytest.mark.parametrize("text, lang", [
    ("智能门锁连续输错 5 次会锁定 3 分钟。", "zh"),
    ("在 App 中进入「我的订单 → 申请售后」", "zh"),                # a few English words are fine
    ("Up to 150 minutes on a full charge.", "en"),
    ('You can say "Hey Spruce" or "你好云杉" to wake it.', "en"),
    ("これは日本語の文章です。", "other"),                        # kana -> not Chinese
    ("Позвоните нам завтра", "other"),
    ("12345 + 678 = 13023", "unknown"),
    ("写一个排序函数。\n```python\ndef sort_list(items):\n    return sorted(items)\n```", "zh"),
])
def test_detect_lang(text, lang):
    assert detect_lang(text) == lang


def test_cjk_ratio_counts_characters_against_words():
    assert cjk_ratio("你好 world") == pytest.approx(2 / 3)
    assert cjk_ratio("!!! 123") is None


# --------------------------------------------------------------------------- PII

def test_id_and_luhn_checks():
    assert id_check_digit("11010519491231002") == "X"
    assert valid_cn_id("11010519491231002X") and valid_cn_id("11010519491231002x")
    assert not valid_cn_id("110105194912310021")   # wrong check digit
    assert not valid_cn_id("110105194913310023")   # month 13
    assert luhn_valid("4111111111111111") and luhn_valid("6228480012345678903")
    assert not luhn_valid("4111111111111112")


@pytest.mark.parametrize("text, masked, kind", [
    ("电话13912345678请回电", "电话[PHONE]请回电", "phone"),
    ("call +86 138 0013 8000 now", "call [PHONE] now", "phone"),
    ("座机 010-62345678 或 (0755)23456789", "座机 [PHONE] 或 [PHONE]", "phone"),
    ("mail li.na+x@example.org.", "mail [EMAIL].", "email"),
    ("身份证 11010519491231002X。", "身份证 [ID]。", "id"),
    ("卡号 6228 4800 1234 5678 903 谢谢", "卡号 [CARD] 谢谢", "card"),
    ("card 4111-1111-1111-1111", "card [CARD]", "card"),
    ("来自 58.32.14.201 的登录", "来自 [IP] 的登录", "ip"),
])
def test_mask_pii_positive(text, masked, kind):
    out, counts = mask_pii(text)
    assert out == masked
    assert counts[kind] == masked.count("[")


@pytest.mark.parametrize("text", [
    "身份证 110105194912310021",           # bad check digit: not an ID
    "订单号 2024112912345678",              # 16 digits failing Luhn: an order number, not a card
    "客服热线 400-820-7316",                 # company service number
    "路由器地址 192.168.1.1",                 # private address
    "编号 13912345678901",                   # 14 digits: not a phone number
    "版本 1.2.3 发布",
])
def test_mask_pii_leaves_non_pii_alone(text):
    out, counts = mask_pii(text)
    assert out == text and sum(counts.values()) == 0


def test_mask_pii_allow_list_and_kinds():
    text = "support@spruce-home.example 或 zhang@example.com，电话 13912345678"
    out, counts = mask_pii(text, allow=["@spruce-home.example"])
    assert out == "support@spruce-home.example 或 [EMAIL]，电话 [PHONE]"
    out, counts = mask_pii(text, kinds=["phone"])
    assert "zhang@example.com" in out and counts == {"phone": 1}
    with pytest.raises(DataError, match="unknown PII kind"):
        mask_pii(text, kinds=["passport"])


# --------------------------------------------------------------------------- clean_records

def test_clean_records_counts_each_rule():
    records = [
        rec("门锁输错密码会怎样？", "连续输错 5 次，键盘会锁定 3 分钟。"),     # kept
        rec("Ｃ５ 的夜视距离？", "约 10 米,自动开启"),                      # normalised
        rec("我的电话是 13912345678", "好的，我们会致电 13912345678。"),     # 2 phones
        rec("可以开发票吗？", "可以"),                                     # too short
        rec("退货条件？", "很长" * 600),                                   # too long
        rec("返品はできますか？", "はい、7日以内であれば返品できます。"),      # language
        rec("尘盒有多大？", "The dustbin holds 450 ml of dust."),            # mismatch
    ]
    trace = []
    kept, report = clean_records(records, CleanConfig(min_chars=5, max_chars=1000, lang="zh+en",
                                                      lang_match=True), trace=trace)
    assert [r["instruction"] for r in kept] == ["门锁输错密码会怎样？", "C5 的夜视距离？", "我的电话是 [PHONE]"]
    assert kept[1]["output"] == "约 10 米，自动开启"
    assert kept[2]["output"] == "好的，我们会致电 [PHONE]。"
    assert report["records_in"] == 7 and report["records_out"] == 3
    assert report["normalized"] == 1      # only the C5 record has something to normalise
    assert report["pii_phone"] == 2 and report["pii_masked"] == 2 and report["pii_records"] == 1
    assert (report["removed_too_short"], report["removed_too_long"]) == (1, 1)
    assert (report["removed_language"], report["removed_lang_mismatch"]) == (1, 1)
    assert trace == [(3, "removed_too_short"), (4, "removed_too_long"), (5, "removed_language"),
                     (6, "removed_lang_mismatch")]
    assert records[2]["output"] == "好的，我们会致电 13912345678。"  # input not mutated


def test_clean_records_language_filter_zh_en():
    records = [rec("你好吗？", "我很好，谢谢。"), rec("How are you?", "Fine, thanks.")]
    assert len(clean_records(records, CleanConfig(lang="zh"))[0]) == 1
    assert clean_records(records, CleanConfig(lang="en"))[0][0]["instruction"] == "How are you?"
    assert len(clean_records(records, CleanConfig(lang="any"))[0]) == 2


def test_clean_records_sharegpt_and_preference():
    chat = {"messages": [{"role": "user", "content": "我的邮箱是 a.b@example.com\u3000"},
                         {"role": "assistant", "content": "收到，已记录。"}]}
    kept, report = clean_records([chat], CleanConfig(min_chars=3))
    assert kept[0]["messages"][0]["content"] == "我的邮箱是 [EMAIL]"
    assert report["pii_email"] == 1 and report["normalized"] == 1
    short = {"messages": [{"role": "user", "content": "在吗"}, {"role": "assistant", "content": "在"}]}
    assert clean_records([short], CleanConfig(min_chars=2))[1]["removed_too_short"] == 1
    pref = {"prompt": "电话 13912345678 能改吗？", "chosen": "可以在 App 中修改。", "rejected": "不行"}
    kept, report = clean_records([pref], CleanConfig(min_chars=3))
    assert kept[0]["prompt"] == "电话 [PHONE] 能改吗？" and report["records_out"] == 1


# --------------------------------------------------------------------------- dedup

def test_exact_dedup_uses_normalised_text():
    records = [rec("Hello, world!", "Hi there."), rec("hello   WORLD", "hi there"),
               rec("你好，世界", "你好。"), rec("你好 世界！", "你好"), rec("Other", "text")]
    kept, pairs = exact_dedup(records)
    assert pairs == [(1, 0), (3, 2)] and len(kept) == 3
    assert canonical_text("Ｈｅｌｌｏ, World!") == "helloworld"


def test_near_dedup_chinese_and_threshold():
    base = "仓库收到退货并检验合格后，3 个工作日内发起退款。退款原路返回，到账时间视银行或支付渠道为 1–7 个工作日。"
    records = [rec("退款多久能到账？", base),
               rec("请问退款多久能到账？", base),                                  # near dup of 0
               rec("退款多久能到账？", base.replace("发起退款", "安排退款")),        # near dup of 0
               rec("门锁怎样恢复出厂设置？", "打开室内面板电池盖，长按 Reset 键 6 秒。")]
    sim = jaccard(records[0]["instruction"] + base, records[1]["instruction"] + base)
    assert 0.8 < sim < 1.0
    kept, pairs = near_dedup(records, threshold=0.8)
    assert pairs == [(1, 0), (2, 0)] and len(kept) == 2
    sims = [jaccard(data.clean.record_text(records[i]), data.clean.record_text(records[0]))
            for i in (1, 2)]
    assert 0.95 < sims[0] < 0.97 and 0.8 < sims[1] < 0.9
    # the threshold decides; a loose one still leaves the unrelated record alone
    assert near_dedup(records, threshold=0.97)[1] == []
    assert near_dedup(records, threshold=0.9)[1] == [(1, 0)]
    assert near_dedup(records, threshold=0.5)[1] == [(1, 0), (2, 0)]


def test_near_dedup_is_deterministic_and_confirms_exactly():
    records = data.load(DIRTY)
    runs = [near_dedup(records, threshold=0.8, seed=s)[1] for s in (1, 1, 7)]
    assert runs[0] == runs[1] == runs[2]  # exact Jaccard confirmation -> same pairs for any seed
    for i, j in runs[0]:
        assert j < i
        assert jaccard(data.clean.record_text(records[i]), data.clean.record_text(records[j])) >= 0.8


def test_dedup_records_indices_refer_to_input():
    records = [rec("A question here", "answer one two three"), rec("Different", "words entirely"),
               rec("A question here", "answer one two three"),
               rec("A question here!", "answer one two three four")]
    kept, exact, near = dedup_records(records, DedupConfig(near_threshold=0.7))
    assert exact == [(2, 0)] and near == [(3, 0)] and len(kept) == 2


def test_dirty_sample_planted_defects_are_all_found():
    """data/samples/dirty_instructions.jsonl: what was planted is what the rules find."""
    records = data.load(DIRTY)
    assert len(records) == 42
    trace = []
    kept, report = clean_and_dedup(records, LAB_CLEAN, trace=trace)
    assert report["removed_exact_dup"] == 4      # 1 identical, 2 after normalisation, 1 after masking
    assert report["removed_near_dup"] == 4
    assert (report["pii_phone"], report["pii_email"], report["pii_id"], report["pii_card"],
            report["pii_ip"]) == (8, 3, 2, 1, 1)
    assert report["removed_too_short"] == 4 and report["removed_too_long"] == 2
    assert report["removed_language"] == 2 and report["removed_lang_mismatch"] == 2
    assert report["records_out"] == len(kept) == 24
    assert dict((i, j) for i, rule, j in trace if rule == "removed_exact_dup") == {2: 0, 3: 1, 5: 4, 28: 27}
    assert dict((i, j) for i, rule, j in trace if rule == "removed_near_dup") == {7: 6, 9: 8, 11: 10, 14: 13}
    text = "\n".join(data.clean.record_text(r) for r in kept)
    for secret in ("13912345678", "zhangwei1988@", "11010519491231002X", "6228 4800", "58.32.14.201"):
        assert secret not in text
    assert "2024112912345678" in text and "support@spruce-home.example" in text and "400-820-7316" in text


def test_public_alpaca_zh_demo_duplicates_are_real():
    path = shared_or_skip("llamafactory_sft/alpaca_zh_demo.json")
    records = data.load(path)
    kept, exact, near = dedup_records(records)
    assert len(exact) == 8 and len(kept) == len(records) - len(exact) - len(near)
    for i, j in exact:
        assert canonical_text(data.clean.record_text(records[i])) == canonical_text(
            data.clean.record_text(records[j]))
    _, report = clean_and_dedup(records, CleanDedupConfig(lang="zh"))
    assert 5 <= report["removed_language"] <= 40  # Chinese instructions answered in English


# --------------------------------------------------------------------------- templates

def test_templates_render_and_errors():
    out = templates.render("qa-from-passage", "zh", question="退款多久到账？", passage="3 个工作日内。")
    assert out == {"instruction": "根据给定资料回答问题：退款多久到账？", "input": "3 个工作日内。"}
    assert templates.render("summarise", "en", passage="{not a field}")["input"] == "{not a field}"
    with pytest.raises(DataError, match=r"template 'qa-from-passage/en'.*placeholder 'passage'"):
        templates.render("qa-from-passage", "en", question="q")
    with pytest.raises(DataError, match="unknown template 'nope'"):
        templates.render("nope", "zh")
    with pytest.raises(DataError, match="plain name"):
        templates.register("bad", "zh", "{x.__class__}")
    assert {"qa-from-passage", "summarise", "extract-key-facts", "section-explain"} <= set(templates.names("zh"))
    assert set(templates.names("zh")) == set(templates.names("en"))


def test_alpaca_text():
    r = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
    text = templates.alpaca_text(r)
    assert text.startswith("Below is an instruction that describes a task, paired with an input")
    assert "### Instruction:\nTranslate to French.\n\n### Input:\nGood morning\n\n### Response:\nBonjour" in text
    zh = templates.alpaca_text({"instruction": "你好", "output": "你好！"}, "alpaca-zh", with_response=False)
    assert zh.endswith("### 指令：\n你好\n\n### 回答：\n") and "输入" not in zh
    with pytest.raises(DataError, match="unknown Alpaca template"):
        templates.alpaca_text(r, "vicuna")


# --------------------------------------------------------------------------- CLI

def test_cli_data_clean(tmp_path):
    out = tmp_path / "clean.jsonl"
    r = run_cli("data", "clean", DIRTY, out, "lang=zh+en", "lang_match=true", "min_chars=5",
                "max_chars=1000", "pii_allow=['@spruce-home.example']", timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["records_out"] == 24 and report["removed_exact_dup"] == 4
    assert len(data.load(out)) == 24


def test_cli_data_clean_errors_keep_existing_output(tmp_path):
    out = tmp_path / "clean.jsonl"
    out.write_text("precious\n", encoding="utf-8")
    r = run_cli("data", "clean", DIRTY, out, "min_char=5", timeout=120)
    assert r.returncode == 2 and "unknown config key 'min_char'" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{oops\n', encoding="utf-8")
    r = run_cli("data", "clean", bad, out, timeout=120)
    assert r.returncode == 2 and f"{bad}:2" in r.stderr and "Traceback" not in r.stderr
    assert out.read_text(encoding="utf-8") == "precious\n"
