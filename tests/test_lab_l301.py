"""L3.01 ZeRO-3 configurator: generated configs, torchrun launches, and a real 2-process ZeRO-3
run whose loss curve matches the single-process one (the distributed test CI runs)."""

import json

import pytest

from conftest import ROOT, run_script

from llmtech.dist import zero
from llmtech.dist.launch import LaunchFailed, command, launch_sft
from llmtech.errors import ConfigError
from llmtech.train.sft import SFTSettings

LAB = ROOT / "lessons/lesson3/01_distributed_training/zero3_configurator.py"


def test_command_uses_torchrun_for_several_processes(tmp_path):
    one = command(tmp_path / "s.yaml", 1)
    assert one[1:5] == ["-m", "llmtech.cli", "train", "sft"]
    two = command(tmp_path / "s.yaml", 2, port=29501)
    assert two[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "2"]
    assert "29501" in two and two[-5:-1] == ["llmtech.cli", "train", "sft", "--config"]


def test_failed_launch_reports_the_log(tmp_path):
    s = SFTSettings(model="tiny-llama", train_file=str(tmp_path / "missing.jsonl"), eval_file=None,
                    output_dir=str(tmp_path / "run"), max_steps=1)
    with pytest.raises(LaunchFailed, match=r"(?s)exited with code [12].*missing.jsonl: data file not found"):
        launch_sft(s, nproc=1, timeout=300)
    assert (tmp_path / "run" / "launch.log").exists() and not (tmp_path / "run" / "result.json").exists()


def test_inconsistent_batch_names_the_three_numbers():
    cfg = zero.zero_config(3, micro_batch=2, grad_accum=4, world_size=8, hidden_size=576)
    cfg["train_batch_size"] = 32
    with pytest.raises(ConfigError, match=r"train_batch_size 32 != .*micro.* 2 × .*accumulation.* 4 × world_size 8"):
        zero.validate_ds_config(cfg, 8, "ds.json")


def test_lab_two_process_zero3_matches_single_process(tmp_path):
    out = tmp_path / "l301"
    r = run_script(LAB, "--quick", "model=tiny-llama", "steps=4", "max_length=64", "--out", out,
                   timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["steps"] == 4
    assert m["curves_match"] is True and m["loss_max_rel_diff"] < 1e-3
    assert m["configs_validated"] == 5 and m["estimator_max_rel_diff"] < 1e-6
    assert "train_batch_size 32" in m["bad_batch_error"]
    assert m["model_states_mb_zero3"] * 2 == pytest.approx(m["model_states_mb_single"], abs=2)
    cpu = json.loads((out / "cpu_zero3.json").read_text())
    assert cpu["zero_optimization"]["stage"] == 3 and "optimizer" not in cpu
    assert cpu["zero_optimization"]["reduce_bucket_size"] == 64 * 64  # tiny-llama: hidden 64
    result = json.loads((out / "run_zero3" / "result.json").read_text())
    assert result["world_size"] == 2 and len(result["peak_rss_mb_per_rank"]) == 2
    assert (out / "loss_single_vs_zero3.png").exists()


def test_deepspeed_run_evaluates_before_and_after(tmp_path):
    # under DeepSpeed an evaluate() before train() leaves the Trainer without its training engine;
    # run_sft evaluates at the start of training instead (eval_on_start)
    ds = zero.zero_config(3, bf16=False, micro_batch=2, world_size=2, hidden_size=64)
    ds.pop("optimizer")
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    s = SFTSettings(model="tiny-llama", train_file=str(ROOT / "data/support/sft_train.jsonl"),
                    eval_file=str(ROOT / "data/support/sft_test.jsonl"), max_eval_samples=4,
                    max_steps=2, max_length=64, batch_size=2, bf16=False, save_steps=10**6,
                    output_dir=str(tmp_path / "run"), deepspeed=str(tmp_path / "ds.json"))
    r = launch_sft(s, nproc=2, timeout=600)
    assert r["world_size"] == 2 and r["eval_loss_before"] > 0 and r["eval_loss_after"] > 0
    assert (tmp_path / "run" / "final" / "adapter_config.json").exists()  # LoRA saved from rank 0
