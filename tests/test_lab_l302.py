"""L3.02 8-GPU reference config: MoE parameter counts (against transformers), ZeRO model-state
accounting (ZeRO paper figure, DeepSpeed's own estimators), activations (against autograd),
communication, DeepSpeed config building + validation, and the lab end to end."""

import json
import re

import pytest

from conftest import ROOT, run_script
from llmtech.dist import memory as M
from llmtech.dist import zero as Z
from llmtech.errors import ConfigError

LAB = ROOT / "lessons/lesson3/02_8gpu_config/ds_config_builder.py"
V3 = Z.DEEPSEEK_V3
PSI = V3.params
SMALL = Z.MoEShape("small", layers=3, hidden=96, vocab=500, heads=3, q_lora_rank=0, kv_lora_rank=24,
                   qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24, dense_intermediate=160,
                   first_dense_layers=1, routed_experts=12, shared_experts=2, experts_per_token=3,
                   expert_intermediate=40, n_group=4, topk_group=2)


# --------------------------------------------------------------------------- parameter counts

def test_deepseek_v3_counts_by_hand_and_against_transformers():
    # per layer: MLA 7168·1536 + 1536·128·192 + 7168·576 + 512·128·256 + 128·128·7168 + norms
    att = 7168 * 1536 + 1536 * 24576 + 7168 * 576 + 512 * 32768 + 16384 * 7168 + 1536 + 512
    expert = 3 * 7168 * 2048
    moe_layer = att + 2 * 7168 + 257 * expert + 256 * 7168
    dense_layer = att + 2 * 7168 + 3 * 7168 * 18432
    total = 3 * dense_layer + 58 * moe_layer + 2 * 129280 * 7168 + 7168
    active = 3 * dense_layer + 58 * (att + 2 * 7168 + 9 * expert + 256 * 7168) + 2 * 129280 * 7168 + 7168
    assert (PSI, V3.active_params) == (total, active) == (671_026_404_352, 37_552_282_624)
    rows = {r["item"]: r["params"] for r in V3.arithmetic()}
    assert (rows["TOTAL"], rows["ACTIVE per token"]) == (total, active)
    from transformers import DeepseekV3Config

    assert Z.MoEShape.from_config(DeepseekV3Config(), name="deepseek-v3") == Z.MoEShape(
        **{**V3.__dict__, "source": ""})
    hf_total, hf_largest = Z.transformers_param_count(V3)  # meta device
    assert hf_total == PSI
    assert hf_largest == V3.largest_module(fused_experts=True) == 256 * expert
    assert V3.largest_module() == 129280 * 7168  # one module per expert: the embedding
    # a variant without q LoRA, with two shared experts and tied embeddings
    tied = Z.MoEShape(**{**SMALL.__dict__, "tied_embeddings": True})
    for s in (SMALL, tied):
        assert Z.transformers_param_count(s)[0] == s.params


def test_lora_params_equal_peft_and_nf4_share():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    shape = Z.MoEShape(**{**SMALL.__dict__, "q_lora_rank": 32})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Z._transformers_config(shape, 3, 1))
    targets = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
    n = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert n == shape.lora_params(4, "attention")
    # all-linear adds dense MLPs and every expert: r·(h + i) per linear, 3 linears each
    extra = 1 * 3 * 4 * (96 + 160) + 2 * (12 + 2) * 3 * 4 * (96 + 40)
    assert shape.lora_params(4, "all-linear") == n + extra
    assert 0.99 < V3.linear_params() / PSI < 1  # NF4 covers all but embedding/head/norms/router
    with pytest.raises(M.EstimateError):
        V3.lora_params(8, "experts-only")


# --------------------------------------------------------------------------- model states

def test_zero_paper_figure_1_and_a_dense_7b_preset():
    """ZeRO paper Fig. 1: Ψ = 7.5B, N = 64, K = 12 -> 120 / 31.4 / 16.6 / 1.9 GB per GPU."""
    got = [Z.model_states(7.5e9, s, "none", 64).gpu_model_states / Z.GB for s in Z.STAGES]
    assert got == pytest.approx([120, 31.40625, 16.640625, 1.875])
    assert [round(x, 1) for x in got] == [120.0, 31.4, 16.6, 1.9]
    llama = M.PRESETS["llama2-7b"].params  # 6.74B: 16 B/param without ZeRO, 16/N with stage 3
    assert Z.model_states(llama, 0, "none", 8).gpu_total == 16 * llama
    assert Z.model_states(llama, 3, "none", 8).gpu_model_states == pytest.approx(2 * llama)


def test_placement_partitioning_and_offload_rules():
    n = 8
    s1 = Z.model_states(PSI, 1, "none", n)
    assert s1.gpu == pytest.approx({"bf16 weights": 2 * PSI, "bf16 gradients": 2 * PSI,
                                    "Adam states (fp32 master, m, v)": 12 * PSI / n})
    off = Z.model_states(PSI, 3, "opt-cpu", n, largest_layer=V3.largest_module())
    assert off.gpu == pytest.approx({"bf16 weights": 2 * PSI / n, Z.WORK_BUFFER: 4 * V3.largest_module()})
    assert off.cpu_total == pytest.approx(14 * PSI)  # per node: grads 2 + states 12
    nv = Z.model_states(PSI, 3, "opt+param-nvme", n)
    assert (nv.gpu_total, nv.cpu_total, nv.nvme_total) == pytest.approx((0, 2 * PSI, 14 * PSI))
    lora = Z.model_states(1e6, 3, "none", n, frozen=PSI, largest_layer=100)
    assert lora.gpu["frozen weights"] == pytest.approx(2 * PSI / n)
    assert lora.gpu[Z.WORK_BUFFER] == 400  # default: trainable -> 2 + 2 bytes per gathered param
    for stage, offload in [(0, "opt-cpu"), (2, "opt+param-cpu"), (1, "opt+param-nvme")]:
        with pytest.raises(ConfigError, match="stage"):
            Z.model_states(PSI, stage, offload, n)
    with pytest.raises(ConfigError, match="offload"):
        Z.Setup("full", 3, "gpu")
    with pytest.raises(ConfigError, match="method/stage"):
        Z.Setup.parse("full-3")
    assert Z.Setup.parse("lora/3/opt+param-cpu").key == "lora_z3_opt_param_cpu"


@pytest.mark.parametrize("total,largest", [
    (M.PRESETS["llama2-7b"].params, Z.dense_largest_module(M.PRESETS["llama2-7b"])),
    (M.PRESETS["llama2-70b"].params, Z.dense_largest_module(M.PRESETS["llama2-70b"])),
    (PSI, V3.largest_module())])
def test_deepspeed_accounting_equals_deepspeeds_estimators(total, largest):
    for g, nodes in [(1, 1), (8, 1), (8, 4), (4, 2)]:
        for stage, offload in [(2, "none"), (2, "opt-cpu"), (3, "none"), (3, "opt-cpu"), (3, "opt+param-cpu")]:
            if stage == 2 and offload != "none" and nodes > 1:
                continue  # DeepSpeed's stage-2 offload CPU figure ignores the node count (module doc)
            for zi in (True, False):
                ds_cpu, ds_gpu = Z.deepspeed_estimate(total, stage, offload, g, nodes, largest, zi)
                ours = Z.model_states(total, stage, offload, g * nodes, largest_layer=largest,
                                      gpus_per_node=g, accounting="deepspeed", zero_init=zi)
                assert abs(ours.gpu_total - ds_gpu) <= 1, (g, nodes, stage, offload, zi)
                assert abs(ours.cpu_total - ds_cpu) <= 1, (g, nodes, stage, offload, zi)


def test_the_all_cold_printouts_and_the_terms_where_paper_and_deepspeed_differ():
    dense = M.PRESETS["llama2-7b"]
    total, largest = dense.params, Z.dense_largest_module(dense)
    text = Z.deepspeed_estimator_table(total, largest, 8)
    printed = [tuple(map(float, x)) for x in re.findall(r"([\d.]+)GB \|\s+([\d.]+)GB", text)]
    assert len(printed) == 2 + 6  # zero2: offload on/off; zero3: 3 offload choices × zero_init
    z3_offload_all = Z.model_states(total, 3, "opt+param-cpu", 8, largest_layer=largest, accounting="deepspeed")
    assert printed[2] == (round(z3_offload_all.cpu_total / Z.GIB, 2), round(z3_offload_all.gpu_total / Z.GIB, 2))
    z2 = Z.model_states(total, 2, "none", 8, accounting="deepspeed")
    assert printed[1][1] == round(z2.gpu_total / Z.GIB, 2)
    # named differences: stage 2 DS adds an fp32 gradient partition (4 B), stage 3 counts fp32
    # gradients (4 B) instead of bf16 (2 B); with offload: CPU = 1.5 × (paper + 2 B fp32 grads)
    n = 8
    for stage, extra in ((2, 4), (3, 2)):
        p = Z.model_states(total, stage, "none", n, largest_layer=largest)
        d = Z.model_states(total, stage, "none", n, largest_layer=largest, accounting="deepspeed")
        assert d.gpu_total - p.gpu_total == pytest.approx(extra * total / n)
    p = Z.model_states(total, 3, "opt-cpu", n, largest_layer=largest)
    d = Z.model_states(total, 3, "opt-cpu", n, largest_layer=largest, accounting="deepspeed")
    assert d.gpu_total == pytest.approx(p.gpu_total)
    assert d.cpu_total == pytest.approx(1.5 * (p.cpu_total + 2 * total))
    rows, worst = Z.compare_with_deepspeed(total, largest, 8)
    assert len(rows) == 10 and worst < 1e-9


# --------------------------------------------------------------------------- activations, comm

def test_activation_formula_equals_what_autograd_keeps():
    for shape in (SMALL, Z.MoEShape(**{**SMALL.__dict__, "q_lora_rank": 32, "n_group": 1, "topk_group": 1})):
        meas = Z.measure_saved_bytes(shape)
        t = Z.activation_terms(shape)
        assert t["attention (MLA)"] + t["dense MLP"] == pytest.approx(meas["dense_layer"], rel=1e-3)
        assert t["attention (MLA)"] + t["MoE MLP"] == pytest.approx(meas["moe_layer"], rel=0.01)
    full = Z.activation_bytes(V3, 1, 4096, checkpointing=False)
    ckpt = Z.activation_bytes(V3, 1, 4096, checkpointing=True)
    t = Z.activation_terms(V3)
    assert full["MoE layers"] == 58 * 4096 * (t["attention (MLA)"] + t["MoE MLP"])
    assert ckpt["checkpointed layer inputs"] == 61 * 7168 * 2 * 4096
    assert sum(ckpt.values()) < sum(full.values()) / 10
    assert sum(Z.activation_bytes(V3, 2, 4096).values()) == pytest.approx(2 * sum(ckpt.values()))


def test_comm_volume_follows_the_zero_paper():
    for s, k in zip(Z.STAGES, (2, 2, 2, 3)):
        c = Z.comm_volume(PSI, s, 8)
        assert c["elements"] == k * PSI and c["bytes"] == 2 * k * PSI
        assert c["ring_bytes"] == pytest.approx(c["bytes"] * 7 / 8)
    lora = Z.comm_volume(1e8, 3, 8, frozen=PSI)
    assert lora["elements"] == 3e8 + 2 * PSI  # frozen weights: all-gathered in forward and backward
    assert Z.comm_volume(1e8, 2, 8, frozen=PSI)["elements"] == 2e8
    t = Z.offload_traffic(PSI, 3, "opt+param-nvme", 8)
    assert t["nvme"] == pytest.approx(24 * PSI + 6 * PSI)  # states read+write, weights 2 reads + 1 write
    p = Z.plan(V3, Z.Setup("full", 3), Z.Cluster(), Z.Training())
    assert p.times["comm_nvlink_s"] == pytest.approx(3 * PSI * 2 * 7 / 8 / 450e9)


def test_what_fits_on_one_8_gpu_node():
    plans = {s: Z.plan(V3, Z.Setup.parse(s)) for s in
             ("full/3", "full/3/opt-cpu", "full/3/opt+param-cpu", "lora/3", "lora/3/opt+param-cpu", "qlora/3")}
    for s in ("full/3", "full/3/opt-cpu", "full/3/opt+param-cpu", "lora/3"):
        assert not plans[s].fits(80) and not plans[s].fits(141), s
    assert "CPU" in plans["full/3/opt+param-cpu"].limits(141)  # GPU is fine, 10.7 TB of RAM is not
    assert plans["full/3/opt+param-cpu"].states.cpu_total == pytest.approx(16 * PSI)
    big_ram = Z.Cluster(cpu_gb_per_node=12_000)
    assert Z.plan(V3, Z.Setup.parse("full/3/opt+param-cpu"), big_ram).fits(80)
    assert plans["lora/3/opt+param-cpu"].fits(80) and plans["qlora/3"].fits(80)


# --------------------------------------------------------------------------- DeepSpeed configs

def test_zero_config_buckets_and_deepspeeds_parser():
    h = 7168
    for stage, offload in [(0, "none"), (1, "opt-cpu"), (2, "none"), (2, "opt-nvme"), (3, "none"),
                           (3, "opt-cpu"), (3, "opt+param-cpu"), (3, "opt+param-nvme")]:
        cfg = Z.zero_config(stage, offload, True, 2, 4, 8, h, nvme_path="/nvme", largest_param=V3.largest_param())
        assert cfg["train_batch_size"] == 64
        ds = Z.validate_ds_config(cfg, 8)
        assert ds.zero_optimization_stage == stage and ds.bfloat16_config.enabled
        assert ds.train_micro_batch_size_per_gpu == 2 and ds.gradient_accumulation_steps == 4
        z = ds.zero_config
        if stage:
            assert z.reduce_bucket_size == h * h
        if stage == 3:
            assert (z.prefetch_bucket_size, z.param_persistence_threshold) == (int(0.9 * h * h), 10 * h)
        opt, par = Z.OFFLOADS[offload]
        assert (z.offload_optimizer.device if z.offload_optimizer else None) == opt
        assert (z.offload_param.device if z.offload_param else None) == par
        if par == "nvme":
            assert z.offload_param.buffer_size >= 129280 * 7168
    auto = Z.zero_config(3, "none", world_size=2)
    assert auto["zero_optimization"]["stage3_prefetch_bucket_size"] == "auto"
    Z.validate_ds_config({**auto, "train_batch_size": "auto"}, 2)  # transformers-style "auto"
    with pytest.raises(ConfigError, match="nvme_path"):
        Z.zero_config(3, "opt+param-nvme", world_size=8, hidden_size=h)
    with pytest.raises(ConfigError, match="stage 3"):
        Z.zero_config(2, "opt+param-cpu")


def test_inconsistent_batch_sizes_name_the_three_numbers():
    cfg = Z.zero_config(3, "opt-cpu", True, 2, 4, 8, 7168)
    from deepspeed.runtime.config import DeepSpeedConfig

    with pytest.raises(AssertionError):  # why our validator exists: offline DS sees world size 1
        DeepSpeedConfig(cfg)
    with pytest.raises(ConfigError) as e:
        Z.validate_ds_config({**cfg, "train_batch_size": 48}, 8, "ds.json")
    msg = str(e.value)
    assert "ds.json" in msg and "train_batch_size 48" in msg
    assert "train_micro_batch_size_per_gpu 2" in msg and "gradient_accumulation_steps 4" in msg
    assert "world_size 8" in msg and "= 64" in msg
    with pytest.raises(ConfigError, match="train_batch_size 10 != .* 2 .* 4 .* 8"):
        Z.zero_config(3, micro_batch=2, grad_accum=4, world_size=8, train_batch_size=10)
    no_accum = {k: v for k, v in cfg.items() if k != "gradient_accumulation_steps"}
    assert Z.resolve_batch(no_accum, 8) == (64, 2, 4)
    with pytest.raises(ConfigError, match="inconsistent"):
        Z.validate_ds_config({**no_accum, "train_batch_size": 60}, 8)
    with pytest.raises(ConfigError, match="offload_param needs stage 3"):
        Z.validate_ds_config({**cfg, "zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, 8)
    with pytest.raises(ConfigError, match="DeepSpeed rejected.*bogus"):
        Z.validate_ds_config({**cfg, "zero_optimization": {"stage": 3, "bogus": 1}}, 8)


def test_load_ds_config_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{\n  "train_micro_batch_size_per_gpu": 1,\n  "bf16": {enabled: true}\n}\n')
    with pytest.raises(ConfigError, match=r"ds.json: line 3"):
        Z.load_ds_config(bad, 8)
    with pytest.raises(ConfigError, match="not found"):
        Z.load_ds_config(tmp_path / "missing.json", 8)


# --------------------------------------------------------------------------- the lab

def test_lab_end_to_end_and_committed_reference_configs(tmp_path):
    r = run_script(LAB, "--quick", "--out", tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert (m["total_params_b"], m["active_params_b"]) == (671.026, 37.552)
    assert m["params_match_transformers"] is True and m["estimator_max_rel_diff"] < 1e-9
    assert m["paper_7p5b_stage3_gb"] == 1.875 and m["paper_7p5b_stage0_gb"] == 120
    assert not m["fits_80gb_full_z3"] and not m["fits_141gb_full_z3_opt_cpu"]
    assert m["fits_80gb_qlora_z3"] and m["fits_141gb_lora_z3_opt_param_cpu"]
    assert m["full_cpu_offload_needs_tb"] > 10 and m["comm_gb_stage3"] == round(3 * 2 * PSI / 1e9)
    assert abs(m["act_formula_over_measured_moe"] - 1) < 0.01
    assert "train_batch_size 32" in m["bad_batch_error"] and m["configs_validated"] == 12
    assert (tmp_path / "per_gpu_memory.png").stat().st_size > 10_000
    assert "ZeRO-3" in (tmp_path / "report.md").read_text()
    committed = sorted((ROOT / "configs/lessons").glob("L3.02_*.json"))
    assert committed, "reference configs configs/lessons/L3.02_*.json are missing"
    for f in committed:
        emitted = tmp_path / f"ds_config_{f.stem.removeprefix('L3.02_')}.json"
        assert json.loads(f.read_text()) == json.loads(emitted.read_text()), f.name
        Z.load_ds_config(f, 8)
    r = run_script(LAB, "--out", tmp_path / "bad", "setups=[full/9]")
    assert r.returncode == 2 and "setups" in r.stderr and "Traceback" not in r.stderr
