"""Lab L2.01: NF4 from its definition vs bitsandbytes, double quantisation bytes, quantisation
error ordering, optimiser-state bytes and gradient checkpointing (quick smoke on tiny-llama)."""

import json
import math

import pytest
import torch
from scipy.stats import norm

from conftest import ROOT, run_script

from llmtech.compress import nf4

LAB = ROOT / "lessons/lesson2/01_qlora_intro/qlora_theory.py"


def test_nf4_codebook_follows_the_definition_and_matches_bnb():
    c = nf4.nf4_codebook()
    assert c.shape == (16,) and bool((c.diff() > 0).all())
    assert c[0] == -1 and c[-1] == 1 and c[7] == 0          # exact zero, both ends at +-1
    assert int((c > 0).sum()) == 8 and int((c < 0).sum()) == 7  # asymmetric: 8 positive, 7 negative
    assert abs(nf4.nf4_offset() - 0.9677083) < 1e-7          # bnb's constant, derived
    # the positive levels are N(0,1) quantiles at evenly spaced probabilities in (0.5, offset]
    probs = norm.cdf(c[8:].double().numpy() * norm.ppf(nf4.nf4_offset()))
    steps = probs[1:] - probs[:-1]
    assert max(abs(steps - steps.mean())) < 1e-6 and abs(probs[0] - 0.5 - steps.mean()) < 1e-6
    assert float((c - nf4.bnb_codebook("nf4")).abs().max()) < 1e-6
    assert float((nf4.nf4_codebook(offset=0.99) - c).abs().max()) > 1e-2  # offset matters


def test_block_quantiser_round_trip_equals_bnb_on_normal_weights():
    torch.manual_seed(0)
    w = torch.randn(300, 97) * torch.rand(300, 1)   # 29100 values: the last block is partial
    same = nf4.compare_with_bnb(w, "nf4", code=nf4.bnb_codebook("nf4"))
    assert same["code_mismatches"] == 0 and same["dequant_max_abs_diff"] <= 1e-6
    ours = nf4.compare_with_bnb(w, "nf4")             # table built from the definition
    assert ours["code_agreement"] >= 0.9999 and ours["dequant_max_abs_diff_same_codes"] <= 1e-6
    assert ours["mismatch_max_midpoint_distance"] <= 1e-6  # any disagreement is a rounding tie
    assert nf4.compare_with_bnb(w, "fp4")["code_mismatches"] == 0
    # nearest-level rounding: no value lands farther than half the widest level gap (x absmax)
    q = nf4.quantize(w, "nf4")
    err = (q.dequantize() - w).abs().reshape(-1)
    bound = torch.repeat_interleave(q.absmax, 64)[: w.numel()]
    assert bool((err <= bound * float(q.code.diff().max()) / 2 + 1e-6).all())


def test_tiny_model_weight_matches_bnb_with_double_quant(tiny):
    model, _ = tiny
    w = model.model.layers[0].mlp.up_proj.weight
    r = nf4.compare_with_bnb(w, "nf4", double_quant=True)
    assert r["code_agreement"] >= 0.999 and r["dequant_max_abs_diff_same_codes"] <= 1e-6
    assert r["scale_ours_never_farther"] and r["scale_code_agreement"] >= 0.95


def test_double_quant_bits_per_param_is_0127_for_block_64():
    torch.manual_seed(1)
    w = torch.randn(4096, 1024) * 0.02
    q = nf4.quantize(w, "nf4")
    dq = nf4.double_quantize(q.absmax)
    plain = nf4.bits_per_param(q.scale_bytes(), q.numel)
    packed = nf4.bits_per_param(dq.nbytes(), q.numel)
    assert plain == pytest.approx(0.5) and packed == pytest.approx(0.127, abs=1e-3)
    assert dq.nbytes() == nf4.scale_storage_bytes(q.numel, 64, double_quant=True)
    assert dq.offset == pytest.approx(float(q.absmax.mean()))
    rel = ((dq.dequantize() - q.absmax) / q.absmax).abs()
    assert float(rel.max()) < 0.05                      # 8-bit scales stay close to fp32 ones
    # LLaMA-7B extrapolation uses the real shapes: 32 layers x 7 linears, N ~ 6.48e9 weights
    n7 = nf4.linear_numels(nf4.llama7b_config())
    assert len(n7) == 224 and sum(n7) == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)


def test_error_ordering_on_normal_weights():
    torch.manual_seed(2)
    weights = {"a": torch.randn(256, 512) * 0.02, "b": torch.randn(512, 256) * 0.05}
    t = nf4.error_table(weights)
    assert t["int8"]["sqnr_db"] > t["nf4"]["sqnr_db"] > t["int4"]["sqnr_db"]
    assert t["nf4"]["sqnr_db"] > t["fp4"]["sqnr_db"]
    assert t["int8"]["mse"] < t["nf4"]["mse"] < t["int4"]["mse"]
    assert t["nf4"]["bits_per_param"] == pytest.approx(4.5)
    assert t["nf4+dq"]["bits_per_param"] < 4.2 and t["nf4+dq"]["sqnr_db"] > t["int4"]["sqnr_db"]
    m = nf4.error_metrics(weights["a"], weights["a"] * 1.1)
    assert m["sqnr_db"] == pytest.approx(20.0, abs=1e-4) and m["rel_error"] == pytest.approx(0.1)


def test_adamw8bit_state_is_about_four_times_smaller(tiny):
    model, _ = tiny
    model.train()
    ids = torch.randint(0, 1000, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    before = [p.detach().clone() for p in params]
    res = {r.name: r for r in nf4.measure_optimizers(
        params, ["torch.AdamW", "bnb.AdamW8bit", "bnb.PagedAdamW8bit"])}
    model.zero_grad(set_to_none=True)
    model.eval()
    n = sum(p.numel() for p in params)
    adamw, a8 = res["torch.AdamW"], res["bnb.AdamW8bit"]
    assert 8 * n <= adamw.state_bytes <= 8 * n + 64 * len(params)   # two fp32 moments + step
    assert 3.0 < adamw.state_bytes / a8.state_bytes < 4.1
    assert all(r.max_param_change > 0 for r in res.values())          # each step was real
    assert all(torch.equal(p, b) for p, b in zip(params, before))      # and was undone
    if not torch.cuda.is_available():
        assert res["bnb.PagedAdamW8bit"].paging("cpu").startswith("not paged on cpu")


def test_gradient_checkpointing_lowers_peak_memory():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 512, (2, 512))
    off, on = nf4.measure_grad_checkpointing(model, ids, repeats=1)
    assert not off.checkpointing and on.checkpointing
    assert on.loss == pytest.approx(off.loss, rel=1e-5)              # same maths, recomputed
    assert on.peak_bytes < 0.8 * off.peak_bytes


def test_lab_quick_on_tiny_llama(tmp_path):
    r = run_script(LAB, "--quick", "--out", tmp_path, "model=tiny-llama", "opt_seq=32",
                   "ckpt_batch=2", "ckpt_seq=64", timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    for key in m["headline"].split(","):
        assert key in m, key
    assert m["nf4_codebook_max_abs_diff_vs_bnb"] < 1e-6 and m["nf4_vs_bnb_code_agreement"] > 0.9999
    assert m["bnbtable_vs_bnb_code_mismatches"] == 0 and m["bnbtable_vs_bnb_dequant_max_abs_diff"] == 0
    assert m["sqnr_db_int8"] > m["sqnr_db_nf4"] > m["sqnr_db_int4"]
    assert m["scale_formula_matches"] and 0.3 < m["double_quant_bits_per_param_saved"] < 0.5
    assert m["llama7b_double_quant_saved_mb"] == pytest.approx(
        m["llama7b_linear_params"] * (0.5 - 0.127) / 8 / 2**20, rel=0.01)
    assert m["adamw8bit_state_bytes_ratio"] > 3
    assert m["paged_optimizer_status"].startswith(("not paged", "paged:"))
    assert math.isfinite(m["grad_ckpt_step_time_ratio"]) and m["grad_ckpt_peak_memory_ratio"] > 0
    for png in ("nf4_levels.png", "quant_error.png"):
        assert (tmp_path / png).stat().st_size > 1000
    bad = run_script(LAB, "--quick", "--out", tmp_path / "bad", "blocksize=100", timeout=120)
    assert bad.returncode == 2 and "blocksize" in bad.stderr
