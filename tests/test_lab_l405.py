"""Several LoRA adapters (llmtech.train.adapters) and the incremental-LoRA lab L4.05."""

import json
import math

import pytest
import torch
from peft import get_peft_model

from conftest import ROOT, run_script, shared_or_skip
from llmtech import models
from llmtech.errors import ConfigError, DataError
from llmtech.evals import lm
from llmtech.train import adapters, lora
from llmtech.train.sft import SFTSettings

TEXTS = ["S1 找不到充电座怎么办？", "How do I connect the S1 to Wi-Fi?"]
LAB = ROOT / "lessons/lesson4/05_incremental_learning/incremental_lora.py"


def _randomize(pm, name, seed, std=0.05):
    g = torch.Generator().manual_seed(seed)
    for layer in adapters.lora_layers(pm).values():
        if name in layer.lora_A:
            for w in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                w.data = torch.randn(w.shape, generator=g) * std


def _model(ranks=(("x", 4), ("y", 4)), alpha_per_r=2, targets=("q_proj", "v_proj")):
    """tiny-llama with LoRA adapters of the given names/ranks, all with non-zero random A and B."""
    base, tok = models.load_lm("tiny-llama")
    pm = None
    for i, (name, r) in enumerate(ranks):
        cfg = lora.lora_config(lora.LoraSettings(r=r, alpha=alpha_per_r * r, dropout=0.0,
                                                 target_modules=list(targets)))
        if pm is None:
            pm = get_peft_model(base, cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
        _randomize(pm, name, seed=10 + i)
    pm.set_adapter(ranks[0][0])
    return pm, tok


def _weighted_sum(pm, names, weights):
    ds = [adapters.delta_weights(pm, n) for n in names]
    return {k: sum(w * d[k] for w, d in zip(weights, ds)) for k in ds[0]}


def test_cat_merge_is_the_exact_weighted_sum_of_delta_w():
    pm, _ = _model()
    adapters.merge_adapters(pm, ["x", "y"], [0.7, -0.4], "cat", "m")
    merged, expected = adapters.delta_weights(pm, "m"), _weighted_sum(pm, ["x", "y"], [0.7, -0.4])
    assert set(merged) == set(expected) and len(merged) == 2 * 2  # q, v in 2 layers
    for k in merged:
        torch.testing.assert_close(merged[k], expected[k], rtol=1e-5, atol=1e-6)
    assert pm.peft_config["m"].r == 8  # ranks add up


def test_linear_merge_follows_its_factor_definition_and_has_cross_terms():
    pm, _ = _model()
    weights = [0.6, 0.9]
    adapters.merge_adapters(pm, ["x", "y"], weights, "linear", "lin")
    merged, wsum = adapters.delta_weights(pm, "lin"), _weighted_sum(pm, ["x", "y"], weights)
    layers = adapters.lora_layers(pm)
    for k in merged:
        by_definition = adapters.factor_merge_delta(layers[k], ["x", "y"], weights)
        torch.testing.assert_close(merged[k], by_definition, rtol=1e-5, atol=1e-6)
        # independent adapters: B_x·A_y and B_y·A_x do not vanish, so linear != Σ w·ΔW
        assert float((merged[k] - wsum[k]).norm()) > 0.1 * float(wsum[k].norm())


def test_linear_merge_equals_weighted_sum_when_adapters_use_disjoint_rank_slots():
    pm, _ = _model()
    for layer in adapters.lora_layers(pm).values():  # x lives in rank slots 0-1, y in slots 2-3
        layer.lora_A["x"].weight.data[2:] = 0
        layer.lora_B["x"].weight.data[:, 2:] = 0
        layer.lora_A["y"].weight.data[:2] = 0
        layer.lora_B["y"].weight.data[:, :2] = 0
    adapters.merge_adapters(pm, ["x", "y"], [0.5, 2.0], "linear", "lin")
    merged, wsum = adapters.delta_weights(pm, "lin"), _weighted_sum(pm, ["x", "y"], [0.5, 2.0])
    for k in merged:
        assert float(wsum[k].abs().max()) > 1e-3
        torch.testing.assert_close(merged[k], wsum[k], rtol=1e-5, atol=1e-6)


def test_merge_preconditions_are_clear_errors():
    pm, _ = _model(ranks=(("x", 4), ("y", 4), ("z", 2)))
    with pytest.raises(ConfigError, match="unknown merge method 'avg'"):
        adapters.merge_adapters(pm, ["x", "y"], [1, 1], "avg", "m")
    with pytest.raises(ConfigError, match="equal rank"):
        adapters.merge_adapters(pm, ["x", "z"], [1, 1], "linear", "m")
    with pytest.raises(ConfigError, match="density"):
        adapters.merge_adapters(pm, ["x", "y"], [1, 1], "ties", "m")
    with pytest.raises(ConfigError, match="2 adapters"):
        adapters.merge_adapters(pm, ["x", "y"], [1], "cat", "m")
    with pytest.raises(ConfigError, match="unknown adapter 'zz'"):
        adapters.merge_adapters(pm, ["x", "zz"], [1, 1], "cat", "m")
    adapters.merge_adapters(pm, ["x", "z"], [1, 1], "cat", "m")  # cat takes different ranks
    assert pm.peft_config["m"].r == 6
    with pytest.raises(ConfigError, match="already exists"):
        adapters.merge_adapters(pm, ["x", "y"], [1, 1], "cat", "m")
    adapters.merge_adapters(pm, ["x", "y"], [1, 1], "cat", "m", replace=True)
    assert pm.peft_config["m"].r == 8


def test_dare_and_ties_prune_and_dare_is_reproducible_by_seed():
    pm, _ = _model()
    state = torch.random.get_rng_state()
    for name, seed in (("d1", 3), ("d2", 3), ("d3", 4)):
        adapters.merge_adapters(pm, ["x", "y"], [1, 1], "dare_linear", name, density=0.3, seed=seed)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    d1, d2, d3 = (adapters.delta_weights(pm, n) for n in ("d1", "d2", "d3"))
    assert all(torch.equal(d1[k], d2[k]) for k in d1)
    assert any(not torch.equal(d1[k], d3[k]) for k in d1)
    adapters.merge_adapters(pm, ["x", "y"], [1, 1], "ties", "t", density=0.2)
    for layer in adapters.lora_layers(pm).values():  # TIES keeps each top 20 %, then elects signs
        zero_share = float((layer.lora_A["t"].weight == 0).float().mean())
        assert 0.6 <= zero_share < 0.8  # ≈ 1 − |union of two top-20 % sets|


def test_switching_adapters_changes_outputs_and_switching_back_restores_them():
    pm, tok = _model()
    flags = {n: p.requires_grad for n, p in pm.named_parameters()}
    out_a = lm.logits_per_text(pm, tok, TEXTS)
    with adapters.active_adapter(pm, "y"):
        assert pm.active_adapter == "y"
        out_b = lm.logits_per_text(pm, tok, TEXTS)
    assert lm.max_abs_diff(out_a, out_b) > 1e-3
    assert pm.active_adapter == "x"
    assert lm.max_abs_diff(out_a, lm.logits_per_text(pm, tok, TEXTS)) == 0.0
    assert flags == {n: p.requires_grad for n, p in pm.named_parameters()}
    router = adapters.AdapterRouter(pm, {"support": "x", "general": "y"})
    with router.use("general"):
        assert lm.max_abs_diff(out_b, lm.logits_per_text(pm, tok, TEXTS)) == 0.0
    with pytest.raises(ConfigError, match="no adapter routed for task 'legal'"):
        router.adapter_for("legal")
    with pytest.raises(ConfigError, match="unknown adapter"):
        adapters.AdapterRouter(pm, {"x": "missing"})


def test_save_one_adapter_and_load_several_into_a_fresh_model(tmp_path):
    pm, tok = _model()
    adapters.merge_adapters(pm, ["x", "y"], [1, 1], "ties", "merged", density=0.5)
    paths = {n: adapters.save_adapter(pm, n, tmp_path / n) for n in ("x", "merged")}
    assert all((p / "adapter_config.json").is_file() for p in paths.values())
    assert not (tmp_path / "merged" / "merged").exists()
    want = {}
    for n in paths:
        with adapters.active_adapter(pm, n):
            want[n] = lm.logits_per_text(pm, tok, TEXTS)
    fresh = adapters.load_adapters(models.load_lm("tiny-llama")[0], paths)
    assert adapters.adapter_names(fresh) == ["x", "merged"] and fresh.active_adapter == "x"
    for n in paths:
        with adapters.active_adapter(fresh, n):
            assert lm.max_abs_diff(want[n], lm.logits_per_text(fresh, tok, TEXTS)) == 0.0
    with pytest.raises(DataError, match="no adapter_config.json"):
        adapters.load_adapters(models.load_lm("tiny-llama")[0], {"x": tmp_path})


def test_replay_mix_has_the_requested_share():
    new = [{"instruction": f"new {i}", "output": "x"} for i in range(30)]
    old = [{"instruction": f"old {i}", "output": "y"} for i in range(100)]
    mix = adapters.replay_mix(new, old, 0.25, seed=1)
    n_old = sum(r["instruction"].startswith("old") for r in mix)
    assert len(mix) == 40 and n_old == 10 and n_old / len(mix) == 0.25
    assert all(r in mix for r in new) and len({r["instruction"] for r in mix}) == 40
    assert mix == adapters.replay_mix(new, old, 0.25, seed=1)
    assert mix != adapters.replay_mix(new, old, 0.25, seed=2)
    assert sorted(r["instruction"] for r in adapters.replay_mix(new, old, 0.0)) == sorted(
        r["instruction"] for r in new)
    small = adapters.replay_mix(new, old[:5], 0.5)  # 30 old records wanted, 5 exist: they repeat
    assert sum(r["instruction"].startswith("old") for r in small) == 30
    with pytest.raises(ConfigError, match="share"):
        adapters.replay_mix(new, old, 1.0)


def test_continue_training_keeps_training_the_same_adapter(tmp_path):
    s = SFTSettings(model="tiny-llama", train_file=str(ROOT / "data/support/sft_train.jsonl"),
                    eval_file=None, max_train_samples=16, output_dir=str(tmp_path / "a"), max_steps=2,
                    batch_size=4, max_length=96, learning_rate=1e-2, save_steps=10**9,
                    eval_before=False, save_final=False, logging_steps=1,
                    lora=lora.LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    model, res = adapters.train_adapter(s, models.load_lm("tiny-llama")[0],
                                        models.load_tokenizer("tiny-llama"))
    assert "_original_forward" not in model.__dict__  # no bf16 autocast wrapper left behind
    adapters.save_adapter(model, "default", tmp_path / "task_a")
    pm = adapters.load_adapters(models.load_lm("tiny-llama")[0],
                                {"default": tmp_path / "task_a", "other": tmp_path / "task_a"},
                                trainable=True)
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    s2 = s.model_copy(update={"output_dir": str(tmp_path / "b"), "max_steps": 3,
                              "train_file": str(ROOT / "data/support/sft_test.jsonl")})
    out = adapters.continue_training(s2, pm, models.load_tokenizer("tiny-llama"))
    assert out["global_step"] == 3 and out["adapter"] == "default"
    assert adapters.adapter_names(pm) == ["default", "other"]  # no new adapter was created
    lora_default = [n for n in before if ".lora_" in n and ".default." in n]
    assert out["trainable_params"] == sum(before[n].numel() for n in lora_default)
    changed = {n for n, p in pm.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(lora_default)  # base and the other adapter untouched
    assert any(".lora_A." in n for n in changed) and any(".lora_B." in n for n in changed)
    assert "_original_forward" not in pm.__dict__
    with pytest.raises(ConfigError, match="PeftModel"):
        adapters.continue_training(s2, models.load_lm("tiny-llama")[0], None)


@pytest.mark.slow
def test_lab_incremental_lora(tmp_path):
    shared_or_skip("llamafactory_sft/alpaca_en_demo.json")
    r = run_script(LAB, "--quick", "--out", tmp_path, "a_steps=4", "b_steps=3", "eval_samples=6",
                   "b_train_samples=12", "max_length=80", "merge_methods=[linear,dare_ties]",
                   timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["lab"] == "L4.05" and m["model"] == "smollm2-135m" and m["eval_samples_per_task"] == 6
    strategies = ["base", "only_A", "only_B", "sequential", "replay", "router", "merge_linear",
                  "merge_dare_ties"]
    for k in strategies:
        assert math.isfinite(m[f"a_loss_{k}"]) and math.isfinite(m[f"b_loss_{k}"])
    for k in strategies[3:]:
        assert math.isfinite(m[f"forgetting_{k}"])
        assert m[f"forgetting_{k}"] == pytest.approx(m[f"a_loss_{k}"] - m["a_loss_only_A"])
    # router: each task's own adapter is active, so A is exactly the A-only adapter's score
    assert abs(m["forgetting_router"]) < 1e-6 and abs(m["b_loss_router"] - m["b_loss_only_B"]) < 1e-6
    assert m["a_loss_only_A"] < m["a_loss_base"]  # even 4 steps on task A help on A
    assert isinstance(m["mitigation_reduces_forgetting"], bool)
    assert m["merge_reload_ok"] is True
    assert (tmp_path / "forgetting.png").exists()
    for d in ("task_a", "task_b", "sequential", "replay", m["saved_merge"]):
        assert (tmp_path / "adapters" / d / "adapter_config.json").is_file()
    bad = run_script(LAB, "--quick", "--out", tmp_path / "bad", "b_file=/nonexistent/b.json")
    assert bad.returncode == 2 and "task B data not found" in bad.stderr
