"""L3.06 legal vertical case: building Q&A / MCQ data from a law knowledge base (on a small
knowledge base written here), cached option scoring, and one end-to-end lab run through the
2-process launch on ../shared/data/zh_laws_kb."""

import json

import pytest

from conftest import ROOT, load_lab_module, run_script, shared_or_skip

from llmtech.data import legal
from llmtech.errors import DataError

LAB = ROOT / "lessons/lesson3/06_vertical_case/domain_finetune_case.py"
NUMS = "一二三四五六七八九"
TOPICS = {"旅行": "旅行社应当向游客说明行程安排", "快递": "快递企业应当按约定投递邮件",
          "广告宣传": "广告不得含有虚假的内容", "劳动保障": "用人单位应当按时支付劳动报酬",
          "食品卫生": "食品生产者应当保证食品安全", "价格管理": "经营者应当明码标价"}


def write_kb(folder, per_law=6, extra_lines=()):
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for topic, sentence in TOPICS.items():
        for i in range(per_law):
            art = f"第{NUMS[i]}条"
            lines.append(json.dumps({"id": f"{topic}法#{art}", "law": f"中华人民共和国{topic}法", "chapter": "",
                                     "article": art, "text": f"{art} {sentence}（第{i + 1}款）。"},
                                    ensure_ascii=False))
    (folder / "articles.jsonl").write_text("\n".join([*lines, *extra_lines]) + "\n", encoding="utf-8")
    return folder


def test_split_is_by_article_balanced_and_deterministic(tmp_path):
    arts = legal.load_articles(write_kb(tmp_path / "kb"))
    assert len(arts) == 36 and legal.laws_of(arts)[0].startswith("中华人民共和国")
    assert arts[0].body == "旅行社应当向游客说明行程安排（第1款）。"  # "第一条 " stripped
    pool, held = legal.split_articles(arts, 12, seed=0)
    assert {a.id for a in pool}.isdisjoint({a.id for a in held}) and len(pool) + len(held) == 36
    assert sorted(a.law for a in held) == sorted(legal.laws_of(arts) * 2)  # round-robin: 2 per law
    assert [a.id for a in legal.split_articles(arts, 12, seed=0)[1]] == [a.id for a in held]
    assert [a.id for a in legal.split_articles(arts, 12, seed=1)[1]] != [a.id for a in held]
    recs = legal.training_records(pool, n_source=10, n_content=4, max_chars=8, seed=0)
    assert sorted(r["task"] for r in recs) == ["content"] * 4 + ["source"] * 10
    assert {r["id"] for r in recs} <= {a.id for a in pool}
    content = next(r for r in recs if r["task"] == "content")
    assert content["instruction"].endswith("规定了什么？") and content["output"].endswith("……")
    assert len(content["output"]) == 8 + 2
    with pytest.raises(DataError, match="n_heldout"):
        legal.split_articles(arts, 36)


def test_questions_hold_the_answer_once_and_are_seeded(tmp_path):
    arts = legal.load_articles(write_kb(tmp_path / "kb"))
    laws = legal.laws_of(arts)
    _, held = legal.split_articles(arts, 12, seed=0)
    qs = legal.law_questions(held, laws, seed=0)
    for q, a in zip(qs, held):
        assert len(q.options) == 4 and len(set(q.options)) == 4
        assert q.options.count(f"《{a.law}》") == 1 and q.options[q.answer] == f"《{a.law}》"
        assert q.record["output"] == f"《{a.law}》" and a.body[:10] in q.record["input"]
    assert [q.options for q in legal.law_questions(held, laws, seed=0)] == [q.options for q in qs]
    assert [q.options for q in legal.law_questions(held, laws, seed=5)] != [q.options for q in qs]
    assert legal.lexical_baseline(qs) == 1.0  # every text here names its topic
    with pytest.raises(DataError, match="5 options need 5 distinct laws"):
        legal.law_questions(held, laws[:4], n_options=5)


def test_bad_lines_and_missing_folder_are_named(tmp_path):
    bad = write_kb(tmp_path / "bad", per_law=1, extra_lines=['{"id": "x", "law": '])
    with pytest.raises(DataError, match=r"articles\.jsonl:7: malformed JSON"):
        legal.load_articles(bad)
    empty_text = write_kb(tmp_path / "e", per_law=1, extra_lines=[
        json.dumps({"id": "y", "law": "某法", "article": "第一条", "text": " "})])
    with pytest.raises(DataError, match=r"articles\.jsonl:7: field 'text' must be a non-empty string"):
        legal.load_articles(empty_text)
    dup = write_kb(tmp_path / "d", per_law=1, extra_lines=[
        json.dumps({"id": "旅行法#第一条", "law": "某法", "article": "第一条", "text": "第一条 重复"})])
    with pytest.raises(DataError, match=r"articles\.jsonl:7: id .* repeats the article at .*articles\.jsonl:1"):
        legal.load_articles(dup)
    with pytest.raises(DataError, match=r"nowhere: law knowledge-base folder not found .*kb_dir"):
        legal.load_articles(tmp_path / "nowhere")
    (tmp_path / "no_file").mkdir()
    with pytest.raises(DataError, match=r"no_file/articles\.jsonl: not found"):
        legal.load_articles(tmp_path / "no_file")


def test_cached_option_scores_equal_full_sequence_scores(tmp_path, tiny):
    from llmtech.data.formats import to_messages
    from llmtech.evals.lm import encode_chat_example, sequence_logprobs

    model, tok = tiny
    arts = legal.load_articles(write_kb(tmp_path / "kb", per_law=2))
    qs = legal.law_questions(arts[:3], legal.laws_of(arts), seed=0)
    res = legal.score_questions(model, tok, qs)
    for q, row in zip(qs, res["rows"]):
        ex = [encode_chat_example(tok, to_messages({**q.record, "output": o}), 10**9) for o in q.options]
        full, _ = sequence_logprobs(model, tok, ex)
        assert row["logprobs"] == pytest.approx(full.tolist(), abs=1e-3)
        assert row["calibrated"] == pytest.approx([x - res["prior"][o] for x, o in zip(row["logprobs"], q.options)])
    assert res["n"] == 3 and res["chance"] == 0.25 and 0 <= res["accuracy_calibrated"] <= 1


def test_lab_end_to_end_two_processes(tmp_path):
    shared_or_skip("zh_laws_kb")
    out = tmp_path / "l306"
    r = run_script(LAB, "--quick", "model=tiny-llama", "steps=2", "n_eval=18", "n_source=8", "n_content=4",
                   "max_chars=20", "max_length=96", "n_examples=2", "--out", out, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["steps"] == 2 and m["leaked_articles"] == 0
    assert m["articles"] == 2105 and m["laws"] == 18 and m["mcq_n"] == 18 and m["chance"] == 0.25
    assert m["configs_validated"] == 2 and m["gpu_lora_stage3_gb"] < m["gpu_lora_stage0_gb"]
    local = json.loads((out / "ds_cpu_local.json").read_text())
    gpu = json.loads((out / "ds_gpu_zero3.json").read_text())
    assert local["zero_optimization"]["stage"] == 2 and "optimizer" not in local
    assert gpu["zero_optimization"]["stage"] == 3 and gpu["bf16"]["enabled"] is True
    assert gpu["train_batch_size"] == 4 * 8
    assert (out / "run_dist" / "final" / "adapter_config.json").exists()
    report = (out / "report.md").read_text()
    assert "经验教训" in report and "分法律的准确率" in report


def test_lab_names_a_missing_knowledge_base(tmp_path):
    from llmtech import labs

    mod = load_lab_module(LAB, "l306_lab")
    cfg = mod.Config(kb_dir=str(tmp_path / "zh_laws_kb"))
    with pytest.raises(DataError, match=r"zh_laws_kb: law knowledge-base folder not found"):
        mod.main(cfg, labs.LabContext(out=tmp_path, lab_id="L3.06", title=""))
    assert mod.Config().kb_dir == "../shared/data/zh_laws_kb"  # read in place, never copied in
