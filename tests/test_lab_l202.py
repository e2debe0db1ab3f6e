"""L2.02 QLoRA pipeline: optimizer fallback, the bitsandbytes CPU layout fix, adapter/base checks,
the GPU config, and the lab end to end on the tiny model."""

import json

import pytest
import torch

from conftest import ROOT, load_lab_module, run_script

from llmtech.errors import ConfigError
from llmtech.train import adapters
from llmtech.train import peft_methods as qlora
from llmtech.train.lora import LoraSettings, lora_config

LAB = ROOT / "lessons/lesson2/02_qlora_pipeline/qlora_trainer.py"
GPU_CONFIG = ROOT / "configs/lessons/L2.02_llama7b_gpu.yaml"


def test_paged_optimizer_falls_back_on_cpu_only():
    assert qlora.resolve_optim("paged_adamw_32bit", cuda=True) == ("paged_adamw_32bit", "")
    optim, note = qlora.resolve_optim("paged_adamw_32bit", cuda=False)
    assert optim == "adamw_torch" and "unified memory" in note
    assert qlora.resolve_optim("paged_adamw_8bit", cuda=False)[0] == "adamw_bnb_8bit"
    assert qlora.resolve_optim("adamw_torch", cuda=False) == ("adamw_torch", "")
    with pytest.raises(ConfigError, match="paged_sgd"):
        qlora.resolve_optim("paged_sgd", cuda=False)


def _lora_b_grads_after_eval(fix: bool) -> tuple[int, int]:
    """Prepared 4-bit tiny model + LoRA: one no-grad eval forward, then one training backward;
    how many lora_B matrices got a non-zero gradient (lora_A's is 0 while B is still 0)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from llmtech.compress.bnb import load_quantized

    model, tok = load_quantized("tiny-llama")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if fix:
        qlora.keep_training_layout(model)
    model = get_peft_model(model, lora_config(LoraSettings(r=4)))
    ids = tok("The refund takes five working days.", return_tensors="pt").input_ids
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    got = [p.grad is not None and bool(p.grad.abs().sum() > 0)
           for n, p in model.named_parameters() if "lora_B" in n]
    return sum(got), len(got)


def test_training_after_evaluation_reaches_every_lora_layer():
    import bitsandbytes as bnb

    repacks = getattr(bnb.nn.Linear4bit(64, 64), "support_avx512bf16_for_cpu", False)
    with_fix, total = _lora_b_grads_after_eval(fix=True)
    assert with_fix == total == 14  # 2 layers x 7 linears
    if repacks:  # this CPU has AVX-512 BF16: bitsandbytes' eval repacking drops input gradients
        without_fix, _ = _lora_b_grads_after_eval(fix=False)
        assert without_fix < total


def _tiny(layers=2, hidden=64):
    from llmtech import models

    tok = models.load_tokenizer("tiny-llama")
    return models.build_tiny_llama(tok, hidden=hidden, layers=layers)


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    from peft import get_peft_model

    path = tmp_path_factory.mktemp("adapter")
    pm = get_peft_model(_tiny(), lora_config(LoraSettings(r=4)))
    pm.save_pretrained(str(path))
    return path


def test_adapter_on_the_wrong_base_is_a_clear_error(saved_adapter):
    qlora.check_adapter_base(_tiny(), saved_adapter)  # the same architecture passes
    with pytest.raises(ConfigError, match=r"'model.layers.1.*lacks.*wrong base"):
        qlora.check_adapter_base(_tiny(layers=1), saved_adapter)
    with pytest.raises(ConfigError, match=r"expects (in|out)_features=(64|128) but this base model.s layer has (32|64)"):
        qlora.check_adapter_base(_tiny(hidden=32), saved_adapter)
    # the multi-adapter loader checks before PEFT gets to it
    with pytest.raises(ConfigError, match="wrong base"):
        adapters.load_adapters(_tiny(hidden=32), {"a": saved_adapter})
    assert adapters.adapter_names(adapters.load_adapters(_tiny(), {"a": saved_adapter})) == ["a"]


def test_gpu_config_is_valid_and_keeps_the_paper_recipe():
    from llmtech.config import load_config

    lab = load_lab_module(LAB, "l202_lab")
    cfg = load_config(lab.Config, str(GPU_CONFIG), [])
    assert (cfg.quant_type, cfg.double_quant, cfg.compute_dtype) == ("nf4", True, "bfloat16")
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (64, 16, 0.1)
    assert cfg.optim == "paged_adamw_32bit" and cfg.gradient_checkpointing
    with pytest.raises(Exception, match="lora_rank"):
        load_config(lab.Config, str(GPU_CONFIG), ["lora_rank=8"])


def test_lab_quick_on_tiny_model(tmp_path):
    out = tmp_path / "l202"
    p = run_script(LAB, "--quick", "model=tiny-llama", "wrong_base=smollm2-135m", "steps=6",
                   "max_length=64", "max_eval_samples=8", "compare_steps=1", "compare_seq_len=32",
                   "--out", out, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["eval_loss_after"] < m["eval_loss_before"] and m["loss_fell"]
    assert m["quantized_linears"] == 14 and m["optim"] == "adamw_torch"
    assert m["reload_max_abs_diff"] == 0.0
    assert "wrong base model" in m["wrong_base_error"]
    assert m["gpu_fits_qlora"] and not m["gpu_fits_full"]
    assert m["lora_peak_mb"] > 0 and m["qlora_peak_mb"] > 0 and m["speed_ratio"] > 0
    for f in ("report.md", "qlora_loss.png", "qlora_vs_lora.png", "qlora/final/adapter_config.json"):
        assert (out / f).exists(), f
