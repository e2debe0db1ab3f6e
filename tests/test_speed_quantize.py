"""evals.speed (CPU generation timing, bytes, RSS) and compress.quantize (deployment variants)."""

import copy
import importlib.util
import json
import math
import sys
import time

import pytest
import torch
from torch import nn

from conftest import ROOT, run_script
from llmtech.compress import quantize as q
from llmtech.evals import speed

LAB = ROOT / "lessons" / "lesson1" / "06_cpu_deploy" / "cpu_inference_case.py"
TEXT = ("Refunds start within three business days after the warehouse receives and checks the "
        "item. Money goes back to the original payment account only and arrives in one to seven "
        "business days, depending on the bank.")


@pytest.fixture()
def fresh_tiny(tiny):
    """A private copy of the tiny model that a test may change in place."""
    model, tok = tiny
    return copy.deepcopy(model).eval(), tok


def test_measure_generation_keys_and_positive_numbers(tiny):
    model, tok = tiny
    r = speed.measure_generation(model, tok, speed.DEFAULT_PROMPTS[:2], max_new_tokens=5)
    m = r.as_metrics("fp32")
    assert set(m) == {f"fp32_{k}" for k in (
        "first_token_ms", "decode_tokens_per_s", "total_tokens_per_s", "new_tokens",
        "prompt_tokens", "prompts", "peak_rss_mb", "gen_rss_delta_mb", "other_cpu_pct", "model_mb",
        "wall_s")}
    assert 0 <= m["fp32_other_cpu_pct"] <= 100
    for k in ("first_token_ms", "decode_tokens_per_s", "total_tokens_per_s", "peak_rss_mb",
              "model_mb", "prompt_tokens"):
        assert m[f"fp32_{k}"] > 0, k
    assert m["fp32_new_tokens"] == 10  # EOS ignored: every prompt gives exactly 5 tokens
    assert m["fp32_prompts"] == 2 and len(r.texts) == 2
    assert m["fp32_model_mb"] == pytest.approx(speed.model_bytes(model) / speed.MB, rel=1e-3)


def test_rates_follow_token_timestamps(tiny):
    """The arithmetic: first token after ~40 ms, then one token every ~10 ms -> ~100 tok/s."""
    _, tok = tiny

    class Paced:
        def timed_generate(self, ids, n, ignore_eos):
            times = []
            time.sleep(0.04)
            for i in range(n):
                if i:
                    time.sleep(0.01)
                times.append(time.perf_counter())
            return [tok.eos_token_id] * n, times

    r = speed.measure_generation(Paced(), tok, ["hi"], max_new_tokens=11, warmup=0)
    assert 38 <= r.first_token_ms < 80
    assert 50 < r.decode_tokens_per_s <= 101
    assert r.total_tokens_per_s < r.decode_tokens_per_s
    assert r.model_mb is None and r.new_tokens == 11


def test_model_bytes_counts_tied_weights_once(fresh_tiny):
    model, _ = fresh_tiny
    assert model.lm_head.weight is model.model.embed_tokens.weight
    params = sum(p.numel() * p.element_size() for p in model.parameters())  # deduplicated
    bufs = sum(b.numel() * b.element_size() for b in model.buffers())
    assert speed.model_bytes(model) == params + bufs


def test_bf16_halves_parameter_bytes(fresh_tiny):
    model, _ = fresh_tiny
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    q.to_bf16(model)
    after = sum(p.numel() * p.element_size() for p in model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert after * 2 == before
    assert speed.model_bytes(model) * 2 == pytest.approx(before, rel=0.01)


def test_int8_dynamic_replaces_linear_layers_and_shrinks(fresh_tiny):
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear

    model, tok = fresh_tiny
    before = speed.model_bytes(model)
    ids = torch.tensor([tok(TEXT)["input_ids"][:16]])
    ref = model(ids).logits
    model, backend = q.quantize_int8_dynamic(model, backend="torch.ao")
    assert backend.startswith("torch.ao per-tensor")
    layer = model.model.layers[0]
    for m in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj):
        assert isinstance(m, DynLinear)
    assert type(layer.mlp.down_proj) is nn.Linear  # skipped: massive activations (INT8_SKIP)
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    # int8 weights: each quantised Linear shrinks from 4 bytes to ~1 byte per weight
    n_q = sum(m.weight().numel() for m in model.modules() if isinstance(m, DynLinear))
    after = speed.model_bytes(model)
    assert after < before
    assert before - after == pytest.approx(3 * n_q, rel=0.1)
    out = model(ids).logits
    assert out.shape == ref.shape and torch.isfinite(out).all()


def test_int8_skip_nothing_per_channel_quantizes_every_linear(fresh_tiny):
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear

    model, _ = fresh_tiny
    model, backend = q.quantize_int8_dynamic(model, backend="torch.ao", skip=(), per_channel=True)
    assert "per-channel" in backend
    assert not [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert isinstance(model.lm_head, DynLinear)
    assert model.lm_head.weight().qscheme() == torch.per_channel_affine
    assert speed.model_bytes(model) > 0


def test_int8_auto_backend_without_torchao(monkeypatch):
    monkeypatch.setattr(q, "_have_torchao", lambda: False)
    assert q.int8_backend("auto") == "torch.ao"
    with pytest.raises(q.ModelNotAvailable, match="torchao"):
        q.int8_backend("torchao")
    with pytest.raises(ValueError, match="unknown int8 backend"):
        q.int8_backend("int4")


def test_perplexity_equals_exp_of_hf_loss(tiny):
    model, tok = tiny
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    t = torch.tensor([ids])
    with torch.no_grad():
        hf_loss = model(input_ids=t, labels=t).loss.item()
    assert q.perplexity(model, tok, [TEXT], window=512) == pytest.approx(math.exp(hf_loss), rel=1e-4)


def test_perplexity_over_windows_is_token_weighted(tiny):
    """Several windows (batched with padding) = exp of the token-weighted mean of HF losses."""
    model, tok = tiny
    windows = q.token_windows(tok, [TEXT, TEXT[:60]], window=16)
    assert len(windows) >= 3 and all(2 <= len(w) <= 16 for w in windows)
    total = count = 0
    with torch.no_grad():
        for w in windows:
            t = torch.tensor([w])
            total += model(input_ids=t, labels=t).loss.item() * (len(w) - 1)
            count += len(w) - 1
    got = q.perplexity(model, tok, [TEXT, TEXT[:60]], window=16, batch_size=3)
    assert got == pytest.approx(math.exp(total / count), rel=1e-4)


def test_token_windows_respects_budget(tiny):
    _, tok = tiny
    windows = q.token_windows(tok, [TEXT] * 5, window=16, max_tokens=40)
    assert sum(len(w) for w in windows) == 40


def test_eval_texts_falls_back_to_builtin(tmp_path):
    texts, source = q.eval_texts(str(tmp_path / "nothing-*.md"))
    assert texts == q.FALLBACK_TEXTS and "built-in" in source
    (tmp_path / "a_en.md").write_text("# Title\n\nSome text.\n", encoding="utf-8")
    texts, source = q.eval_texts(str(tmp_path / "*_en.md"))
    assert texts == ["# Title\n\nSome text."] and "1 files" in source


def test_gguf_unavailable_is_reported_plainly(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` -> ImportError
    ok, reason = q.gguf_status()
    assert not ok and "not installed" in reason and "make gguf" in reason
    with pytest.raises(q.GGUFUnavailable, match="make gguf"):
        q.build_variant("gguf")
    with pytest.raises(q.GGUFUnavailable, match="make gguf"):
        q.GGUFModel("whatever.gguf")


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown variant"):
        q.build_variant("int3")


def test_own_weights_keeps_ties_and_values(fresh_tiny):
    model, _ = fresh_tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q.own_weights(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_memory_meter_sees_a_short_spike():
    speed.release_memory()
    with speed.MemoryMeter() as mem:
        x = torch.ones(64 * speed.MB // 4)  # 64 MB, touched
        del x
        # hand the pages back even when the heap (not mmap) served them: earlier tests in the
        # same process may have raised malloc's mmap threshold
        speed.release_memory()
    assert mem.peak_delta > 48 * speed.MB
    assert mem.delta < mem.peak_delta


def test_lab_rejects_variants_without_fp32(tmp_path):
    r = run_script(LAB, "--quick", "--out", tmp_path, "variants=[bf16]", timeout=300)
    assert r.returncode == 2 and "fp32" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python not installed (optional; `make gguf`)")
def test_gguf_variant_runs_and_matches_fp32_quality(smol):
    model, tok = smol
    dep = q.build_variant("gguf")
    try:
        r = speed.measure_generation(dep.model, dep.tokenizer, speed.DEFAULT_PROMPTS[:1], 8)
        assert r.new_tokens == 8 and r.decode_tokens_per_s > 0
        texts = q.FALLBACK_TEXTS[:2]
        ppl_gguf = q.perplexity(dep.model, tok, texts, window=128)
        ppl_fp32 = q.perplexity(model, tok, texts, window=128)
        # the fp32 weights are the dequantised GGUF: same model, only kernels/rounding differ
        assert ppl_gguf == pytest.approx(ppl_fp32, rel=0.1)
    finally:
        dep.close()


@pytest.mark.slow
def test_lab_quick_run(tmp_path):
    r = run_script(LAB, "--quick", "--out", tmp_path, "prompts=1", "max_new_tokens=8",
                   "ppl_max_tokens=256", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    for v in ("fp32", "bf16", "int8"):
        assert m[f"{v}_tokens_per_s"] > 0 and m[f"{v}_first_token_ms"] > 0
        assert m[f"{v}_ppl"] > 1
    assert m["int8_model_mb"] < m["fp32_model_mb"]
    assert m["bf16_model_mb"] == pytest.approx(m["fp32_model_mb"] / 2, rel=0.01)
    assert m["fp32_ppl_rel"] == 1 and m["bf16_ppl_rel"] < 1.05
    assert isinstance(m["gguf_available"], bool)
    if not m["gguf_available"]:
        assert "make gguf" in m["gguf_status"]
    assert m["best_variant"] in ("fp32", "bf16", "int8", "gguf")
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "cpu_variants.png" in report and (tmp_path / "cpu_variants.png").exists()
