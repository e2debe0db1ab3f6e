"""L3.03 training acceleration: arm names, arms measured on tiny-llama, what checkpointing keeps
for backward (a deterministic count), the subprocess / timeout path and the lab end to end."""

import json
import math

import pytest
import torch

from conftest import ROOT, load_lab_module
from llmtech import labs
from llmtech.errors import ConfigError
from llmtech.train import accel

LAB = ROOT / "lessons/lesson3/03_training_acceleration/acceleration_tricks.py"
TINY = accel.AccelSettings(model="tiny-llama", steps=3, memory_steps=1, max_eval_samples=2)


# --------------------------------------------------------------------------- arm names

def test_arm_names_presets_combinations_and_errors():
    assert accel.parse_arm("baseline") == ()
    assert accel.parse_arm("packing+bf16") == ("bf16", "packing")  # canonical order
    assert accel.parse_arm(" bf16 + bf16 ") == ("bf16",)
    assert accel.parse_arm("fastest") == ("sdpa", "bf16", "packing")
    assert accel.parse_arm("leanest") == ("sdpa", "checkpointing", "bf16", "packing")
    assert [accel.attn_implementation(accel.parse_arm(a)) for a in
            ("baseline", "sdpa+bf16", "flash_attention_2")] == ["eager", "sdpa", "flash_attention_2"]
    with pytest.raises(ConfigError, match=r"unknown trick 'xyz' in arm 'bf16\+xyz'.*known tricks: sdpa"):
        accel.parse_arm("bf16+xyz")
    with pytest.raises(ConfigError, match="unknown trick"):
        accel.parse_arm("")
    with pytest.raises(ConfigError, match="sdpa and flash_attention_2"):
        accel.parse_arm("sdpa+flash_attention_2")
    cfg = load_lab_module(LAB, "l303_lab").Config
    assert cfg(arms=["bf16", "packing"]).arms == ["baseline", "bf16", "packing"]
    with pytest.raises(ConfigError, match=r"arms: unknown trick 'flash'"):
        cfg(arms=["bf16+flash"])


def test_cli_error_names_the_arm(capsys):
    assert accel._cli(["--arm", "turbo"]) == 2
    assert "unknown trick 'turbo'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the status row is for machines without CUDA")
def test_flash_attention_is_a_status_row_not_a_number():
    r = accel.run_arm("flash_attention_2+bf16", TINY)
    assert (r.status, r.note) == ("unavailable", accel.FLASH_UNAVAILABLE)
    assert not r.step_s and math.isnan(r.tokens_per_s)
    row = accel.summary_row(r, None)
    assert row["status"] == "unavailable" and "tokens/s" not in row and "speedup" not in row


# --------------------------------------------------------------------------- arms on tiny-llama

@pytest.fixture(scope="module")
def arms():
    pack = accel.pack_length_for(TINY)
    return pack, {a: accel.run_arm(a, TINY, pack) for a in
                  ("baseline", "sdpa+bf16+checkpointing", "packing")}


def test_every_arm_runs_its_steps_and_returns_sane_numbers(arms):
    _, res = arms
    for r in res.values():
        assert r.ok, r.note
        assert len(r.step_s) == len(r.losses) == len(r.real_tokens) == TINY.steps
        assert all(t > 0 for t in r.step_s) and all(math.isfinite(x) and x > 5 for x in r.losses)
        assert r.tokens_per_s > 0 and r.peak_mb > r.model_mb > 0
        assert math.isfinite(r.heldout_loss) and r.memory_steps == 1 and r.timed_from == 1
        assert all(0 < lt <= real <= t for lt, real, t in
                   zip(r.loss_tokens, r.real_tokens, r.tensor_tokens))
    assert res["sdpa+bf16+checkpointing"].attn_implementation == "sdpa"
    assert res["baseline"].attn_implementation == "eager" and not res["baseline"].bf16


def test_packing_removes_padding_and_keeps_the_tokens_per_step(arms):
    pack, res = arms
    base, packed = res["baseline"], res["packing"]
    assert base.padding_share > 0.1  # batches of 4 padded to their longest example
    assert packed.padding_share == 0 and packed.tensor_tokens == packed.real_tokens
    assert packed.rows_per_step == 1 and packed.row_length == pack
    assert all(pack * 0.8 <= n <= pack for n in packed.real_tokens)  # bins nearly full
    c = accel.compare(base, packed)
    assert c["loss_check"] == "held-out" and 0.7 < c["tokens_ratio"] < 1.4
    assert c["heldout_rel_diff"] < 0.05 and c["agree"]


def test_same_batches_same_losses_and_flat_metrics(arms):
    _, res = arms
    base, other = res["baseline"], res["sdpa+bf16+checkpointing"]
    assert other.real_tokens == base.real_tokens and other.tensor_tokens == base.tensor_tokens
    c = accel.compare(base, other, tolerance=0.05)
    assert c["loss_check"] == "per-step" and c["loss_max_rel_diff"] < 0.01 and c["agree"]
    assert accel.loss_agreement(base, base)["max_rel_diff"] == 0
    m = accel.arm_metrics(list(res.values()))
    k = "sdpa_bf16_checkpointing"
    assert m[f"speedup_{k}"] == pytest.approx(other.tokens_per_s / base.tokens_per_s, rel=1e-2)
    assert m[f"memory_ratio_{k}"] == pytest.approx(other.peak_mb / base.peak_mb, rel=1e-2)
    assert m["losses_agree_packing"] and "loss_max_rel_diff_packing" not in m
    assert "speedup_baseline" not in m and m["status_baseline"] == "ok"
    assert all(isinstance(v, (int, float, str, bool)) for v in m.values())


def test_checkpointing_keeps_far_fewer_activations_for_backward():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=4, num_attention_heads=4,
                                         num_key_value_heads=2))
    ids = torch.randint(0, 256, (4, 96))
    full = accel.saved_activation_bytes(model, ids, checkpointing=False)
    ckpt = accel.saved_activation_bytes(model, ids, checkpointing=True)
    # 4 layers x (norms, q/k/v/o inputs, MLP 3 x 128 ...) per token vs only the head's part
    assert ckpt < 0.3 * full
    assert not model.is_activation_checkpointing  # setting restored
    assert accel.saved_activation_bytes(model, ids, checkpointing=False) == full


def test_packed_examples_do_not_attend_to_each_other(tiny):
    # what packing relies on: position ids restarting at 0 give a block-diagonal causal mask in
    # training (no KV cache), for both attention implementations the arms use
    model, _ = tiny  # shared by the session: its attention implementation is put back
    before = model.config._attn_implementation
    a, b = torch.randint(0, 1000, (1, 7)), torch.randint(0, 1000, (1, 5))
    pos = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0)
    try:
        for impl in ("eager", "sdpa"):
            model.set_attn_implementation(impl)
            with torch.no_grad():
                alone = model(input_ids=b, use_cache=False).logits
                both = torch.cat([a, b], 1)
                packed = model(input_ids=both, position_ids=pos, use_cache=False).logits
                unmasked = model(input_ids=both, use_cache=False).logits
            assert torch.allclose(packed[:, 7:], alone, atol=1e-4), impl
            assert not torch.allclose(unmasked[:, 7:], alone, atol=1e-2)  # the check can fail
    finally:
        model.set_attn_implementation(before)


def test_subprocess_timeout_is_reported_not_raised():
    r = accel.run_arm_subprocess("compile", TINY, timeout=0.5)
    assert r.status == "timeout" and "not finished after 0.5 s" in r.note
    assert r.tricks == ["compile"] and not r.step_s


# --------------------------------------------------------------------------- the lab

def test_lab_end_to_end_on_tiny_llama(tmp_path, arms, capsys):
    lab = load_lab_module(LAB, "l303_lab_e2e")
    rec = labs.run(lab.main, lab.Config, argv=[
        "--quick", "--out", str(tmp_path), "model=tiny-llama", "steps=3", "memory_steps=1",
        "max_eval_samples=2", "arms=[checkpointing,compile,flash_attention_2]",
        "compile_timeout_s=1"], headline=lab.HEADLINE)
    m = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert m["lab"] == rec["lab"] and m["quick"] is True
    assert set(lab.HEADLINE) <= set(m) and m["headline"] == ",".join(lab.HEADLINE)
    assert m["status_baseline"] == m["status_checkpointing"] == "ok"
    assert m["status_compile"] == "timeout" and m["speedup_packing"] is None  # not run: null
    if not torch.cuda.is_available():
        assert m["status_flash_attention_2"] == "unavailable"
    assert m["speedup_checkpointing"] > 0 and m["memory_ratio_checkpointing"] > 0
    assert m["loss_max_rel_diff_checkpointing"] < 1e-3 and m["losses_agree_all"] is True
    assert m["saved_activation_mb_checkpointing"] < m["saved_activation_mb"]
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "FlashAttention-2" in report and "needs a CUDA GPU with flash-attn installed" in report
    assert "用时间换内存" in report and (tmp_path / "acceleration.png").stat().st_size > 10_000
    with pytest.raises(SystemExit) as e:
        labs.run(lab.main, lab.Config, argv=["--out", str(tmp_path / "bad"), "arms=[bf16+turbo]"])
    assert e.value.code == 2 and "unknown trick 'turbo'" in capsys.readouterr().err
