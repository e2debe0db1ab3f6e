"""L4.02 RLHF pipeline (SFT -> reward model -> PPO): structure of a run on the tiny model."""

import json
import math

import pytest

from conftest import ROOT, run_script

LAB = ROOT / "lessons/lesson4/02_rlhf_pipeline/rlhf_pipeline.py"


@pytest.mark.slow
def test_lab_rlhf_pipeline_tiny(tmp_path):
    r = run_script(LAB, "--quick", "--out", tmp_path, "model=tiny-llama", "sft_steps=2", "rm_steps=2",
                   "rm_batch=2", "pref_test_file=null", "rm_eval_fraction=0.1", "ppo_steps=2",
                   "rollout_batch=4", "mini_batch=2", "max_new_tokens=6", "eval_prompts=4", "n_examples=2",
                   timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["model"] == "tiny-llama" and m["ppo_steps"] == 2 and m["eval_prompts"] == 4
    for key in ("rm_pairwise_accuracy", "score_sft", "score_ppo", "score_gain", "kl_to_sft",
                "win_rate_ppo_vs_sft", "wall_sft_s", "wall_rm_s", "wall_ppo_s"):
        assert isinstance(m[key], (int, float)) and math.isfinite(m[key]), key
    assert 0.0 <= m["rm_pairwise_accuracy"] <= 1.0
    assert m["ppo_beats_sft"] == (m["score_ppo"] > m["score_sft"])
    assert m["headline"].split(",")[-1] == "ppo_beats_sft"
    assert (tmp_path / "ppo_curves.png").stat().st_size > 0
    assert (tmp_path / "ppo" / "trainer_log.jsonl").exists() and (tmp_path / "sft_model" / "config.json").exists()
    assert "奖励模型" in (tmp_path / "report.md").read_text()
    bad = run_script(LAB, "--quick", "--out", tmp_path / "bad", "no_such_key=1", timeout=120)
    assert bad.returncode == 2 and "no_such_key" in bad.stderr and "Traceback" not in bad.stderr
