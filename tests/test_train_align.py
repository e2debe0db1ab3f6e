"""Preference data loading, reward model, DPO and KTO stages (tiny model; real data files)."""

import json
import math

import pytest
import torch

from conftest import SUPPORT, run_cli, shared_or_skip
from llmtech import models
from llmtech.data.preference import (length_stats, load_pairs, load_unpaired, pairs_to_unpaired,
                                     split_pairs, trl_rows)
from llmtech.errors import ConfigError, DataError, TrainingDiverged
from llmtech.train.align import check_same_tokenizer
from llmtech.train.callbacks import read_log
from llmtech.train.dpo import DPOSettings, build_dpo_trainer, preference_eval, run_dpo
from llmtech.train.kto import KTOSettings, kto_weights, run_kto
from llmtech.train.reward import RewardScorer, RewardSettings, calibration, evaluate_pairs, run_reward

PREF, PREF_TEST, KTO = SUPPORT / "preference.jsonl", SUPPORT / "preference_test.jsonl", SUPPORT / "kto.jsonl"


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _tiny(**kw):
    base = dict(model="tiny-llama", max_steps=2, batch_size=2, logging_steps=1, save_steps=10**6,
                max_length=128, max_train_samples=16, max_eval_samples=8)
    return {**base, **kw}


# --------------------------------------------------------------------------- data

def test_llamafactory_preference_files_load_and_report_real_duplicates():
    lf = shared_or_skip("llamafactory_sft")
    en = load_pairs(lf / "dpo_en_demo.json")
    zh = load_pairs(lf / "dpo_zh_demo.json")
    kto = load_unpaired(lf / "kto_en_demo.json")
    for d in (en, zh):
        assert d.n_read == 300 and len(d.rows) + len(d.problems) == 300
        assert all(p.code == "duplicate" and ".json:" in p.where for p in d.problems)
        r = d.rows[0]
        assert r["prompt"][-1]["role"] == "user" and r["chosen"][0]["role"] == "assistant"
    assert len(en.problems) == 5 and len(zh.problems) == 11  # exact repeats in the public demo sets
    assert len(kto.rows) == 300 and sum(r["label"] for r in kto.rows) == 150
    assert kto.rows[0]["completion"][0]["role"] == "assistant"


def test_project_sample_data_is_clean_and_split():
    train, test, kto = load_pairs(PREF), load_pairs(PREF_TEST), load_unpaired(KTO)
    assert not train.problems and not test.problems and not kto.problems
    assert len(train.rows) + len(test.rows) >= 200
    train_prompts = {r["prompt"][-1]["content"] for r in train.rows}
    assert not train_prompts & {r["prompt"][-1]["content"] for r in test.rows}
    n_d = sum(r["label"] for r in kto.rows)
    assert len(kto.rows) >= 200 and 0 < n_d < len(kto.rows)
    assert {r["meta"]["lang"] for r in train.rows} == {"zh", "en"}


def test_bad_records_are_reported_with_file_and_line(tmp_path):
    f = _jsonl(tmp_path / "p.jsonl", [
        {"prompt": "q1", "chosen": "good", "rejected": "bad"},
        {"prompt": "q2", "chosen": "same", "rejected": "same"},           # tie
        {"prompt": "", "chosen": "a", "rejected": "b"},                   # empty prompt
        {"prompt": "q3", "chosen": "a"},                                  # missing field
        {"prompt": "q1", "chosen": "good", "rejected": "bad"},            # duplicate
        {"prompt": "q4", "completion": "a", "label": True},               # a KTO row in a pair file
        {"conversations": [{"from": "human", "value": "q5"}],            # other layout, same kind
         "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}},
        {"prompt": "q6", "chosen": "fine", "rejected": "worse"},
    ])
    d = load_pairs(f)
    assert [r["prompt"][-1]["content"] for r in d.rows] == ["q1", "q6"]
    got = {p.where.rsplit(":", 1)[1]: p.code for p in d.problems}
    assert got == {"2": "tie", "3": "invalid", "4": "missing_fields", "5": "duplicate",
                   "6": "wrong_format", "7": "mixed_formats"}
    assert "empty" in next(p.reason for p in d.problems if p.where.endswith(":3"))
    with pytest.raises(DataError, match=r"p\.jsonl:2: tie"):
        load_pairs(f, on_bad="error")
    bad_only = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "x", "rejected": "x"}])
    with pytest.raises(DataError, match="no usable preference pairs"):
        load_pairs(bad_only)


def test_pair_helpers():
    rows = load_pairs(PREF).rows
    tr, ev = split_pairs(rows, 0.25, seed=1)
    assert len(tr) + len(ev) == len(rows) and ev
    assert not {repr(r["prompt"]) for r in tr} & {repr(r["prompt"]) for r in ev}
    un = pairs_to_unpaired(rows[:3])
    assert [r["label"] for r in un] == [True, False] * 3 and un[1]["completion"] == rows[0]["rejected"]
    assert set(trl_rows(rows[:2])[0]) == {"prompt", "chosen", "rejected"}
    st = length_stats([{"chosen": [{"content": "aaaa"}], "rejected": [{"content": "aa"}]},
                       {"chosen": [{"content": "a"}], "rejected": [{"content": "aaaa"}]}])
    assert st["chosen_longer_share"] == 0.5 and st["mean_length_ratio"] == pytest.approx((2 + 0.25) / 2)


# --------------------------------------------------------------------------- reward model

def test_calibration_against_definition():
    c = calibration(torch.zeros(4))  # p = 0.5 in both orders: perfectly calibrated, uninformative
    assert c["ece"] == pytest.approx(0.0) and c["brier"] == pytest.approx(0.25)
    assert c["nll"] == pytest.approx(math.log(2))
    m = torch.tensor([2.0, 2.0, -2.0])  # p = σ(2) ≈ 0.881 claimed, but only 2 of 3 won
    p = 1 / (1 + math.exp(-2))
    c = calibration(m, bins=10)
    # orders: (p,1),(p,1),(1-p,0) | (1-p,0),(1-p,0),(p,1): bin of p holds 3 with 2 wins, bin of 1-p 3 with 1
    assert c["ece"] == pytest.approx(0.5 * abs(p - 2 / 3) + 0.5 * abs((1 - p) - 1 / 3))
    assert c["brier"] == pytest.approx((2 * (1 - p) ** 2 + p ** 2) * 2 / 6)


def test_reward_model_trains_saves_and_reloads(tmp_path):
    s = RewardSettings(**_tiny(output_dir=str(tmp_path / "rm"), train_file=str(PREF), eval_file=str(PREF_TEST)))
    res = run_reward(s)
    trainer = res.pop("trainer")
    assert res["global_step"] == 2 and (tmp_path / "rm/trainer_log.jsonl").exists()
    assert (tmp_path / "rm/loss.png").exists() and (tmp_path / "rm/final-merged/config.json").exists()
    for k in ("eval_pairwise_accuracy", "eval_pairwise_accuracy_before", "eval_ece", "eval_reward_length_corr"):
        assert math.isfinite(res[k])
    saved = json.loads((tmp_path / "rm/result.json").read_text())
    assert saved["eval_pairwise_accuracy"] == res["eval_pairwise_accuracy"]
    # the merged folder scores exactly like the trained (adapter) model
    rows = load_pairs(PREF_TEST, limit=8).rows
    live = RewardScorer(trainer.model, trainer.processing_class, 128)
    disk = RewardScorer.load(res["merged_dir"], max_length=128)
    prompts, answers = [r["prompt"] for r in rows], [r["chosen"][0]["content"] for r in rows]
    assert torch.allclose(live.score(prompts, answers), disk.score(prompts, answers), atol=1e-4)
    assert disk(prompts[:2], [[{"role": "assistant", "content": a}] for a in answers[:2]]) == \
        pytest.approx(disk.score(prompts[:2], answers[:2]).tolist())
    ev = evaluate_pairs(disk, rows)
    assert ev["pairs"] == 8 and 0 <= ev["pairwise_accuracy"] <= 1


def test_reward_model_on_llamafactory_chinese_pairs(tmp_path):
    lf = shared_or_skip("llamafactory_sft")
    s = RewardSettings(**_tiny(output_dir=str(tmp_path / "rm"), train_file=str(lf / "dpo_zh_demo.json"),
                               eval_file=None, eval_fraction=0.25, max_length=1024))
    res = run_reward(s)
    assert res["global_step"] == 2 and res["data"]["train"]["read"] == 16
    assert res["data"]["train"]["dropped_over_max_length"] >= 0
    with pytest.raises(DataError, match="every pair is longer than max_length=16"):
        run_reward(RewardSettings(**{**s.model_dump(), "max_length": 16}))


def test_tokenizer_mismatch_is_a_clear_error():
    a = models.load_tokenizer("tiny-llama")
    b = models.load_tokenizer("tiny-llama")
    check_same_tokenizer(a, b)
    b.add_tokens(["<extra_token_x>"])
    with pytest.raises(ConfigError, match="reward model's tokenizer differs from the policy's"):
        check_same_tokenizer(b, a)


def test_unreadable_reward_model_folder(tmp_path):
    from llmtech.errors import ModelNotAvailable

    with pytest.raises(ModelNotAvailable, match="not a reward model folder"):
        RewardScorer.load(tmp_path)


# --------------------------------------------------------------------------- DPO

@pytest.mark.slow
@pytest.mark.parametrize("loss_type,sft_weight", [("ipo", 0.0), ("hinge", 0.0), ("sigmoid", 1.0)])
def test_dpo_losses_train_on_llamafactory_pairs(tmp_path, loss_type, sft_weight):
    lf = shared_or_skip("llamafactory_sft")
    s = DPOSettings(**_tiny(output_dir=str(tmp_path / "dpo"), train_file=str(lf / "dpo_en_demo.json"),
                            eval_file=None, eval_fraction=0.25, loss_type=loss_type, sft_weight=sft_weight,
                            learning_rate=1e-3, max_length=256))
    res = run_dpo(s)
    res.pop("trainer")
    assert res["global_step"] == 2 and math.isfinite(res["train_loss"])
    assert res["eval_reward_margin_before"] == 0.0 and res["eval_reward_accuracy_before"] == 0.5
    assert res["eval_reward_margin"] != 0.0  # the adapter moved the policy away from the reference
    logged = [r for r in read_log(tmp_path / "dpo/trainer_log.jsonl") if "loss" in r]
    assert logged and "rewards/margins" in logged[0]


@pytest.mark.slow
def test_dpo_logged_implicit_rewards_equal_beta_logratio(tmp_path):
    """TRL's eval rewards/chosen|rejected = β·(log πθ − log πref), recomputed by our own code."""
    s = DPOSettings(**_tiny(output_dir=str(tmp_path / "dpo"), train_file=str(PREF), eval_file=str(PREF_TEST),
                            beta=0.3, learning_rate=5e-3, max_steps=3, max_eval_samples=8))
    res = run_dpo(s)
    trainer = res["trainer"]
    logged = trainer.evaluate()
    ours = preference_eval(trainer.model, trainer.processing_class, trainer.llmtech_data["eval"], 0.3, 128)
    bs = trainer.args.per_device_eval_batch_size
    for k in ("chosen", "rejected"):
        x = ours[f"rewards_{k}"]
        batch_mean = torch.stack([x[i:i + bs].mean() for i in range(0, len(x), bs)]).mean()
        assert float(batch_mean) == pytest.approx(logged[f"eval_rewards/{k}"], abs=1e-4)
    assert abs(ours["reward_margin"]) > 1e-6


@pytest.mark.slow
def test_dpo_resume_continues_and_logs_each_step_once(tmp_path):
    kw = _tiny(output_dir=str(tmp_path / "dpo"), train_file=str(PREF), eval_file=None, save_steps=2,
               save_total_limit=None)
    run_dpo(DPOSettings(**{**kw, "max_steps": 2}))
    res = run_dpo(DPOSettings(**{**kw, "max_steps": 4, "resume": True}))
    assert res["resumed_from_step"] == 2 and res["global_step"] == 4
    steps = [r["step"] for r in read_log(tmp_path / "dpo/trainer_log.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4]


def test_dpo_nan_stops_and_keeps_checkpoint(tmp_path):
    model, tok = models.load_lm("tiny-llama")
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    s = DPOSettings(**_tiny(output_dir=str(tmp_path / "dpo"), train_file=str(PREF), eval_file=None,
                            finetuning="full"))
    with pytest.raises(TrainingDiverged, match="diverged at step"):
        run_dpo(s, model=model, tokenizer=tok)


def test_dpo_merge_writes_a_plain_model(tmp_path):
    # with an eval file: the after-training measurement needs the adapter (the reference is
    # the model with it switched off), so merging must come after it
    s = DPOSettings(**_tiny(output_dir=str(tmp_path / "dpo"), train_file=str(PREF),
                            eval_file=str(PREF_TEST), max_eval_samples=4, merge=True,
                            max_steps=1))
    res = run_dpo(s)
    assert "eval_preference_accuracy_before" in res and "eval_preference_accuracy" in res
    merged, _ = models.load_lm(res["merged_dir"])
    assert not hasattr(merged, "peft_config")


# --------------------------------------------------------------------------- KTO

def test_kto_weights_balance_unpaired_data():
    rows = [{"label": True}] * 6 + [{"label": False}] * 4
    s = KTOSettings()
    wd, wu = kto_weights(rows, s)
    assert wd * 6 == pytest.approx(wu * 4) and wd == 1.0
    assert kto_weights(rows, KTOSettings(desirable_weight=2.0)) == (2.0, 1.0)
    with pytest.raises(DataError, match="both desirable and undesirable"):
        kto_weights([{"label": True}] * 3, s)


@pytest.mark.slow
def test_kto_trains_on_own_unpaired_data_and_llamafactory_kto(tmp_path):
    s = KTOSettings(**_tiny(output_dir=str(tmp_path / "kto"), train_file=str(KTO), eval_file=str(PREF_TEST),
                            batch_size=4, max_train_samples=24))
    res = run_kto(s)
    res.pop("trainer")
    rep = res["data"]["train"]
    assert rep["desirable"] + rep["undesirable"] == res["data"]["train"]["kept"]
    assert rep["desirable_weight"] * rep["desirable"] == pytest.approx(rep["undesirable_weight"] * rep["undesirable"])
    assert res["global_step"] == 2 and "eval_preference_accuracy" in res
    lf = shared_or_skip("llamafactory_sft")
    s = KTOSettings(**_tiny(output_dir=str(tmp_path / "kto_lf"), train_file=str(lf / "kto_en_demo.json"),
                            eval_file=None, eval_fraction=0.3, batch_size=4, max_train_samples=40,
                            max_length=256))
    res = run_kto(s)
    assert res["global_step"] == 2


# --------------------------------------------------------------------------- CLI

def test_cli_train_stages(tmp_path):
    r = run_cli("train", "dpo", "model=tiny-llama", f"train_file={PREF}", "eval_file=null", "max_steps=1",
                "max_train_samples=8", "batch_size=2", "max_length=96", f"output_dir={tmp_path / 'd'}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "d/result.json").read_text())["global_step"] == 1
    assert '"global_step": 1' in r.stdout
    r = run_cli("train", "rm", "beta=0.1")
    assert r.returncode == 2 and "unknown config key 'beta'" in r.stderr and "Traceback" not in r.stderr
    bad = _jsonl(tmp_path / "ties.jsonl", [{"prompt": "q", "chosen": "x", "rejected": "x"}])
    r = run_cli("train", "kto", "model=tiny-llama", f"train_file={bad}", "on_bad=error")
    assert r.returncode == 2 and f"{bad}:1" in r.stderr and "Traceback" not in r.stderr


def test_dpo_trainer_uses_reference_without_second_model(tmp_path):
    s = DPOSettings(**_tiny(output_dir=str(tmp_path / "dpo"), train_file=str(PREF), eval_file=None))
    t = build_dpo_trainer(s)
    assert t.ref_model is None and hasattr(t.model, "disable_adapter")


def test_staged_dir_replaces_only_when_complete(tmp_path):
    from llmtech.io import staged_dir

    dest = tmp_path / "final"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_dir(dest) as tmp:
            (tmp / "half.txt").write_text("partial")
            raise RuntimeError("killed while saving")
    assert [p.name for p in dest.iterdir()] == ["old.txt"] and not tmp.exists()
    with staged_dir(dest) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in dest.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no .tmp / .old left behind
