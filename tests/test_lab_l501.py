"""L5.01 resumable alignment workflow (llmtech.workflow) and the GGUF export it uses: every stage
on tiny-llama, a second run that skips everything, a run interrupted mid-stage that resumes
without redoing finished stages, a changed setting that re-runs only its downstream stages."""

import json

import numpy as np
import pytest

from conftest import ROOT, SUPPORT, load_lab_module
from llmtech import labs, workflow
from llmtech.compress import gguf_export
from llmtech.errors import ConfigError, DataError

TINY = dict(model="tiny-llama", sft_steps=2, sft_batch=2, sft_eval_samples=4, dpo_steps=2,
            dpo_eval_samples=4, questions=2, unanswerable=1, max_tokens=8, max_length=128,
            eval_samples=4, gguf_type="f32")


def cfg(**kw):
    return workflow.WorkflowConfig(**{**TINY, **kw})


LAB = ROOT / "lessons/lesson5/01_qwen_workflow/qwen_alignment_workflow.py"


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """The lab in quick mode on tiny-llama (it runs the workflow twice); its workflow folder."""
    out = tmp_path_factory.mktemp("l501")
    lab = load_lab_module(LAB, "l501")
    labs.run(lab.main, lab.Config, argv=[
        "--quick", "--out", str(out), "model=tiny-llama", "sft_steps=2", "dpo_steps=2",
        "questions=2", "unanswerable=1", "eval_samples=4", "gguf_type=f32"])
    lab_m = json.loads((out / "metrics.json").read_text())
    state = json.loads((out / "workflow" / workflow.STATE_FILE).read_text())
    m = {k: v for rec in state["stages"].values() for k, v in rec["metrics"].items()}
    return out / "workflow", {**m, **{f"lab_{k}": v for k, v in lab_m.items()}}


@pytest.mark.slow
def test_every_stage_runs_and_reports(first_run):
    out, m = first_run
    assert m["lab_second_run_ran"] == 0 and m["lab_second_run_skipped"] == len(workflow.STAGES)
    assert m["lab_serve_questions"] == 2 and m["lab_gguf_max_abs_logit_diff"] < 1e-3
    assert m["sft_records_out"] <= m["sft_records_in"] and m["pref_pairs_out"] > 0
    assert m["sft_eval_loss_after"] > 0 and 0 <= m["dpo_pref_acc_after"] <= 1
    assert m["response_loss_start"] > 0 and m["response_loss_final"] > 0
    # f32 GGUF read back by transformers gives the same logits as the merged folder
    assert m["gguf_max_abs_logit_diff"] < 1e-3 and m["gguf_tokenizer_same"] is True
    assert m["serve_questions"] == 2 and m["serve_service_stopped"] is True
    assert m["serve_index_reused"] is True  # the service used the index stage's knowledge base
    state = json.loads((out / workflow.STATE_FILE).read_text())
    assert set(state["stages"]) == set(workflow.STAGES)
    assert "dpo" in (out / "report.md").read_text()


@pytest.mark.slow
def test_unchanged_run_skips_and_changed_setting_reruns_downstream(first_run):
    out, m = first_run
    lab_cfg = workflow.WorkflowConfig.model_validate(json.loads((out / "workflow_config.json").read_text()))
    again = workflow.run_workflow(lab_cfg, out)
    assert again["stages_ran"] == 0 and again["stages_skipped"] == len(workflow.STAGES)
    assert again["sft_eval_loss_after"] == m["sft_eval_loss_after"]  # recorded metrics reused
    started = []

    def stop_at_serve(name):
        started.append(name)
        if name == "serve":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        workflow.run_workflow(lab_cfg.model_copy(update={"dpo_beta": 0.3, "export_gguf": False}), out,
                              on_stage=stop_at_serve)
    assert started == ["dpo", "eval", "export", "serve"]  # data, sft, index unchanged: skipped


@pytest.mark.slow
def test_interrupted_stage_is_redone_and_finished_ones_are_not(tmp_path):
    c = cfg(export_gguf=False)

    def stop_at_dpo(name):
        if name == "dpo":
            (tmp_path / "dpo").mkdir()
            (tmp_path / "dpo" / "half-written").write_text("x")
            raise KeyboardInterrupt  # Ctrl-C in the middle of the stage

    with pytest.raises(KeyboardInterrupt):
        workflow.run_workflow(c, tmp_path, on_stage=stop_at_dpo)
    state = json.loads((tmp_path / workflow.STATE_FILE).read_text())
    assert set(state["stages"]) == {"data", "sft"}
    started = []

    def stop_at_index(name):
        started.append(name)
        if name == "index":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        workflow.run_workflow(c, tmp_path, on_stage=stop_at_index)
    assert started == ["dpo", "eval", "export", "index"]  # data and sft were not redone
    assert not (tmp_path / "dpo" / "half-written").exists()
    state = json.loads((tmp_path / workflow.STATE_FILE).read_text())
    assert set(state["stages"]) == {"data", "sft", "dpo", "eval", "export"}


def test_keys_follow_settings_inputs_and_upstream(tmp_path):
    a = cfg()
    keys = {}
    for s in ("data", "sft"):
        keys[s] = workflow.stage_key(s, a, keys)
    assert workflow.stage_key("sft", a, keys) == keys["sft"]
    assert workflow.stage_key("sft", cfg(sft_steps=3), keys) != keys["sft"]
    assert workflow.stage_key("sft", a, {"data": "other"}) != keys["sft"]
    assert workflow.stage_key("sft", cfg(dpo_steps=9), keys) == keys["sft"]  # not its setting
    copy = tmp_path / "qa.jsonl"
    copy.write_bytes((SUPPORT / "eval_qa.jsonl").read_bytes())
    assert workflow.stage_key("data", cfg(qa_file=str(copy)), {}) == keys["data"]  # same content
    copy.write_bytes(copy.read_bytes() + b"\n")
    assert workflow.stage_key("data", cfg(qa_file=str(copy)), {}) != keys["data"]


def test_bad_state_file_and_bad_inputs_are_named(tmp_path):
    (tmp_path / workflow.STATE_FILE).write_text("{not json")
    with pytest.raises(workflow.WorkflowError, match="workflow_state.json: not a workflow state file"):
        workflow.run_workflow(cfg(), tmp_path)
    assert (tmp_path / workflow.STATE_FILE).read_text() == "{not json"  # never overwritten
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    with pytest.raises(workflow.WorkflowError, match=r"stage 1 \(data\) failed: .*bad.jsonl:2"):
        workflow.run_workflow(cfg(sft_train_file=str(bad)), tmp_path / "o")


def test_gguf_permutation_and_errors(tmp_path):
    w = np.arange(4 * 2 * 3, dtype=np.float32).reshape(2 * 4, 3)  # 2 heads x 4 rows
    p = gguf_export.permute_qk(w, 2)
    # head 0 rows [0,1 | 2,3] -> interleaved [0,2,1,3]
    assert p[:4, 0].tolist() == [w[0, 0], w[2, 0], w[1, 0], w[3, 0]]
    assert sorted(p.ravel().tolist()) == sorted(w.ravel().tolist())
    with pytest.raises(DataError, match="no config.json"):
        gguf_export.export_gguf(tmp_path, tmp_path / "x.gguf")
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not supported"):
        gguf_export.export_gguf(tmp_path, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_q8_gguf_of_the_tiny_model_reloads(tmp_path, tiny):
    model, tok = tiny
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    r = gguf_export.export_gguf(tmp_path / "hf", tmp_path / "g" / "m.gguf", "q8_0")
    assert r["bytes"] < 0.5 * r["source_bytes"]  # 8.5 bits per weight vs 32
    v = gguf_export.verify_gguf(r["path"], tmp_path / "hf")
    assert v["tokenizer_same"] and v["same_argmax"] >= 0.9 and 0 < v["max_abs_diff"] < 0.5
    assert not list((tmp_path / "g").glob("*.partial"))


def test_cli_names_unknown_keys_and_bad_state(tmp_path):
    from conftest import run_cli

    r = run_cli("workflow", "--out", tmp_path / "o", "sft_stepz=3")
    assert r.returncode == 2 and "sft_stepz" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "o").mkdir(exist_ok=True)
    (tmp_path / "o" / workflow.STATE_FILE).write_text("[]")
    r = run_cli("workflow", "--out", tmp_path / "o")
    assert r.returncode != 0 and "not a workflow state file" in r.stderr and "Traceback" not in r.stderr


def test_failed_gguf_write_leaves_no_file(tmp_path, tiny):
    from unittest import mock

    import gguf

    model, tok = tiny
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    with mock.patch.object(gguf.GGUFWriter, "write_tensors_to_file", side_effect=OSError("disk full")):
        with pytest.raises(OSError, match="disk full"):
            gguf_export.export_gguf(tmp_path / "hf", tmp_path / "g" / "m.gguf", "f32")
    assert list((tmp_path / "g").iterdir()) == []  # no m.gguf, no m.gguf.partial
