"""`llmtech demo` (llmtech.pipeline): every stage on the tiny random model, and failures that name
their stage."""

import json
import math
import socket
from pathlib import Path
from urllib.parse import urlparse

import pytest

from llmtech import pipeline

from conftest import SUPPORT, run_cli

TINY = dict(model="tiny-llama", sft_steps=2, sft_batch=2, sft_eval_samples=4, dpo_steps=2,
            dpo_eval_samples=4, questions=4, unanswerable=2, max_tokens=8, max_length=128)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    metrics = pipeline.run_pipeline(pipeline.PipelineConfig(**TINY), out)
    return out, metrics


def share(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0


@pytest.mark.slow
def test_every_stage_is_measured(tiny_run):
    out, m = tiny_run
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8")) == m
    assert all(v is None or isinstance(v, (int, float, str, bool)) for v in m.values())
    for stage in ("sft", "dpo", "index", "serve", "answer", "stop", "baseline"):
        assert m[f"seconds_{stage}"] > 0, stage
    assert m["total_seconds"] >= sum(m[f"seconds_{s}"] for s in ("sft", "dpo", "index"))

    # 1 SFT: held-out response loss before/after, finite; merged model folder
    assert m["sft_steps"] == 2 and m["sft_eval_examples"] == 4
    for k in ("sft_eval_loss_before", "sft_eval_loss_after", "sft_train_loss"):
        assert math.isfinite(m[k]) and m[k] > 0, k
    assert (out / "sft" / "merged" / "config.json").exists()
    # 2 DPO from the SFT model: held-out preference accuracy; the final model is a plain folder
    assert m["dpo_steps"] == 2 and m["dpo_eval_pairs"] == 4
    for k in ("dpo_pref_acc_before", "dpo_pref_acc_after", "dpo_reward_accuracy"):
        assert share(m[k]), k
    assert math.isfinite(m["dpo_train_loss"]) and math.isfinite(m["dpo_reward_margin"])
    final = Path(m["final_model"])
    assert final == out / "dpo" / "merged" and (final / "config.json").exists()
    # 3 index: every knowledge-base document, and the service found nothing left to index
    assert m["index_documents"] == len([p for p in (SUPPORT / "kb").iterdir() if p.is_file()])
    assert m["index_chunks"] >= m["index_documents"] and m["index_seconds"] > 0
    # 4-6 for the aligned model and the base model, the same questions
    assert (m["questions"], m["questions_unanswerable"], m["questions_zh"]) == (4, 2, 2)
    for side in ("aligned", "base"):
        for k in ("answer_acc", "answer_acc_zh", "answer_acc_en", "refusal_acc",
                  "refused_unanswerable", "false_refusal", "cited_share", "retrieval_hit_at_4"):
            assert share(m[f"{side}_{k}"]), f"{side}_{k}"
        # defined only when something was cited
        assert share(m[f"{side}_citation_acc"]) or (m[f"{side}_citation_acc"] is None
                                                    and m[f"{side}_cited_share"] == 0)
        assert m[f"{side}_cited_flags_agree"] is True
        assert 0 < m[f"{side}_latency_p50_s"] <= m[f"{side}_latency_p95_s"]
        assert m[f"{side}_tokens_per_s"] > 0
        assert m[f"{side}_index_reused"] is True
        assert m[f"{side}_service_stopped"] is True
        port = urlparse(m[f"{side}_service_url"]).port
        with socket.socket() as s:  # stopped: its port refuses connections
            s.settimeout(2)
            assert s.connect_ex(("127.0.0.1", port)) != 0
    assert m["aligned_service_url"] != m["base_service_url"]
    assert "tiny-llama" in m["compared"]


@pytest.mark.slow
def test_answers_and_report(tiny_run):
    out, m = tiny_run
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [r["model"] for r in rows] == ["aligned"] * 4 + ["base"] * 4
    assert [r["id"] for r in rows[:4]] == [r["id"] for r in rows[4:]]
    gold = {json.loads(line)["id"]: json.loads(line)
            for line in (SUPPORT / "eval_qa.jsonl").read_text().splitlines()}
    for r in rows:
        assert r["gold"] == gold[r["id"]]["answer"]
        assert r["retrieved_docs"] and r["latency_s"] > 0
        assert r["correct"] is False or r["gold"]  # an unanswerable question is never "correct"
    # the aligned answers' accuracy is the share of correct rows among the answerable ones
    answerable = [r for r in rows[:4] if r["gold"]]
    assert m["aligned_answer_acc"] == pytest.approx(
        sum(r["correct"] for r in answerable) / len(answerable), abs=1e-4)
    report = (out / "report.md").read_text(encoding="utf-8")
    for text in ("### 各阶段", "response loss", "偏好准确率", "答案准确率", "引用准确率",
                 "延迟 p95", "对齐后 SFT+DPO", "起点模型 tiny-llama", m["compared"]):
        assert text in report, text
    stage_lines = [line for line in report.splitlines() if line.startswith("| ")]
    for label in ("1 sft", "2 dpo", "3 index", "4 serve", "5 answer", "6 stop", "7 baseline"):
        assert any(line.startswith(f"| {label} |") for line in stage_lines), label
    assert (out / "serve_aligned.log").exists() and (out / "serve_base.log").exists()


def test_questions_are_balanced():
    cfg = pipeline.PipelineConfig(questions=10, unanswerable=4,
                                  qa_file=str(SUPPORT / "eval_qa.jsonl"))
    qs = pipeline.load_questions(cfg)
    assert len(qs) == 10 and sum(not q["answer"] for q in qs) == 4
    assert sum(q["lang"] == "zh" for q in qs) == 5
    assert qs == pipeline.load_questions(cfg)  # same seed, same questions
    assert len(pipeline.load_questions(cfg.model_copy(update={"questions": 0}))) == 128


def test_full_settings_and_overrides(tmp_path):
    quick = pipeline.settings()
    full = pipeline.settings(full=True)
    assert full.questions == 0
    assert full.sft_steps > quick.sft_steps and full.dpo_steps > quick.dpo_steps
    assert full.sft_eval_samples is None and full.dpo_eval_samples is None
    yaml_file = tmp_path / "demo.yaml"
    yaml_file.write_text("questions: 6\ncompare_base: false\n", encoding="utf-8")
    cfg = pipeline.settings(True, yaml_file, ["unanswerable=2"])
    assert (cfg.questions, cfg.compare_base, cfg.unanswerable, cfg.dpo_steps) == \
        (6, False, 2, full.dpo_steps)


def test_missing_file_fails_before_training(tmp_path):
    missing = tmp_path / "nope.jsonl"
    r = run_cli("demo", "--out", tmp_path / "out", "model=tiny-llama",
                f"pref_train_file={missing}", timeout=120)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stage 2 (dpo)" in errors[0] and str(missing) in errors[0]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "sft").exists()  # nothing was trained


def test_bad_data_fails_in_its_stage(tmp_path):
    bad = tmp_path / "sft_bad.jsonl"
    good = (SUPPORT / "sft_train.jsonl").read_text(encoding="utf-8").splitlines()[0]
    bad.write_text(good + "\n{not json\n", encoding="utf-8")
    with pytest.raises(pipeline.PipelineError) as e:
        pipeline.run_pipeline(pipeline.PipelineConfig(**{**TINY, "sft_train_file": str(bad)}),
                              tmp_path / "out")
    msg = str(e.value)
    assert msg.startswith("stage 1 (sft) failed:") and "sft_bad.jsonl:2" in msg
    assert "\n" not in msg
    assert (tmp_path / "out" / "error.log").exists()


def test_unknown_setting_is_a_config_error(tmp_path):
    r = run_cli("demo", "--out", tmp_path, "sft_stepz=3", timeout=60)
    assert r.returncode != 0 and "sft_stepz" in r.stderr and "Traceback" not in r.stderr
