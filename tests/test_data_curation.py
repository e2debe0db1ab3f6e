"""Alignment-data audit and cleaning (llmtech.data.curation), the sample preference/KTO files,
and lab L4.06 in quick mode."""

import collections
import json

import pytest
from pydantic import ValidationError

from conftest import ROOT, SHARED, SUPPORT, run_script
from llmtech.config import load_config
from llmtech.data import curation
from llmtech.data.clean import id_check_digit
from llmtech.data.curation import (CATEGORIES, CurationConfig, EvalIndex, EvalText, audit, curate,
                                   load_eval_texts, ngrams, plain_record, score_planted, toxic_terms,
                                   write_clean)
from llmtech.data.preference import as_messages, load_pairs, load_unpaired
from llmtech.errors import ConfigError, DataError

DIRTY = ROOT / "data" / "samples" / "dirty_preference.jsonl"
PLANTED = ROOT / "data" / "samples" / "dirty_preference_planted.json"
LAB = ROOT / "lessons" / "lesson4" / "06_dataset_curation" / "dataset_curation.py"

ANSWER_ZH = "订单实付满 ¥99 包邮，不满 ¥99 收取 ¥10 运费。"
ANSWER_EN = "Orders ship within 48 hours after payment, and you'll get a text with the tracking number."


def pair(prompt, chosen, rejected, line=1, system=None):
    return {"prompt": as_messages(prompt, "user", system), "chosen": as_messages(chosen, "assistant"),
            "rejected": as_messages(rejected, "assistant"), "where": f"t.jsonl:{line}", "meta": {}}


def kto(prompt, completion, label, line=1):
    return {"prompt": as_messages(prompt, "user"), "completion": as_messages(completion, "assistant"),
            "label": label, "where": f"k.jsonl:{line}", "meta": {}}


def cats(report, line=None):
    return {f.category for f in report.flags if line is None or f.where.endswith(f":{line}")}


def jsonl(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


# --------------------------------------------------------------------------- single checks

def test_tie_after_normalisation_is_stricter_than_the_loader():
    rows = [pair("运费怎么收？", ANSWER_ZH, ANSWER_ZH.replace("，", ", ").rstrip("。"), 1),
            pair("Shipping?", "Free over ¥99.", "FREE  over ¥99", 2),
            pair("运费怎么收？", ANSWER_ZH, "全场包邮。", 3)]
    rep = audit(rows)
    assert cats(rep, 1) == {"tie"} and cats(rep, 2) == {"tie"} and cats(rep, 3) == set()


def test_exact_duplicates_after_normalisation_keep_the_first():
    rows = [pair("When do you dispatch orders?", ANSWER_EN, "Within 7 days.", 1),
            pair("  when do you DISPATCH orders", ANSWER_EN.replace(", and", ",  and"), "within 7 days", 2),
            pair("When do you dispatch orders?", ANSWER_EN, "Within 10 days.", 3)]  # another rejected
    rep = audit(rows)
    assert cats(rep, 1) == set() and cats(rep, 2) == {"exact_dup"} and cats(rep, 3) == set()
    assert "t.jsonl:1" in rep.flags[0].detail


def test_near_duplicates_minhash_with_prompt_check():
    a = ("The L3 fits doors 40–120 mm thick. If a special door needs modification, "
         "the technician explains the cost first.")
    b = ("The L3 fits doors that are 40–120 mm thick. If a special door needs modification, "
         "the technician will explain the cost first.")
    rows = [pair("What door thickness does the L3 fit?", a, "Any door works, however thick it is.", 1),
            pair("What door thickness does the L3 fit?", b, "There is no limit on door thickness.", 2),
            pair("Can I pay cash on delivery?", "Sorry, cash on delivery isn't available. All orders "
                 "are paid online, and prices are in CNY only.", "Yes, for a ¥5 handling fee.", 3),
            pair("Can I pay in US dollars?", "Sorry, cash on delivery isn't available. All orders "
                 "are paid online, and prices are in CNY only.", "Yes, with any foreign card.", 4)]
    rep = audit(rows)
    assert cats(rep, 2) == {"near_dup"} and "t.jsonl:1" in rep.flags[0].detail
    assert cats(rep, 1) == cats(rep, 3) == cats(rep, 4) == set()   # paraphrased question, same answer
    loose = audit(rows, CurationConfig(near_prompt_min=0.0))
    assert cats(loose, 4) == {"near_dup"}                          # ... unless prompts are ignored
    strict = audit(rows, CurationConfig(near_threshold=0.95))
    assert "near_dup" not in cats(strict)


def test_length_ratio_bounds():
    rows = [pair("Q1?", "5 minutes.", "x" * 200, 1), pair("Q2?", "y" * 200, "No.", 2),
            pair("Q3?", "A fine answer here.", "A worse answer.", 3)]
    rep = audit(rows, CurationConfig(langs=[]))
    assert cats(rep, 1) == {"length_ratio"} and cats(rep, 2) == {"length_ratio"} and cats(rep, 3) == set()
    assert "length_ratio" not in cats(audit(rows, CurationConfig(langs=[], ratio_lo=0.01, ratio_hi=100)))


def test_language_mismatch_and_other_languages():
    rows = [pair("C5 最大支持多大的内存卡？", "The C5 accepts cards up to 256 GB.", "最大 64 GB。", 1),
            pair("Will a duplicate payment be refunded?", "Yes, within 3 business days.", "不会退。", 2),
            pair("这个可以退吗？", "可以，签收次日起 7 天内可以无理由退货。", "不可以。", 3),
            pair("これは返品できますか？", "はい、できます。", "いいえ。", 4)]
    rep = audit(rows)
    assert cats(rep, 1) == {"lang_mismatch"} and "chosen is en" in rep.flags[0].detail
    assert cats(rep, 2) == {"lang_mismatch"} and cats(rep, 3) == set()
    assert cats(rep, 4) == {"lang_other"}
    assert cats(audit(rows, CurationConfig(langs=[], lang_match=False))) == set()


def test_pii_kinds_and_allow_list():
    idno = "11010519900307123" + id_check_digit("11010519900307123")
    rows = [pair("我的手机号 13912345678 收不到验证码", "请稍后再试。", "换个号吧。", 1),
            pair(f"身份证 {idno}，邮箱 wang@example.com", "请不要发送身份证号。", "收到。", 2),
            pair("客服邮箱是什么？", "可以发邮件到 support@spruce-home.example，热线 400-820-7316。", "我们没有客服邮箱。", 3)]
    rep = audit(rows)
    assert cats(rep, 1) == {"pii"} and "phone in prompt" in rep.flags[0].detail
    assert {f.detail for f in rep.flags if f.where.endswith(":2")} == {"email in prompt; id in prompt"}
    assert cats(rep, 3) == {"pii"}                                   # a company address is still an e-mail
    assert cats(audit(rows, CurationConfig(pii_allow=["@spruce-home.example"])), 3) == set()


def test_toxicity_lexicon_is_rule_based_and_checks_the_good_answer_only():
    assert toxic_terms("你是白痴吗？") == ["白痴"]
    assert toxic_terms("It's not rocket science, idiot.") == ["idiot"]
    # ordinary words that contain a lexicon character are not hits
    for ok in ("请先操作一次", "清理滚刷", "倒完垃圾后", "妈妈的账号", "a dumbbell", "塑料废物回收"):
        assert toxic_terms(ok) == [], ok
    assert toxic_terms("you clown", extra=["clown"]) == ["clown"]
    rows = [pair("报错怎么办？", "你是白痴吗？先重启。", "不用管。", 1),
            pair("Where is my parcel?", "Check My Orders → Track package.", "Stupid question.", 2)]
    rep = audit(rows)
    assert cats(rep, 1) == {"toxic"} and cats(rep, 2) == set()     # a rude rejected answer is fine
    scored = audit(rows, toxicity=lambda text: 0.9 if "Track" in text else 0.0)  # classifier hook
    assert cats(scored, 2) == {"toxic"} and "classifier score 0.90" in scored.flags[-1].detail
    assert curation.load_toxicity_classifier("") is None


def test_toxicity_classifier_that_cannot_load_falls_back_to_the_lexicon():
    assert curation.load_toxicity_classifier(str(ROOT / "no-such-model-dir")) is None


def test_ngrams_chinese_characters_and_english_words():
    zh = ngrams("我在成都，发货后大概几天能收到？", zh_n=8)
    assert "我在成都发货后大" in zh and all(len(g) == 8 for g in zh)       # punctuation removed
    en = ngrams("My order only comes to ¥59. Will I be charged?", en_n=5)
    assert "my order only comes to" in en and all(len(g.split()) == 5 for g in en)
    assert ngrams("E06?", zh_n=8) == {"e06"}                              # shorter than n: one gram


def test_decontamination_finds_copied_and_embedded_prompts_and_ignores_others():
    evals = [EvalText("test.jsonl:1", "question", "我在成都，发货后大概几天能收到？"),
             EvalText("test.jsonl:2", "question",
                      "My order only comes to ¥59. Will I be charged for delivery?"),
             EvalText("test.jsonl:2", "answer", ANSWER_EN),
             EvalText("test.jsonl:3", "question", "Reply using the order details below. Member tier: "
                      "Gold. Order: C5 camera, delivered 4 days ago, no-reason return requested. "
                      "Customer: Do I have to pay to ship the camera back to you?")]
    rows = [pair("我在成都，发货后大概几天能收到？", "一般 1–3 天。", "10 天。", 1),
            pair("Hi! My order only comes to ¥59. Will I be charged for delivery? Thanks a lot, "
                 "I am ordering a camera for my parents today.", "Yes, ¥10.", "No.", 2),
            pair("发到西藏要多久？", "偏远地区 5–7 天。", "1 天。", 3),
            pair("How much is shipping?", "Orders of ¥99 or more ship free.", "Always free.", 4),
            pair("When will it ship?", ANSWER_EN, "It ships whenever the courier comes by.", 5),
            pair("Do I have to pay to ship the camera back to you?", "No, Gold members ship back free.",
                 "Yes, always at your own cost.", 6)]
    rep = audit(rows, eval_texts=evals)
    assert cats(rep, 1) == {"contaminated"} and "test.jsonl:1" in rep.flags[0].detail
    assert cats(rep, 2) == {"contaminated"}                 # the eval question is inside the prompt
    assert cats(rep, 3) == cats(rep, 4) == cats(rep, 5) == set()
    assert cats(rep, 6) == {"contaminated"}                 # the prompt is part of an eval item
    both = audit(rows, CurationConfig(contam_fields=["prompt", "chosen"]), EvalIndex(evals))
    assert cats(both, 5) == {"contaminated"}
    assert [f.detail for f in both.flags if f.where.endswith(":5")] == [
        "chosen overlaps eval answer test.jsonl:2 (100% of n-grams)"]
    assert cats(audit(rows, CurationConfig(contam_threshold=1.0), evals), 2) == {"contaminated"}


def test_eval_texts_from_project_files_and_errors(tmp_path):
    texts = load_eval_texts(["data/support/sft_test.jsonl", "data/support/eval_qa.jsonl"], root=ROOT)
    assert {t.field for t in texts} == {"question", "answer"}
    assert texts[0].where == "data/support/sft_test.jsonl:1"          # relative to root
    assert sum(t.field == "question" for t in texts) == 129 + 128
    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"question": "ok?", "answer": "yes"}\n{"foo": "bar"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"eval\.jsonl:2: .*no question field.*foo"):
        load_eval_texts([bad])
    with pytest.raises(DataError, match="not found"):
        load_eval_texts([tmp_path / "missing.jsonl"])


def test_kto_rows_label_conflict_near_dups_per_label_and_toxicity():
    good, bad = ("空气净化器 A2 售价 ¥1,299，CADR 为 400 m³/h，适合 28–48 m² 的房间。",
                 "空气净化器 A2 售价 ¥999，CADR 为 300 m³/h，适合 20–30 m² 的房间。")
    rows = [kto("A2 空气净化器多少钱？", good, True, 1),
            kto("A2 空气净化器多少钱？", bad, False, 2),      # a contrast, not a near-duplicate
            kto("A2 空气净化器多少钱？", good, False, 3),     # conflicts with line 1
            kto("报错怎么办？", "闭嘴，自己重启。", True, 4),
            kto("报错怎么办？", "闭嘴，自己去重启。", False, 5)]                    # toxic but labelled bad
    rep = audit(rows)
    assert rep.kind == "unpaired"
    assert cats(rep, 1) == {"label_conflict"} and cats(rep, 3) == {"label_conflict"}
    assert cats(rep, 2) == set() and cats(rep, 4) == {"toxic"} and cats(rep, 5) == set()
    kept, rep = curate(rows)
    assert [r["where"] for r in kept] == ["k.jsonl:2", "k.jsonl:5"]


def test_audit_rejects_rows_that_are_not_canonical():
    with pytest.raises(DataError, match="x.jsonl:4: not a canonical preference pair"):
        audit([{"prompt": "hi", "chosen": "a", "rejected": "b", "where": "x.jsonl:4"}])
    with pytest.raises(DataError, match="KTO row"):
        audit([kto("q", "a", True), pair("q", "a", "b")])


# --------------------------------------------------------------------------- curate + write

def test_curate_keeps_masks_and_drops_as_configured():
    rows = [pair("我的手机号 13912345678 收不到验证码", "请稍后再试。", "换个号吧。", 1),
            pair("报错怎么办？", "你是白痴吗？先重启。", "不用管。", 2),
            pair("运费怎么收？", ANSWER_ZH, "全场包邮。", 3)]
    kept, rep = curate(rows)
    assert [r["where"] for r in kept] == ["t.jsonl:1", "t.jsonl:3"]
    assert kept[0]["prompt"][0]["content"] == "我的手机号 [PHONE] 收不到验证码" and rep.pii_masked == 1
    assert rows[0]["prompt"][0]["content"].startswith("我的手机号 139")     # input rows untouched
    assert rep.dropped_by == {"toxic": 1} and rep.n_kept == 2
    kept, rep = curate(rows, CurationConfig(pii_action="drop", drop=[]))
    assert [r["where"] for r in kept] == ["t.jsonl:2", "t.jsonl:3"] and rep.dropped_by == {"pii": 1}
    kept, rep = curate(rows, CurationConfig(pii_action="report", drop=[]))
    assert len(kept) == 3 and "139" in kept[0]["prompt"][0]["content"] and rep.pii_masked == 0
    s = rep.summary("x_")
    assert s["x_flag_pii"] == 1 and s["x_flag_toxic"] == 1 and s["x_kept"] == 3
    assert set(CATEGORIES) <= {k[len("x_flag_"):] for k in s if k.startswith("x_flag_")}


def test_cleaned_file_reloads_without_problems(tmp_path):
    data = load_pairs(DIRTY)
    kept, rep = curate(data, CurationConfig(pii_allow=["@spruce-home.example"]))
    out = write_clean(tmp_path / "clean.jsonl", kept)
    recs = jsonl(out)
    assert len(recs) == rep.n_kept == len(kept) and set(recs[0]) == {"prompt", "chosen", "rejected"}
    assert all(isinstance(r["prompt"], str) for r in recs)                  # single-turn -> strings
    again = load_pairs(out)
    assert again.problems == [] and len(again.rows) == len(recs)
    text = out.read_text(encoding="utf-8")
    assert "[PHONE]" in text and "13912345678" not in text
    assert audit(again, CurationConfig(pii_allow=["@spruce-home.example"])).flags == []
    with pytest.raises(DataError, match="nothing to write"):
        write_clean(tmp_path / "empty.jsonl", [])


def test_plain_record_layouts():
    assert plain_record(pair("q", "a", "b")) == {"prompt": "q", "chosen": "a", "rejected": "b"}
    conv = plain_record(pair("q", "a", "b", system="You are a support agent."))
    assert conv["prompt"][0] == {"role": "system", "content": "You are a support agent."}
    assert conv["chosen"] == [{"role": "assistant", "content": "a"}]       # all lists together
    assert plain_record(kto("q", "a", False)) == {"prompt": "q", "completion": "a", "label": False}
    meta = plain_record({**pair("q", "a", "b"), "meta": {"lang": "en"}}, keep_meta=True)
    assert meta["lang"] == "en"


def test_config_validation_names_the_key(tmp_path):
    with pytest.raises(ValidationError, match="ratio_lo"):
        CurationConfig(ratio_lo=5, ratio_hi=2)
    with pytest.raises(ValidationError):
        CurationConfig(drop=["no_such_flag"])
    with pytest.raises(ValidationError, match="pii_action"):
        CurationConfig(drop=["pii"])
    f = tmp_path / "c.yaml"
    f.write_text("near_treshold: 0.7\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="near_treshold"):
        load_config(CurationConfig, f)


def test_score_planted_and_bad_manifest():
    rep = audit(load_pairs(DIRTY), CurationConfig(pii_allow=["@spruce-home.example"]),
                load_eval_texts(curation.DEFAULT_EVAL_FILES, root=ROOT))
    manifest = json.loads(PLANTED.read_text(encoding="utf-8"))
    rows, extra = score_planted(rep, manifest["planted"])
    missed = [r for r in rows if not r["found"]]
    assert len(rows) >= 20 and not missed and extra == []
    # every problem type the brief asks for is planted
    assert {r["expect"] for r in rows} >= {"missing_fields", "invalid", "tie", "exact_dup", "near_dup",
                                           "wrong_format", "length_ratio", "lang_mismatch", "pii",
                                           "toxic", "contaminated"}
    rows, _ = score_planted(rep, [{"line": 1, "expect": "tie"}])
    assert rows[0]["found"] is False
    with pytest.raises(DataError, match="m.json: planted entry 0"):
        score_planted(rep, [{"line": "3", "expect": "tie"}], "m.json")


def test_load_planted_errors(tmp_path):
    assert len(curation.load_planted(PLANTED)) == len(json.loads(PLANTED.read_text())["planted"])
    bad = tmp_path / "m.json"
    bad.write_text('{"planted": [\n  {"line": 3,}\n]}', encoding="utf-8")
    with pytest.raises(DataError, match=r"m\.json:2: malformed JSON"):
        curation.load_planted(bad)
    bad.write_text('{"lines": []}', encoding="utf-8")
    with pytest.raises(DataError, match="'planted' list"):
        curation.load_planted(bad)


# --------------------------------------------------------------------------- the sample files

def test_sample_preference_files_keep_their_promises():
    train_sft = jsonl(SUPPORT / "sft_train.jsonl")
    test_sft = jsonl(SUPPORT / "sft_test.jsonl")
    train_q = {t["instruction"]: t["output"] for t in train_sft if not t["input"]}
    test_q = {t["instruction"]: t["output"] for t in test_sft if not t["input"]}
    pref, held, kto_rows = (jsonl(SUPPORT / n)
                            for n in ("preference.jsonl", "preference_test.jsonl", "kto.jsonl"))
    assert len(pref) >= 170 and len(held) >= 70 and len(kto_rows) >= 200
    for name, rows in (("preference", pref), ("preference_test", held), ("kto", kto_rows)):
        langs = collections.Counter(r["lang"] for r in rows)
        assert abs(langs["zh"] - langs["en"]) <= 0.1 * len(rows), (name, langs)
    reasons = {"wrong_fact", "fabricated_policy", "evasive", "rude", "rambling"}
    for rows in (pref, held):
        mix = collections.Counter(r["reject_reason"] for r in rows)
        assert set(mix) == reasons and min(mix.values()) >= 0.08 * len(rows), mix
        # "chosen is longer" is not a perfect cue
        assert 0.1 * len(rows) < sum(len(r["rejected"]) > len(r["chosen"]) for r in rows)
    assert all(train_q.get(r["prompt"]) == r["chosen"] for r in pref)       # chosen = SFT answer
    assert all(test_q.get(r["prompt"]) == r["chosen"] for r in held)
    held_prompts = {r["prompt"] for r in held}
    assert not held_prompts & ({r["prompt"] for r in pref} | {t["instruction"] for t in train_sft})
    # KTO: imbalanced, on training questions, genuinely unpaired, some new undesirable text
    assert all(r["prompt"] in train_q for r in kto_rows)
    share = sum(r["label"] for r in kto_rows) / len(kto_rows)
    assert 0.55 <= share <= 0.65
    assert all(r["completion"] == train_q[r["prompt"]] for r in kto_rows if r["label"])
    labels = collections.defaultdict(set)
    for r in kto_rows:
        labels[r["prompt"]].add(r["label"])
    assert sum(v == {True} for v in labels.values()) >= 30
    assert sum(v == {False} for v in labels.values()) >= 30
    rejected = {r["rejected"] for r in pref}
    assert sum(r["completion"] not in rejected for r in kto_rows if not r["label"]) >= 30
    assert {r["reason"] for r in kto_rows if not r["label"]} == reasons


def test_sample_files_load_without_problems_and_audit_clean():
    cfg = CurationConfig(pii_allow=["@spruce-home.example"])
    index = EvalIndex(load_eval_texts(cfg.eval_files, root=ROOT))
    for name, loader in (("preference.jsonl", load_pairs), ("preference_test.jsonl", load_pairs),
                         ("kto.jsonl", load_unpaired)):
        data = loader(SUPPORT / name)
        assert data.problems == [] and data.n_read == len(data.rows), name
        if name != "preference_test.jsonl":   # (the held-out set is itself one of the eval files)
            assert audit(data, cfg, index).flags == [], name


# --------------------------------------------------------------------------- the lab

def test_lab_l406_quick_finds_every_planted_problem(tmp_path):
    r = run_script(LAB, "--quick", "--out", tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    planted = json.loads(PLANTED.read_text(encoding="utf-8"))["planted"]
    assert m["planted_total"] == len(planted) and m["planted_found"] == m["planted_total"]
    assert m["false_alarms"] == 0 and m["dirty_read"] == len(DIRTY.read_text().splitlines())
    assert m["dirty_kept"] + m["dirty_dropped"] == m["dirty_read"]
    assert m["project_flagged_records"] == 0 and m["project_kept"] == m["project_read"]
    assert m["project_kto_flagged_records"] == 0 and 0.55 < m["project_kto_desirable_share"] < 0.65
    assert m["project_near_dup_at_0.7"] == 0 and m["project_near_dup_at_0.7_no_prompt_check"] > 0
    assert load_pairs(tmp_path / "clean" / "dirty.jsonl").problems == []
    assert load_unpaired(tmp_path / "clean" / "project_kto.jsonl").problems == []
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "dirty_preference.jsonl:36" in report and (tmp_path / "flags_by_category.png").exists()
    if (SHARED / "llamafactory_sft" / "dpo_en_demo.json").exists():
        # the loader already finds byte-identical duplicates in both public sets
        assert m["public_en_flag_exact_dup"] == 5 and m["public_zh_flag_exact_dup"] == 11
        assert m["public_en_kept"] == 295 and m["public_zh_kept"] == 289
        assert load_pairs(tmp_path / "clean" / "public_zh.jsonl").problems == []
    else:
        assert m["public_en_skipped"] is True and "[skip]" in r.stdout
