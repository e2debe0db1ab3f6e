"""L1.01 (SFT loss masking) and L1.03 (Trainer scaffold): helpers on the tiny model, labs on the real one."""

import json

import pytest

from conftest import ROOT, run_script
from llmtech import data, models
from llmtech.evals.lm import encode_chat_example
from llmtech.train.callbacks import loss_figure, read_log, read_tensorboard_scalars
from llmtech.train.sft import SFTSettings, build_trainer, format_loss_mask, loss_token_counts, run_sft

TRAIN = str(ROOT / "data/support/sft_train.jsonl")
TEST = str(ROOT / "data/support/sft_test.jsonl")
L101 = ROOT / "lessons/lesson1/01_sft_basics/sft_theory_notebook.py"
L103 = ROOT / "lessons/lesson1/03_hf_finetune/hf_finetune_scaffold.py"


def settings(tmp_path, name="run", **kw):
    base = dict(model="tiny-llama", train_file=TRAIN, eval_file=None, max_train_samples=8,
                output_dir=str(tmp_path / name), max_length=256, batch_size=4, logging_steps=1,
                save_steps=100, save_final=False, eval_before=False)
    base.update(kw)
    return SFTSettings(**base)


def test_format_loss_mask_wraps_only_the_answer():
    tok = models.load_tokenizer("tiny-llama")
    msgs = models.chat_messages("Where is my parcel?", "It ships tomorrow.")
    ex = encode_chat_example(tok, msgs)
    view = format_loss_mask(tok, ex["input_ids"], ex["target_mask"])
    assert view.count("⟦") == 1 and view.count("⟧") == 1
    inside = view[view.index("⟦") + 1: view.index("⟧")]
    assert inside.startswith("It ships tomorrow.") and "Where is my parcel?" not in inside
    assert view.replace("⟦", "").replace("⟧", "") == tok.decode(ex["input_ids"])
    assert format_loss_mask(tok, ex["input_ids"], [1] * len(ex["input_ids"])).startswith("⟦")
    with pytest.raises(ValueError, match="mask values"):
        format_loss_mask(tok, ex["input_ids"], [1])


def test_loss_token_counts_match_the_chat_template_mask(tmp_path):
    """TRL's response-only labels score exactly the answer tokens encode_chat_example marks."""
    resp = loss_token_counts(build_trainer(settings(tmp_path, "resp")))
    full = loss_token_counts(build_trainer(settings(tmp_path, "full", loss_on="full")))
    tok = models.load_tokenizer("tiny-llama")
    recs = data.load(TRAIN, limit=8)
    expected = sum(sum(encode_chat_example(tok, data.to_messages(r))["target_mask"]) for r in recs)
    assert resp["loss_tokens"] == expected
    assert resp["real_tokens"] == full["real_tokens"] and resp["examples"] == full["examples"] == 8
    assert full["loss_tokens"] == full["real_tokens"] - 8  # every token but each sequence's first
    assert 0.1 < resp["share"] < 0.9 < full["share"] <= 1.0


def test_tensorboard_events_land_in_output_dir_and_read_back(tmp_path):
    s = settings(tmp_path, eval_file=TEST, max_eval_samples=4, max_steps=2, eval_steps=1,
                 tensorboard=True)
    run_sft(s)
    tb_dir = tmp_path / "run" / "tensorboard"
    assert list(tb_dir.glob("events.out.tfevents.*")), "no TensorBoard event file in output_dir/tensorboard"
    scalars = read_tensorboard_scalars(tb_dir)
    assert [st for st, _ in scalars["train/loss"]] == [1, 2]
    jsonl_eval = [r["eval_loss"] for r in read_log(tmp_path / "run/trainer_log.jsonl") if "eval_loss" in r]
    tb_eval = [v for _, v in scalars["eval/loss"]]
    assert len(tb_eval) == len(jsonl_eval) >= 2  # steps 1, 2 (+ run_sft's final evaluate)
    assert tb_eval == pytest.approx(jsonl_eval, abs=1e-5)
    assert read_tensorboard_scalars(tmp_path / "nothing-here") == {}
    fig = loss_figure({"a": tmp_path / "run/trainer_log.jsonl", "b": tmp_path / "run/trainer_log.jsonl"})
    assert len(fig.axes[0].lines) == 4  # train + eval curve per run


def _lab_metrics(script, tmp_path, *overrides):
    r = run_script(script, "--quick", "--out", tmp_path, *overrides, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "report.md").exists()
    return json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))


@pytest.mark.slow
def test_lab_l101_response_only_masking(tmp_path):
    m = _lab_metrics(L101, tmp_path, "train_samples=32", "max_steps=8", "test_samples=12",
                     "answer_tokens=0")
    assert m["model"] == "smollm2-135m" and m["train_steps"] == 8
    assert m["response_loss_after_response_only"] < m["response_loss_before"] - 0.1, m
    assert m["response_loss_after_full_seq"] < m["response_loss_before"], m
    assert m["response_loss_after_response_only"] < m["response_loss_after_full_seq"], m
    assert 0.2 < m["loss_token_share_response_only"] < 0.8 < m["loss_token_share_full_seq"], m
    assert (tmp_path / "loss_curves.png").exists()


@pytest.mark.slow
def test_lab_l103_trainer_scaffold(tmp_path):
    m = _lab_metrics(L103, tmp_path, "max_steps=12", "eval_steps=4", "save_steps=6",
                     "train_samples=48", "eval_samples=12")
    assert m["model"] == "smollm2-135m" and m["train_steps"] == 12
    assert m["eval_points"] == 4  # step 0 (eval_on_start) + steps 4, 8, 12
    assert m["eval_loss_last"] < m["eval_loss_first"] - 0.1, m
    assert m["tensorboard_event_files"] >= 1 and m["tensorboard_scalars"] > 0
    assert m["tensorboard_matches_jsonl"] is True
    assert m["checkpoints"] == 2 and m["checkpoint_names"] == "checkpoint-6,checkpoint-12"
    assert m["train_tokens_per_s"] > 0
    assert (tmp_path / "loss_eval.png").exists()
