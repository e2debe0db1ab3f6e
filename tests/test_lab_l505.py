"""L5.05 customer-support case: feedback validation (one reason per line), feedback -> pairs
loadable by load_pairs and trainable by run_dpo, the simulated-feedback rule, and the lab."""

import json

import pytest

from conftest import ROOT, load_lab_module
from llmtech.data import feedback as fb
from llmtech.data.preference import load_pairs
from llmtech.errors import DataError

LAB = ROOT / "lessons/lesson5/05_customer_support_case/customer_alignment.py"
SYSTEM = {"role": "system", "content": "你是云杉智能家居的客服助手。"}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def messages(tmp_path):
    rows = [{"message_id": "m1", "question": "无理由退货期限是几天？", "lang": "zh", "strategy": "few_shot",
             "prompt": [SYSTEM, {"role": "user", "content": "保修多久？"},
                        {"role": "assistant", "content": "36个月。"},
                        {"role": "user", "content": "无理由退货期限是几天？"}],
             "answer": "可以在30天内退货。"},
            {"message_id": "m2", "question": "How much is shipping?", "lang": "en", "strategy": "rag",
             "prompt": [{"role": "user", "content": "How much is shipping?"}], "answer": "Shipping is ¥10."},
            {"message_id": "m3", "question": "S1 多少钱？", "lang": "zh", "strategy": "rag",
             "prompt": [{"role": "user", "content": "S1 多少钱？"}], "answer": "S1 是扫地机器人。"},
            {"message_id": "m4", "question": "Battery life?", "lang": "en", "strategy": "rag",
             "prompt": [{"role": "user", "content": "Battery life?"}], "answer": "  "}]
    return fb.load_messages(write_jsonl(tmp_path / "messages.jsonl", rows))


def test_each_bad_feedback_line_is_rejected_with_its_reason(tmp_path, messages):
    lines = [{"message_id": "m1", "rating": "down", "correction": "您好，答案是：7天。"},     # 1 ok
             {"message_id": "m2", "rating": "UP"},                                          # 2 ok
             {"message_id": "m9", "rating": "down"},                                        # 3
             {"rating": "up"},                                                              # 4
             {"message_id": "m3"},                                                          # 5
             {"message_id": "m3", "rating": 5},                                             # 6
             {"message_id": "m3", "rating": "meh"},                                         # 7
             {"message_id": "m3", "rating": "up", "correction": "S1 售价 ¥1,999。"},        # 8
             {"message_id": "m3", "rating": "down", "correction": "   "},                   # 9
             {"message_id": "m3", "rating": "down", "correction": ["x"]},                   # 10
             {"message_id": "m3", "rating": "down", "correction": "S1是扫地机器人。"},      # 11
             {"message_id": "m1", "rating": "up"},                                          # 12
             {"message_id": "m3", "rating": "down"}]                                        # 13 ok
    f = write_jsonl(tmp_path / "fb.jsonl", lines)
    data = fb.load_feedback(f, messages)
    got = {int(r.where.rsplit(":", 1)[1]): r.code for r in data.rejected}
    assert got == {3: "unknown_message_id", 4: "missing_message_id", 5: "missing_rating",
                   6: "invalid_rating", 7: "invalid_rating", 8: "correction_on_up",
                   9: "invalid_correction", 10: "invalid_correction", 11: "same_as_answer",
                   12: "duplicate"}
    assert all(r.where.startswith(str(f)) for r in data.rejected)
    assert "m9" in str(data.rejected[0]) and str(data.rejected[-1]).startswith(f"{f}:12: ")
    assert "fb.jsonl:1" in data.rejected[-1].reason  # the duplicate names the first rating
    assert [(r["message_id"], r["rating"]) for r in data.records] == [("m1", "down"), ("m2", "up"), ("m3", "down")]
    assert data.summary() == {"source": str(f), "read": 13, "kept": 3, "rejected": 10, "up": 1, "down": 2,
                              "rejected_by_reason": data.by_reason()}
    assert set(data.by_reason()) <= set(fb.REASONS) and sum(data.by_reason().values()) == 10


def test_unreadable_or_useless_feedback_files_are_clear_errors(tmp_path, messages):
    gbk = tmp_path / "gbk.jsonl"
    gbk.write_bytes(b'{"message_id": "m1", "rating": "up"}\n' +
                    json.dumps({"message_id": "m2", "rating": "down", "correction": "运费10元"},
                               ensure_ascii=False).encode("gbk") + b"\n")
    with pytest.raises(DataError, match=r"gbk.jsonl:2: not UTF-8"):
        fb.load_feedback(gbk, messages)
    with pytest.raises(DataError, match="empty"):
        fb.load_feedback(write_jsonl(tmp_path / "empty.jsonl", []), messages)
    with pytest.raises(DataError, match=r"none.jsonl: no valid feedback records \(2 rejected; first: .*none.jsonl:1"):
        fb.load_feedback(write_jsonl(tmp_path / "none.jsonl", [{"message_id": "x", "rating": "up"},
                                                              {"rating": "up"}]), messages)
    with pytest.raises(DataError, match=r"broken.jsonl:2: malformed JSON"):
        fb.load_feedback(write_jsonl(tmp_path / "broken.jsonl", ['{"message_id": "m1", "rating": "up"}',
                                                                '{"message_id": "m2", "rat']), messages)
    with pytest.raises(DataError, match="not found"):
        fb.load_feedback(tmp_path / "missing.jsonl", messages)
    bad_log = write_jsonl(tmp_path / "log.jsonl", [{"message_id": "a", "question": "q", "answer": "x",
                                                     "strategy": "plain", "prompt": "q"}])
    with pytest.raises(DataError, match=r"log.jsonl:1: 'prompt' must be the chat"):
        fb.load_messages(bad_log)
    with pytest.raises(DataError, match=r"log2.jsonl:1: message record without field\(s\) \['answer'"):
        fb.load_messages(write_jsonl(tmp_path / "log2.jsonl", [{"message_id": "a", "question": "q",
                                                                "prompt": [], "strategy": "plain"}]))


def test_pairs_keep_the_exact_prompt_and_load_through_load_pairs(tmp_path, messages):
    records = [{"message_id": "m1", "rating": "down", "correction": "您好，答案是：7天。"},
               {"message_id": "m2", "rating": "up"},
               {"message_id": "m3", "rating": "down"},  # no correction: no pair
               {"message_id": "m4", "rating": "down", "correction": "About 150 minutes."}]  # empty answer
    data = fb.load_feedback(write_jsonl(tmp_path / "fb.jsonl", records), messages)
    pairs = fb.to_pairs(data, messages)
    assert [p["message_id"] for p in pairs] == ["m1"]
    assert pairs[0]["prompt"] == messages["m1"]["prompt"] and pairs[0]["rejected"] == "可以在30天内退货。"
    path = fb.write_pairs(tmp_path / "pairs.jsonl", pairs)
    loaded = load_pairs(path, on_bad="error")
    row = loaded.rows[0]
    assert loaded.summary()["kept"] == 1 and row["prompt"] == messages["m1"]["prompt"]
    assert row["chosen"] == [{"role": "assistant", "content": "您好，答案是：7天。"}]
    assert row["rejected"] == [{"role": "assistant", "content": "可以在30天内退货。"}]
    assert row["meta"]["message_id"] == "m1" and row["meta"]["strategy"] == "few_shot"
    with pytest.raises(DataError, match="no preference pairs"):
        fb.write_pairs(tmp_path / "none.jsonl", [])


def test_simulated_feedback_rule():
    msgs = [{"message_id": "a", "answer": "无理由退货期限是 7 天。", "lang": "zh"},
            {"message_id": "b", "answer": "It costs 10 yuan.", "lang": "en"},
            {"message_id": "c", "answer": "不知道", "lang": "zh"},
            {"message_id": "d", "answer": "anything", "lang": "en"}]
    gold = {"a": "7天", "b": "¥10", "c": "36个月", "d": ""}
    out = fb.simulate_feedback(msgs, gold)
    assert out == [{"message_id": "a", "rating": "up", "simulated": True},
                   {"message_id": "b", "rating": "down", "correction": "Hello, the answer is: ¥10.", "simulated": True},
                   {"message_id": "c", "rating": "down", "correction": "您好，答案是：36个月。", "simulated": True}]
    assert all(fb.contains_gold(r["correction"], gold[r["message_id"]]) for r in out if r["rating"] == "down")
    # the judge decides: a stricter one turns the thumbs-up into a correction
    strict = fb.simulate_feedback(msgs[:1], gold, judge=lambda ans, ref: ans == ref)
    assert strict[0]["rating"] == "down" and strict[0]["correction"] == "您好，答案是：7天。"


def test_feedback_pairs_train_one_dpo_step_on_tiny_llama(tmp_path, messages):
    from llmtech.train.dpo import DPOSettings, run_dpo

    recs = [{"message_id": "m1", "rating": "down", "correction": "您好，答案是：7天。"},
            {"message_id": "m2", "rating": "down", "correction": "Hello, the answer is: ¥10."}]
    data = fb.load_feedback(write_jsonl(tmp_path / "fb.jsonl", recs), messages)
    fb.write_pairs(tmp_path / "pairs.jsonl", fb.to_pairs(data, messages))
    s = DPOSettings(model="tiny-llama", train_file=str(tmp_path / "pairs.jsonl"), eval_file=None,
                    max_steps=1, batch_size=2, max_length=256, save_steps=10**9, save_final=False,
                    output_dir=str(tmp_path / "dpo"))
    res = run_dpo(s)
    assert res["global_step"] == 1 and res["train_loss"] == pytest.approx(0.6931, abs=0.05)


def test_lab_end_to_end_on_tiny_llama(tmp_path):
    from llmtech.labs import LabContext

    lab = load_lab_module(LAB, "l505_lab")
    cfg = lab.Config(model="tiny-llama", questions=4, heldout=2, max_new_tokens=4, deploy="rag", quick=True)
    m = lab.main(cfg, LabContext(out=tmp_path, lab_id="L5.05", title="t"))
    assert m["feedback_simulated"] is True and m["deployed_strategy"] == "rag"
    for s in lab.STRATEGIES:
        assert 0 <= m[f"acc_{s}"] <= 1 and 0 <= m[f"refusal_{s}"] <= 1
    # 4 simulated records + the 7 bad lines of data/feedback/bad_feedback.jsonl, one per reason
    assert (m["feedback_read"], m["feedback_kept"], m["feedback_rejected"]) == (11, 4, 7)
    assert m["feedback_up"] + m["feedback_down"] == 4
    assert {c: m[f"rejected_{c}"] for c in fb.REASONS} == {c: int(c != "same_as_answer") for c in fb.REASONS}
    log = fb.load_messages(tmp_path / "messages.jsonl")
    assert len(log) == 4 and {r["strategy"] for r in log.values()} == {"rag"}
    assert all("[1] (" in r["prompt"][-1]["content"] for r in log.values())  # passages from the KB
    # the tiny random model answers with whitespace only: no pair, DPO is skipped, numbers unchanged
    assert m["pairs"] == 0 and m["dpo_steps"] == 0
    assert m["acc_heldout_after"] == m["acc_heldout_before"]
    assert (tmp_path / "strategies_and_dpo.png").stat().st_size > 5_000
    with pytest.raises(ValueError):
        lab.Config(strategies=["telepathy"])
