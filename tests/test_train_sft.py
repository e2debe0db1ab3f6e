import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run_cli
from llmtech.errors import TrainingDiverged
from llmtech.train.callbacks import read_log
from llmtech.train.sft import SFTSettings, run_sft

TRAIN = str(ROOT / "data/support/sft_train.jsonl")
TEST = str(ROOT / "data/support/sft_test.jsonl")


def settings(tmp_path, **kw):
    base = dict(model="tiny-llama", train_file=TRAIN, eval_file=TEST, max_train_samples=16,
                max_eval_samples=8, output_dir=str(tmp_path / "run"), max_length=96, batch_size=4,
                logging_steps=1, save_steps=100, eval_before=True)
    base.update(kw)
    return SFTSettings(**base)


def test_full_finetune_loss_falls_and_logs(tmp_path):
    s = settings(tmp_path, finetuning="full", learning_rate=3e-3, max_steps=24, eval_file=None,
                 lr_scheduler="constant")
    r = run_sft(s)
    rows = [x for x in read_log(tmp_path / "run/trainer_log.jsonl") if "loss" in x]
    first, last = rows[0]["loss"], sum(x["loss"] for x in rows[-4:]) / 4
    assert last < first - 1.0, (first, last)
    assert (tmp_path / "run/loss.png").exists()
    assert (tmp_path / "run/final/config.json").exists()
    assert r["tokens_seen"] > 0 and r["global_step"] == 24


def test_lora_trains_only_adapters(tmp_path):
    r = run_sft(settings(tmp_path, max_steps=2))
    assert 0 < r["trainable_params"] < r["total_params"] / 10
    assert (tmp_path / "run/final/adapter_config.json").exists()
    assert r["eval_loss_before"] > 0 and r["eval_loss_after"] > 0


def test_response_only_masks_prompt(tmp_path):
    trainer = run_sft(settings(tmp_path, max_steps=1, save_final=False))["trainer"]
    labels = trainer.train_dataset[0]["labels"]
    n_masked = sum(1 for x in labels if x == -100)
    assert n_masked > 10 and len(labels) - n_masked > 0
    # the prompt is masked, the response (ending with EOS) is learned
    assert labels[-1] != -100 or trainer.train_dataset[0]["input_ids"][-1] != 2
    full = run_sft(settings(tmp_path, max_steps=1, save_final=False, loss_on="full",
                            output_dir=str(tmp_path / "full")))["trainer"]
    assert sum(1 for x in full.train_dataset[0]["labels"] if x == -100) < n_masked


def test_nan_guard_stops_with_clear_message(tmp_path, tiny):
    from llmtech import models

    model, tok = models.load_lm("tiny-llama")
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    s = settings(tmp_path, finetuning="full", max_steps=5, eval_file=None)
    with pytest.raises(TrainingDiverged, match="training diverged at step"):
        run_sft(s, model=model, tokenizer=tok)


def test_cli_bad_inputs_exit_cleanly(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n', encoding="utf-8")
    r = run_cli("train", "sft", "model=tiny-llama", f"train_file={bad}", "eval_file=null")
    assert r.returncode == 2 and f"{bad}:2: malformed JSON" in r.stderr and "Traceback" not in r.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    r = run_cli("train", "sft", "model=tiny-llama", f"train_file={empty}")
    assert r.returncode == 2 and "empty" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("train", "sft", "lr=0.1")
    assert r.returncode == 2 and "unknown config key 'lr'" in r.stderr
    r = run_cli("train", "sft", "model=hf:nobody/nothing", f"train_file={TRAIN}")
    assert r.returncode == 2 and "hf download nobody/nothing" in r.stderr and "Traceback" not in r.stderr


def test_kill_and_resume_continues_from_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "llmtech.cli", "train", "sft", "model=tiny-llama", f"train_file={TRAIN}",
            "eval_file=null", "max_train_samples=64", "max_steps=60", "save_steps=4", "save_total_limit=null",
            "logging_steps=1", "batch_size=2", "max_length=64", f"output_dir={out}"]
    p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not (out / "checkpoint-8/trainer_state.json").exists():
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (out / "checkpoint-8").exists(), "no checkpoint appeared before the kill"
    assert not (out / "result.json").exists(), "the run finished before it could be killed"
    # a checkpoint folder left half-written by the kill must not be picked for resuming
    (out / "checkpoint-999").mkdir()
    r = subprocess.run(args + ["resume=true"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "result.json").read_text())
    assert res["resumed_from_step"] >= 8 and res["global_step"] == 60
    steps = [x["step"] for x in read_log(out / "trainer_log.jsonl") if "loss" in x]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # no step logged twice
    assert steps[0] == 1 and len(steps) == 60  # and none lost


@pytest.mark.slow
def test_real_model_lora_eval_loss_falls(tmp_path):
    """SmolLM2-135M + LoRA on the project's customer-service data: held-out loss must fall."""
    s = SFTSettings(model="smollm2-135m", train_file=TRAIN, eval_file=TEST, max_train_samples=48,
                    max_eval_samples=12, output_dir=str(tmp_path / "real"), max_length=128,
                    batch_size=4, max_steps=12, learning_rate=5e-4, logging_steps=2, save_steps=100)
    r = run_sft(s)
    assert r["eval_loss_after"] < r["eval_loss_before"] - 0.1, r
