"""Labs L4.01, L4.03, L4.04 run end to end (tiny model, few steps: structure and checks, not effects).

The effects on the bundled model are measured by running the labs with --quick (numbers in
lessons/lesson4/README.md)."""

import json
import math

import pytest

from conftest import ROOT, run_script

L4 = ROOT / "lessons" / "lesson4"


def _metrics(tmp_path):
    return json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))


@pytest.mark.slow
def test_l403_reward_model_lab(tmp_path):
    r = run_script(L4 / "03_reward_model_training/train_reward_model.py", "--quick", "--out", tmp_path,
                   "model=tiny-llama", "steps=3", "max_length=128", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = _metrics(tmp_path)
    assert m["eval_pairs"] == 74 and m["train_pairs"] == 172 and m["skipped_records"] == 0
    for k in ("pairwise_accuracy", "length_baseline_accuracy", "ece", "reward_length_corr"):
        assert math.isfinite(m[k])
    assert m["reload_matches"] is True  # the merged folder on disk scores like the trained model
    assert (tmp_path / "reward_model.png").exists()


@pytest.mark.slow
def test_l404_dpo_lab_checks_implicit_rewards(tmp_path):
    r = run_script(L4 / "04_dpo/dpo_train.py", "--quick", "--out", tmp_path, "model=tiny-llama", "steps=2",
                   "max_eval_samples=8", "betas=[0.1,0.5]", "max_length=128", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = _metrics(tmp_path)
    assert m["toy_optimum_beats_perturbed"] is True
    assert m["toy_reward_reconstruction_err"] < 1e-9 and m["toy_bt_prob_err"] < 1e-9
    assert m["implicit_reward_check"] is True and m["implicit_reward_max_abs_diff"] < 1e-4
    assert {"beta0.1_reward_margin", "beta0.5_reward_margin"} <= set(m)
    r = run_script(L4 / "04_dpo/dpo_train.py", "--quick", "--out", tmp_path / "bad", "model=tiny-llama",
                   "main_beta=0.3")
    assert r.returncode == 2 and "main_beta=0.3 must be one of" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_l401_compare_methods_lab(tmp_path):
    r = run_script(L4 / "01_alignment_overview/compare_methods.py", "--quick", "--out", tmp_path,
                   "model=tiny-llama", "rm_steps=2", "dpo_steps=2", "kto_steps=2", "ppo_steps=1",
                   "eval_pairs=8", "eval_prompts=4", "max_new_tokens=8", "max_length=128", "rollout_batch=4",
                   timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    m = _metrics(tmp_path)
    for method in ("sft", "ppo", "dpo", "kto"):
        for k in ("pref_acc", "rm_score", "win_rate_vs_sft", "kl_to_sft"):
            assert math.isfinite(m[f"{method}_{k}"]), (method, k)
    assert m["sft_kl_to_sft"] == 0.0 and m["sft_win_rate_vs_sft"] == 0.5
    assert m["dpo_train_s"] > 0 and m["ppo_train_s"] > 0
    assert (tmp_path / "tradeoff.png").exists()
