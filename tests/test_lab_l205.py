"""L2.05 quantised deployment: DeployConfig, capabilities, build_engine + measure, the lab."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conftest import ROOT, load_lab_module, run_script
from llmtech.config import load_config
from llmtech.dist import inference as inf
from llmtech.errors import ConfigError, LlmtechError

LAB = ROOT / "lessons/lesson2/05_deepspeek_quant/deepspeek_deploy.py"
GPU_YAML = ROOT / "configs/lessons/L2.05_gpu.yaml"
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks this CPU machine's facts")


def lab_module():
    return load_lab_module(LAB, "l205_lab")


# --------------------------------------------------------------------------- config

def test_spec_round_trip_and_keys():
    c = inf.DeployConfig.parse("deepspeed:fp16:inject:tp2")
    assert (c.engine, c.weights, c.kernel_inject, c.tp_size) == ("deepspeed", "fp16", True, 2)
    assert c.name == "deepspeed:fp16:inject:tp2" and inf.DeployConfig.parse(c.name) == c
    assert inf.DeployConfig.parse("transformers:nf4-bnb").key == "transformers_nf4_bnb"
    assert inf.DeployConfig.parse("deepspeed").weights == "fp32"
    d = inf.DeployConfig.parse({"engine": "transformers", "weights": "nf4-bnb",
                                "compute_dtype": "float16"})
    assert d.model_dump()["compute_dtype"] == "float16"  # non-spec fields dump as a dict
    assert c.model_dump() == "deepspeed:fp16:inject:tp2"  # plain ones as their spec


@pytest.mark.parametrize("bad, words", [
    ("transformers:int4", ["unknown weights 'int4'", "nf4-bnb"]),
    ({"engine": "deepspeed", "weights": "q3"}, ["weights", "'q3'"]),
    ("vllm:fp16", ["unknown engine 'vllm'"]),
    ("deepspeed:fp16:fast", ["unknown option 'fast'"]),
    ("transformers:fp16:inject", ["kernel_inject=true needs engine=deepspeed"]),
    ("transformers:fp32:tp2", ["tp_size=2 needs engine=deepspeed"]),
    ("deepspeed:nf4-bnb:inject", ["takes fp32/bf16/fp16 weights"]),
    ({"engine": "deepspeed", "tp_size": 0}, ["tp_size", "greater than or equal to 1"]),
])
def test_bad_configs_are_clear_errors(bad, words):
    with pytest.raises(ConfigError) as e:
        inf.DeployConfig.parse(bad)
    for w in words:
        assert w in str(e.value)


# --------------------------------------------------------------------------- hardware

@cpu_only
def test_capabilities_are_measured_on_this_cpu():
    caps = inf.capabilities()
    assert caps.device == "cpu" and caps.gpus == 0 and caps.ds_accelerator == "cpu"
    assert caps.ds_plain == "ok"  # init_inference without kernel injection runs on the CPU
    assert "not been implemented on CPU backend" in caps.ds_kernel_inject
    assert "int8 is not supported" in caps.ds_int8
    assert caps.ds_quant_block == "accepted, no effect: weights stay float32"
    assert caps.bnb_nf4 == "ok" and caps.bnb_int8 == "ok" and "CPU backend" in caps.bnb
    # fp16 on a CPU depends on the chip: oneDNN has fp16 kernels with AVX512-FP16 / AMX-FP16
    # (Intel Sapphire Rapids and later), and DeepSpeed's CPU accelerator then accepts float16 too
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "avx512_fp16" not in flags and "amx_fp16" not in flags:
        assert not caps.fp16_native
    assert ("float16" in caps.ds_dtypes.split(",")) == caps.fp16_native


@cpu_only
@pytest.mark.parametrize("spec, needs, words", [
    ("deepspeed:fp16:inject", "a CUDA GPU", ["not been implemented on CPU backend"]),
    ("deepspeed:bf16:inject", "a CUDA GPU", ["transformer_inference"]),
    ("deepspeed:fp16", "a CUDA GPU", ["accepts float32,bfloat16 only", "use bf16"]),
    ("transformers:fp16", "a CUDA GPU", ["no native fp16"]),
    ("deepspeed:bf16:tp2", "2 processes", ["WORLD_SIZE=1", "torchrun --nproc_per_node 2",
                                           "deepspeed --no_local_rank --num_gpus 2"]),
    ("transformers:fp32:cuda", "a CUDA GPU", ["torch sees no CUDA device"]),
])
def test_missing_hardware_is_named_before_loading(spec, needs, words):
    caps = inf.capabilities()
    if ":fp16" in spec and ":inject" not in spec and caps.fp16_native:
        # this CPU computes fp16 natively: nothing is missing, the configuration is allowed
        assert inf.requirement(inf.DeployConfig.parse(spec), caps) is None
        return
    # the model id does not exist: the check must fire before anything is loaded
    with pytest.raises(inf.HardwareUnavailable) as e:
        inf.build_engine(spec, "no-such-model")
    assert e.value.needs == needs and str(e.value).startswith(f"{spec} needs {needs}: ")
    assert e.value.status.startswith(f"needs {needs}: ")
    for w in words:
        assert w in str(e.value)


def test_gpu_side_rules_with_a_pretend_gpu_machine():
    gpu = dataclasses.replace(inf.capabilities(), device="cuda", gpus=2, world_size=1,
                              fp16_native=True, ds_kernel_inject="ok (op builder compatible)")
    req = lambda s: inf.requirement(inf.DeployConfig.parse(s), gpu)  # noqa: E731
    assert req("deepspeed:fp16:inject") is None and req("transformers:fp16") is None
    assert req("deepspeed:fp16:tp4") == ("4 GPUs", "tp_size=4 but this machine has 2")
    assert req("deepspeed:fp16:inject:tp2")[0] == "2 processes"  # 2 GPUs, but one process
    assert req("transformers:int8-dynamic")[0] == "the CPU"
    two = dataclasses.replace(gpu, world_size=2)
    assert inf.requirement(inf.DeployConfig.parse("deepspeed:fp16:inject:tp2"), two) is None


# --------------------------------------------------------------------------- build + measure

@pytest.fixture(scope="module")
def built():
    """tiny-llama built and measured once per configuration (1 prompt x 6 tokens, batch 2)."""
    out = {}
    for spec in ["transformers:fp32", "transformers:nf4-bnb", "transformers:int8-bnb",
                 "deepspeed:fp32"]:
        eng = inf.build_engine(spec, "tiny-llama")
        info = {"backend": eng.backend, "runner": type(eng.runner).__name__,
                "linears": {type(m).__name__ for m in eng.model.modules()
                            if "Linear" in type(m).__name__}}
        out[spec] = (info, inf.measure(eng, max_new_tokens=6, batch_size=2))
        eng.close()
    return out


def test_engines_are_what_they_say(built):
    assert built["transformers:fp32"][0]["runner"] == "LlamaForCausalLM"
    assert "Linear4bit" in built["transformers:nf4-bnb"][0]["linears"]
    assert "Linear8bitLt" in built["transformers:int8-bnb"][0]["linears"]
    ds = built["deepspeed:fp32"][0]
    assert ds["runner"] == "InferenceEngine" and "init_inference" in ds["backend"]
    assert ds["linears"] == {"Linear"}  # no kernel injection: the Hugging Face modules stay


def test_measured_metrics_are_positive_and_consistent(built):
    for spec, (_, r) in built.items():
        m = r.as_metrics("x")
        for k in ("model_mb", "ttft_ms", "ms_per_token", "tokens_per_s", "total_tokens_per_s",
                  "batch_tokens_per_s", "peak_mem_mb", "load_s"):
            assert m[f"{k}_x"] > 0, (spec, k)
        assert r.ms_per_token == pytest.approx(1000 / r.tokens_per_s)
        assert r.peak_mem_mb == max(r.load_peak_mb, r.serve_peak_mb)
        assert r.batch_size == 2 and [len(t) for t in r.token_ids] == [6, 6]
    fp32 = built["transformers:fp32"][1].model_mb
    assert built["transformers:nf4-bnb"][1].model_mb < 0.6 * fp32  # 4-bit linears + bf16 rest
    assert built["transformers:int8-bnb"][1].model_mb < fp32
    # DeepSpeed without kernel injection runs the very same modules: the same greedy tokens
    assert built["deepspeed:fp32"][1].token_ids == built["transformers:fp32"][1].token_ids


def test_deepspeed_cannot_wrap_an_8bit_bnb_model():
    with pytest.raises(LlmtechError, match=r"init_inference.*\.float\(\)"):
        inf.build_engine("deepspeed:int8-bnb", "tiny-llama")


def test_prefix_agreement():
    assert inf.prefix_agreement([[1, 2, 3, 4]], [[1, 2, 3, 4]]) == 1.0
    assert inf.prefix_agreement([[1, 2, 3, 4], [5, 6]], [[1, 2, 9, 4], [7, 6]]) == 0.25
    with pytest.raises(ValueError):
        inf.prefix_agreement([[1]], [])


# --------------------------------------------------------------------------- the lab

def test_gpu_yaml_validates_against_the_lab_config():
    cfg = load_config(lab_module().Config, GPU_YAML)
    names = [c.name for c in cfg.configs]
    assert names[0] == "transformers:fp32"
    assert {"deepspeed:fp16:inject", "deepspeed:bf16:inject", "transformers:nf4-bnb",
            "transformers:int8-bnb"} <= set(names)
    assert any(c.engine == "deepspeed" for c in cfg.configs)
    with pytest.raises(ConfigError, match="configs.0"):
        load_config(lab_module().Config, GPU_YAML, ["configs=[transformers:int4]"])


def test_lab_smoke_on_tiny_llama(tmp_path):
    r = run_script(LAB, "--quick", "--out", tmp_path, "model=tiny-llama",
                   "configs=[transformers:fp32,transformers:nf4-bnb,deepspeed:fp32,"
                   "deepspeed:fp16:inject]", "prompts=1", "max_new_tokens=4", "batch_size=2",
                   "ppl_max_tokens=64", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["measured_configs"] == 3 and m["unavailable_configs"] == 1
    assert m["reference_config"] == "transformers:fp32" and m["agreement_transformers_fp32"] == 1.0
    assert m["agreement_deepspeed_fp32"] == 1.0 and m["ppl_rel_deepspeed_fp32"] == pytest.approx(1)
    assert m["smallest_config"] == "transformers:nf4-bnb" and m["smallest_weight_ratio"] < 0.6
    for k in ("transformers_fp32", "transformers_nf4_bnb", "deepspeed_fp32"):
        assert m[f"status_{k}"] == "ok" and m[f"tokens_per_s_{k}"] > 0 and m[f"peak_mem_mb_{k}"] > 0
    if not torch.cuda.is_available():
        assert m["status_deepspeed_fp16_inject"].startswith("needs a CUDA GPU: ")
        assert m["deepspeed_kernel_inject_status"] == m["status_deepspeed_fp16_inject"]
        assert m["deepspeed_cpu_status"].startswith("cpu: init_inference without kernel injection")
        assert "int8 is not supported" in m["deepspeed_int8_status"]
    assert "deepspeed --no_local_rank --num_gpus 1" in m["gpu_command"]
    report = (tmp_path / "report.md").read_text()
    assert "needs a CUDA GPU" in report and "L2.05_gpu.yaml" in report
    assert (tmp_path / "deploy_configs.png").stat().st_size > 10_000


def test_busy_timings_are_repeated_and_the_quieter_run_kept(tiny, monkeypatch):
    from llmtech.evals import speed

    model, tok = tiny
    eng = inf.Engine(inf.DeployConfig(), model, tok, model, "cpu", "test", 0.1, 0, 0)
    busy = iter([60.0, 4.0, 0.0])
    calls = []

    def fake_run(engine, prompts, batch_ids, n, warmup):
        calls.append(warmup)
        pct = next(busy)
        res = speed.SpeedResult(10.0, 100.0 - pct, 50.0, n, 5.0, 1, 1.0, 0.5, pct, 1.0, 0.1, ["x"])
        return res, 0.5, 0, [[1] * n]

    monkeypatch.setattr(inf, "_timed_run", fake_run)
    r = inf.measure(eng, ["hi"], max_new_tokens=4, batch_size=2, busy_retries=2)
    assert calls == [1, 0]  # busy (60 %) -> timed again without warm-up; 4 % is quiet: stop
    assert r.other_cpu_pct == 4.0 and r.tokens_per_s == 96.0 and r.batch_tokens_per_s == 16.0
