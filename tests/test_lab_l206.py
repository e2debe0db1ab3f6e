"""L2.06 method selection: memory estimate (hand-checked arithmetic, autograd's saved bytes),
recommend(), the measurement entry point and the lab."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, load_lab_module
from llmtech import models
from llmtech.dist import memory as M
from llmtech.errors import LlmtechError
from llmtech.train.lora import LoraSettings, analytic_lora_params, peft_count, target_linears

LAB = ROOT / "lessons/lesson2/06_method_selection/method_selector.py"
TINY = M.ModelShape("toy", layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=1000,
                    tied_embeddings=True)


# run the CLI with the same llmtech these tests import
ENV = {**os.environ, "PYTHONPATH": str(Path(M.__file__).resolve().parents[2])}


def lab_module():
    return load_lab_module(LAB, "l206_lab")


# --------------------------------------------------------------------------- shapes and bytes

def test_presets_match_published_sizes_and_the_bundled_config():
    published = {"smollm2-135m": 134_515_008, "qwen2.5-0.5b": 494_032_768,
                 "qwen2.5-1.5b": 1_543_714_304, "llama2-7b": 6_738_415_616,
                 "llama2-13b": 13_015_864_320, "llama2-70b": 68_976_648_192}
    for name, n in published.items():
        assert M.PRESETS[name].params == n, name
    cfg = json.loads((models.resolve("smollm2-135m") / "config.json").read_text())
    from_cfg = M.ModelShape.from_config(cfg, name="smollm2-135m")
    preset = M.model_shape("135m")
    for f in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "head_dim",
              "tied_embeddings", "qkv_bias"):
        assert getattr(from_cfg, f) == getattr(preset, f), f


def test_weight_bytes_fp32_bf16_nf4_by_hand():
    # toy: per layer q 64·64, k,v 64·32, o 64·64, gate/up/down 64·128 -> 4096·2 + 2048·2 + 8192·3
    lin = 2 * (4096 * 2 + 2048 * 2 + 8192 * 3)
    assert TINY.param_groups()["linear"] == lin
    n = lin + (2 * 2 + 1) * 64 + 1000 * 64  # + norms + tied embedding
    assert TINY.params == n
    assert M.estimate(TINY, "full", weight_dtype="fp32").weights == 4 * n
    assert M.estimate(TINY, "full", weight_dtype="bf16").weights == 2 * n
    assert M.NF4_BITS_DQ == pytest.approx(4.127, abs=5e-4)  # 4 + 8/64 + 32/(64*256)
    q = M.estimate(TINY, "qlora", lora_r=8)
    lora = M.trainable_params(TINY, "qlora", lora_r=8)
    assert q.weights == int(lin * M.NF4_BITS_DQ / 8 + (n - lin) * 4 + lora * 4)
    assert M.estimate(TINY, "qlora", double_quant=False).weights == int(lin * 4.5 / 8 + (n - lin) * 4 + lora * 4)


def test_lora_and_prefix_trainable_params_equal_peft(tiny):
    model, _ = tiny
    shape = M.model_shape(model)
    for r in (4, 8):
        assert M.trainable_params(shape, "lora", lora_r=r) == analytic_lora_params(
            target_linears(model, "all-linear"), r)
    assert M.trainable_params(shape, "lora", 8) == peft_count(model, LoraSettings(r=8))[0]
    assert M.trainable_params(shape, "lora", 8, ["q_proj", "v_proj"]) == analytic_lora_params(
        target_linears(model, ["q_proj", "v_proj"]), 8)
    from peft import PrefixTuningConfig, get_peft_model

    pm = get_peft_model(models.build_tiny_llama(models.load_tokenizer("tiny-llama")),
                        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16))
    assert M.trainable_params(shape, "ptuning", prefix_tokens=16) == sum(
        p.numel() for p in pm.parameters() if p.requires_grad)
    # the real 135M config (no weights needed)
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        big = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(models.resolve("smollm2-135m")))
    assert M.trainable_params(M.model_shape("135m"), "lora", 8) == analytic_lora_params(
        target_linears(big, "all-linear"), 8) == 2_442_240


def test_optimizer_gradient_bytes_and_the_peak_rule():
    lora = M.estimate("7b", "lora", device="cpu")
    assert lora.optimizer == 8 * lora.params_trainable  # AdamW 32-bit: m + v
    assert lora.gradients == 4 * lora.params_trainable
    assert M.estimate("7b", "lora", optimizer="adamw8bit").optimizer == 2 * lora.params_trainable
    full = M.estimate("7b", "full", device="cuda")  # bf16 mixed precision: 2 + 2 + 8 + 4 (master)
    assert (full.weights, full.gradients, full.optimizer) == (
        2 * full.params_total, 2 * full.params_total, 12 * full.params_total)
    for e in (lora, full, M.estimate("135m", "full", device="cpu", batch=1, seq_len=8)):
        assert e.total == e.weights + e.optimizer + max(e.activations, e.gradients + e.step_temporaries)
        assert e.naive_sum + e.step_temporaries >= e.total
    tiny_batch = M.estimate("135m", "full", device="cpu", batch=1, seq_len=8)
    assert tiny_batch.peak_phase == "optimizer step"  # few tokens: gradients outweigh activations
    # logits: 3 × T × V fp32 at the start of backward (saved log-softmax + two gradients)
    e = M.estimate("135m", "ptuning", batch=4, seq_len=128, device="cpu")
    assert e.activation_parts["logits backward (2 × T×V fp32 or head grad)"] == 2 * 512 * 49152 * 4
    gc = M.estimate("135m", "lora", batch=4, seq_len=128, device="cpu", gradient_checkpointing=True)
    assert gc.activations < M.estimate("135m", "lora", batch=4, seq_len=128, device="cpu").activations


def test_activation_formula_equals_what_autograd_saves_per_layer():
    """One more decoder layer adds exactly layer_terms() bytes of saved tensors."""
    from peft import PrefixTuningConfig, get_peft_model

    from llmtech.train.lora import lora_config

    tok = models.load_tokenizer("tiny-llama")
    b, s = 2, 16
    ids = torch.randint(0, len(tok), (b, s), generator=torch.Generator().manual_seed(0))
    for method, drop in [("full", 0.05), ("lora", 0.05), ("lora", 0.0), ("ptuning", 0.05)]:
        saved = {}
        for layers in (2, 3):
            m = models.build_tiny_llama(tok, layers=layers)
            if method == "lora":
                m = get_peft_model(m, lora_config(LoraSettings(dropout=drop)))
            elif method == "ptuning":
                m = get_peft_model(m, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16))
            m.train()
            saved[layers] = M.saved_tensor_bytes(m, ids)
        shape = M.model_shape(models.build_tiny_llama(tok, layers=3))
        terms = M.layer_terms(shape, method, b, s, lora_dropout=drop, prefix_tokens=16)
        assert saved[3] - saved[2] == sum(terms.values()), (method, drop)
        # and the whole forward (first layer and head included) within 2%
        est = 3 * sum(terms.values()) + sum(M.head_terms(shape, method, b, s).values())
        assert est == pytest.approx(saved[3], rel=0.02), (method, drop)


# --------------------------------------------------------------------------- recommend

def test_recommend_qlora_for_7b_on_24gb_and_full_for_135m_on_80gb():
    r = M.recommend("7b", 24, data_size=10_000, seq_len=512, goal="instruction")
    assert r.best.method == "qlora" and r.best.level == 0
    lora = next(o for o in r.options if o.method == "lora")
    assert lora.level == 1  # LoRA needs gradient checkpointing at 24 GB: that is why QLoRA wins
    assert r.best.estimate.total <= r.usable_bytes == int(24 * M.GB * 0.9)
    assert "weights" in r.best.reason and "≤ 21.6 GB usable" in r.best.reason
    full = next(o for o in r.options if o.method == "full")
    assert not full.fits and full.reason.startswith("does not fit: needs")
    r = M.recommend("135m", 80, data_size=100_000, seq_len=512, goal="domain")
    assert r.best.method == "full" and set(r.fitting) == set(M.METHODS)
    # with little data, the low-rank update is preferred even where full fine-tuning fits
    assert M.recommend("135m", 80, data_size=500, seq_len=512, goal="domain").best.method == "lora"
    assert M.recommend("135m", 8, 2_000, 512, "multitask").best.method == "ptuning"
    assert M.recommend("70b", 48, 10_000, 512).best.method == "qlora"


def test_impossible_fit_says_so_with_numbers():
    with pytest.raises(M.DoesNotFit) as e:
        M.recommend("70b", 8, data_size=10_000, seq_len=512)
    msg = str(e.value)
    assert "does not fit in 8 GB" in msg and "QLoRA" in msg and "> 7.2 GB usable" in msg
    needs = float(msg.split("needs ")[1].split(" GB")[0])
    assert needs == pytest.approx(e.value.cheapest.total / M.GB, abs=0.01) and needs > 30
    assert isinstance(e.value, LlmtechError)
    assert M.recommend("70b", 8, 10_000, 512, strict=False).best is None


@pytest.mark.parametrize("call, words", [
    (lambda: M.estimate("7b", "adapter"), ["unknown method 'adapter'", "full"]),
    (lambda: M.recommend("7b", 24, 100, 512, goal="chat"), ["unknown goal 'chat'", "domain"]),
    (lambda: M.recommend("7b", 0, 100, 512), ["gpu_memory_gb must be > 0"]),
    (lambda: M.model_shape("no-such-model-xyz"), ["unknown model 'no-such-model-xyz'", "llama2-7b"]),
    (lambda: M.estimate("7b", "lora", lora_target_modules=["qkv"]), ["['qkv']", "q_proj"]),
    (lambda: M.estimate("7b", "full", weight_dtype="int3"), ["unknown dtype 'int3'"]),
])
def test_bad_input_is_a_clear_error(call, words):
    with pytest.raises(LlmtechError) as e:
        call()
    for w in words:
        assert w in str(e.value)


# --------------------------------------------------------------------------- measurement + lab

def test_measure_entry_point_prints_json_on_tiny_llama():
    r = subprocess.run([sys.executable, "-m", "llmtech.dist.memory", "measure", "--method", "qlora",
                        "--model", "tiny-llama", "--batch", "2", "--seq-len", "16", "--steps", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["method"] == "qlora" and d["device"] in ("cpu", "cuda") and d["steps"] == 2
    assert [(p["step"], p["phase"]) for p in d["phases"]] == [
        (s, p) for s in (1, 2) for p in ("forward", "backward", "optimizer step")]
    assert d["measured_mb"] == max(p["peak_mb"] for p in d["phases"]) > 0
    assert d["baseline_mb"] > 100  # python + torch + transformers, subtracted
    assert d["params_trainable"] == M.trainable_params(M.model_shape("tiny-llama"), "qlora", 8)
    assert all(math.isfinite(x) for x in d["losses"])
    bad = subprocess.run([sys.executable, "-m", "llmtech.dist.memory", "recommend", "--model", "70b",
                          "--gpu-gb", "8", "--data-size", "100"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env=ENV)
    assert bad.returncode == 2 and "does not fit" in bad.stderr


def test_lab_main_on_tiny_llama(tmp_path):
    from llmtech.labs import LabContext

    lab = lab_module()
    cfg = lab.Config(model="tiny-llama", methods=["full"], seq_len=32, quick=True)
    ctx = LabContext(out=tmp_path, lab_id="L2.06", title="t")
    m = lab.main(cfg, ctx)
    assert m["est_mb_full"] > 0 and m["measured_mb_full"] > 0
    assert m["ratio_full"] == pytest.approx(m["est_mb_full"] / m["measured_mb_full"], abs=2e-3)
    assert 0.5 < m["ratio_full"] < 1.5  # baseline subtracted, like compared with like
    assert m["within_25pct_all"] == m["within_25pct_full"] == (abs(m["ratio_full"] - 1) <= 0.25)
    assert m["rec_7b_24gb_512_instruction"] == "qlora" and m["rec_135m_80gb_512_domain"] == "full"
    assert m["rec_135m_8gb_512_multitask"] == "ptuning"
    assert "does not fit" in m["impossible_message"] and m["impossible_needs_gb"] > 8
    assert (tmp_path / "memory_estimate_vs_measured.png").stat().st_size > 10_000
    with pytest.raises(ValueError):
        lab.Config(methods=["adapter"])


@pytest.mark.slow
def test_estimate_within_25pct_of_measured_on_the_bundled_model():
    kw = dict(batch=4, seq_len=128)
    d = M.measure_subprocess("ptuning", "smollm2-135m", steps=2, **kw)
    e = M.estimate("smollm2-135m", "ptuning", **M.measured_setup("ptuning", d["device"]), **kw)
    assert e.total / M.MB / d["measured_mb"] == pytest.approx(1.0, abs=0.25)
    assert d["peak_at"] == "step 2 backward" and e.peak_phase == "backward"


def test_measurement_data_errors_name_the_file_and_line(tmp_path):
    from llmtech.errors import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": "yo"}\n[1, 2]\n', encoding="utf-8")
    tok = models.load_tokenizer("tiny-llama")
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        M._token_batch(tok, 2, 8, str(bad), 0)
