"""LoRA helpers (counting, ΔW, merging) and the two LoRA labs L1.04 / L1.05."""

import json

import pytest
import torch
from peft import get_peft_model

from conftest import ROOT, run_script
from llmtech import models
from llmtech.evals import lm
from llmtech.train import lora

QV = ["q_proj", "v_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def _wrap(model, r, targets, alpha=None):
    s = lora.LoraSettings(r=r, alpha=alpha or 2 * r, dropout=0.0, target_modules=targets)
    pm = get_peft_model(model, lora.lora_config(s))
    torch.manual_seed(1)
    for mod in pm.modules():  # B starts at zero; give it values so ΔW is not trivially 0
        if hasattr(mod, "lora_B"):
            torch.nn.init.normal_(mod.lora_B["default"].weight, std=0.05)
    return pm


@pytest.mark.parametrize("targets", [QV, ["q_proj", "k_proj", "v_proj", "o_proj"], MLP, "all-linear",
                                     r".*\.0\.self_attn\.(q|k)_proj"])
@pytest.mark.parametrize("r", [1, 4, 16])
def test_analytic_count_equals_peft(targets, r):
    model, _ = models.load_lm("tiny-llama")
    n_before = sum(p.numel() for p in model.parameters())
    expected = lora.target_linears(model, targets)
    n_peft, adapted = lora.peft_count(model, lora.LoraSettings(r=r, target_modules=targets))
    assert set(adapted) == set(expected) and expected
    assert n_peft == lora.analytic_lora_params(expected, r)
    assert n_peft == sum(r * (i + o) for i, o in adapted.values())
    # peft_count leaves the model as it was: no adapter layers, same parameters, all trainable
    assert sum(p.numel() for p in model.parameters()) == n_before
    assert not lora.adapted_linears(model)
    assert all(p.requires_grad for p in model.parameters())


def test_all_linear_skips_output_head_and_table_groups_layers():
    model, _ = models.load_lm("tiny-llama")
    shapes = lora.target_linears(model, "all-linear")
    assert "lm_head" not in shapes and len(shapes) == 2 * 7
    rows = lora.injection_table(shapes, 8)
    assert len(rows) == 7 and all(r["layers"] == 2 for r in rows)
    q = next(r for r in rows if r["pattern"] == "model.layers.*.self_attn.q_proj")
    assert q["lora_params_r8"] == 8 * (64 + 64) and q["full_W_params"] == 64 * 64


def test_delta_weight_is_scaled_BA_with_rank_at_most_r():
    model, _ = models.load_lm("tiny-llama")
    r, alpha = 4, 8
    pm = _wrap(model, r, QV, alpha)
    for name in lora.adapted_linears(pm):
        mod = dict(pm.named_modules())[name]
        by_hand = mod.lora_B["default"].weight @ mod.lora_A["default"].weight * (alpha / r)
        dw = lora.delta_weight(pm, name)
        assert dw.shape == mod.base_layer.weight.shape
        torch.testing.assert_close(dw, by_hand)
        sv = torch.linalg.svdvals(dw)
        assert int(torch.linalg.matrix_rank(dw)) <= r
        st = lora.rank_stats(sv, dw.shape)
        assert st["numerical_rank"] == r and 1 <= st["rank_energy"] <= r
        assert 1.0 <= st["effective_rank"] <= r + 1e-6


def test_rank_stats_on_known_spectrum():
    st = lora.rank_stats(torch.tensor([3.0, 1.0, 0.0, 0.0]), (4, 4))
    assert st["numerical_rank"] == 2
    assert st["rank_energy"] == 1  # 9 / 10 of the energy is in the first value
    p = torch.tensor([0.75, 0.25])
    assert st["effective_rank"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())))
    assert lora.rank_stats(torch.ones(5))["effective_rank"] == pytest.approx(5.0)


def test_merge_and_reload_keeps_logits(tmp_path):
    model, tok = models.load_lm("tiny-llama")
    texts = ["S1 找不到充电座怎么办？", "How do I connect the S1 to Wi-Fi?"]
    base = lm.logits_per_text(model, tok, texts)
    pm = _wrap(model, 8, "all-linear")
    adapter = lm.logits_per_text(pm, tok, texts)
    assert lm.max_abs_diff(base, adapter) > 1e-3  # the adapter really changes the function
    path = lora.merge_and_save(pm, tok, tmp_path / "merged")
    reloaded, _ = models.load_lm(str(path))
    assert not lora.adapted_linears(reloaded)
    assert lm.max_abs_diff(adapter, lm.logits_per_text(reloaded, tok, texts)) < 1e-4


def test_trust_remote_code_comes_from_the_registry():
    assert models.trust_remote_code_for("chatglm3-6b", None) is True
    assert models.trust_remote_code_for("smollm2-135m", None) is False
    assert models.trust_remote_code_for("ms:someone/model", None) is False
    assert models.trust_remote_code_for("chatglm3-6b", False) is False
    assert models.trust_remote_code_for("/some/dir", True) is True


def test_load_lm_passes_trust_remote_code_only_when_asked(tmp_path, monkeypatch):
    import transformers

    (tmp_path / "config.json").write_text("{}")
    seen = []

    class Fake:
        pad_token, eos_token, pad_token_id = "x", "x", 0
        generation_config = type("G", (), {"pad_token_id": 0})()

        @classmethod
        def from_pretrained(cls, path, **kw):
            seen.append(kw.get("trust_remote_code", False))
            return cls()

    monkeypatch.setattr(models, "resolve", lambda model_id: tmp_path)
    monkeypatch.setattr(transformers, "AutoTokenizer", Fake)
    monkeypatch.setattr(transformers, "AutoModelForCausalLM", Fake)
    models.load_lm("chatglm3-6b")
    assert seen == [True, True]  # tokenizer and model
    seen.clear()
    models.load_lm(str(tmp_path))
    models.load_lm("qwen2.5-0.5b")
    assert seen == [False] * 4
    seen.clear()
    models.load_lm(str(tmp_path), trust_remote_code=True)
    assert seen == [True, True]


LAB4 = ROOT / "lessons/lesson1/04_lora_theory/lora_parameter_viz.py"
LAB5 = ROOT / "lessons/lesson1/05_lora_finetune/lora_chatglm_demo.py"


@pytest.mark.slow
def test_lab_lora_parameter_viz(tmp_path):
    r = run_script(LAB4, "--quick", "--out", tmp_path, "ranks=[4,8]", "train_steps=4",
                   "train_targets=attn_qv", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["model"] == "smollm2-135m" and m["count_mismatches"] == 0 and m["configs_checked"] == 8
    assert m["params_r8_attn_qv"] == 30 * 8 * (576 + 576 + 576 + 192)
    assert m["params_r8_all_linear"] == 30 * 8 * 10176
    assert 1.5 < m["pct_r8_all_linear"] < 2.0
    assert m["layers_analyzed"] == 60 and m["delta_w_max_rank"] <= m["train_r"]
    assert m["delta_w_rank90_mean"] <= m["train_r"] < 10 * m["train_r"] < m["w_rank90_mean"]
    assert (tmp_path / "params_vs_rank.png").exists() and (tmp_path / "svd_spectra.png").exists()


@pytest.mark.slow
def test_lab_lora_finetune_merge(tmp_path):
    r = run_script(LAB5, "--quick", "--out", tmp_path, "steps=12", "eval_samples=8",
                   "max_new_tokens=16", "n_examples=2", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["model"] == "smollm2-135m" and m["eval_examples"] == 8 and m["train_steps"] == 12
    assert m["response_loss_after"] < m["response_loss_before"] - 0.1
    assert m["merge_logits_equal"] is True and m["merge_max_abs_logit_diff"] < 1e-4
    assert m["adapter_vs_base_max_abs_logit_diff"] > 0.1
    assert m["train_tokens_per_s"] > 0 and 0 <= m["rouge_l_after"] <= 1
    assert (tmp_path / "merged/config.json").exists()
    assert "生成示例" in (tmp_path / "report.md").read_text()
