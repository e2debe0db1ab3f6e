"""Quantised inference deployment: transformers or DeepSpeed's inference engine, weights in
fp32 / bf16 / fp16, bitsandbytes int8 / NF4, or PyTorch dynamic int8 — and what this machine runs.

* ``DeployConfig`` — one deployment: ``engine`` (``transformers`` | ``deepspeed``), ``weights``
  (``fp32 | bf16 | fp16 | int8-bnb | nf4-bnb | int8-dynamic``), ``tp_size`` (DeepSpeed AutoTP
  tensor parallelism) and ``kernel_inject`` (DeepSpeed's fused inference kernels). It also parses a
  compact spec such as ``"deepspeed:fp16:inject:tp2"`` (``DeployConfig.parse``).
* ``capabilities()`` — what runs here, found by trying it on a tiny in-memory Llama (~0.5 s on a
  CPU once torch/transformers/deepspeed are imported): the CUDA devices, DeepSpeed's accelerator
  and the dtypes it accepts, whether ``deepspeed.init_inference`` runs without / with kernel
  injection, whether its int8 paths apply, and whether bitsandbytes' 4-bit and 8-bit layers run.
* ``build_engine(cfg, model_id)`` — load the weights (bitsandbytes through
  ``compress.bnb.load_quantized``) and wrap the model with ``deepspeed.init_inference`` when
  ``engine=deepspeed``. A combination that needs absent hardware (kernel injection or fp16 on a
  CPU, more tensor-parallel ranks than GPUs / processes) raises ``HardwareUnavailable`` naming what
  it needs, before anything is loaded.
* ``measure(engine, ...)`` — latency (time to first token, ms per token), throughput (tokens/s for
  one request and for a small left-padded batch) and memory (weight bytes; peak RSS above the
  pre-load level while loading and while serving; ``torch.cuda.max_memory_allocated`` on a GPU).

Checked on the 2-core CPU (DeepSpeed 0.19.8, CPU accelerator, torch 2.13): ``init_inference`` with
``replace_with_kernel_inject=False`` runs for Llama in fp32 and bf16 — it converts the dtype and
keeps the Hugging Face modules (same greedy tokens, about the same speed as plain transformers);
kernel injection fails with
``This op had not been implemented on CPU backend.``; ``dtype=torch.float16`` and
``dtype=torch.int8`` are refused by the accelerator (int8 is not in the CUDA accelerator's list
either, and the old MoQ weight quantiser in ``_convert_to_dtype`` is switched off), and
``quant={"enabled": True}`` is accepted but changes no weight. An NF4 bitsandbytes model wraps
fine (dtype bf16); an 8-bit one does not (DeepSpeed calls ``.float()``, which transformers refuses
for quantised models). AutoTP with ``tp_size=2`` under ``torchrun --nproc_per_node 2`` shards the
attention/MLP output projections; DeepSpeed's shared-memory all-reduce kernel segfaulted on this
machine, so on the CPU the ranks reduce through the process group (gloo) instead
(``cpu_allreduce="gloo"``, the default).
"""

from __future__ import annotations

import functools
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

import torch
from pydantic import Field, ValidationError, model_serializer, model_validator

from .. import models
from ..config import StrictModel
from ..errors import ConfigError, LlmtechError
from ..evals import speed

log = logging.getLogger(__name__)

MB = 1024 * 1024
ENGINES = ("transformers", "deepspeed")
WEIGHTS = ("fp32", "bf16", "fp16", "int8-bnb", "nf4-bnb", "int8-dynamic")
FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BNB_BITS = {"int8-bnb": 8, "nf4-bnb": 4}
GPU = "a CUDA GPU"


class HardwareUnavailable(LlmtechError):
    """The deployment needs hardware (or processes) this machine/run does not have."""

    def __init__(self, name: str, needs: str, reason: str):
        self.name, self.needs, self.reason = name, needs, reason
        super().__init__(f"{name} needs {needs}: {reason}")

    @property
    def status(self) -> str:
        return f"needs {self.needs}: {self.reason}"


# --------------------------------------------------------------------------- configuration

class DeployConfig(StrictModel):
    """One deployment configuration (see module docstring); ``name`` is its canonical spec."""

    engine: Literal["transformers", "deepspeed"] = "transformers"
    weights: Literal["fp32", "bf16", "fp16", "int8-bnb", "nf4-bnb", "int8-dynamic"] = "fp32"
    tp_size: int = Field(1, ge=1)  # tensor-parallel ranks (DeepSpeed AutoTP); one process each
    kernel_inject: bool = False  # DeepSpeed's fused CUDA inference kernels
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when torch sees one
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # nf4-bnb matmul dtype
    double_quant: bool = True  # nf4-bnb: quantise the per-block scales too
    cpu_allreduce: Literal["gloo", "shm"] = "gloo"  # tp_size > 1 on the CPU (see module doc)

    @model_validator(mode="before")
    @classmethod
    def _from_spec(cls, data):
        return _parse_spec(data) if isinstance(data, str) else data

    @model_validator(mode="after")
    def _combination(self):
        if self.engine != "deepspeed" and self.kernel_inject:
            raise ValueError("kernel_inject=true needs engine=deepspeed (the kernels are DeepSpeed's)")
        if self.engine != "deepspeed" and self.tp_size > 1:
            raise ValueError(f"tp_size={self.tp_size} needs engine=deepspeed (AutoTP shards the "
                             "model across ranks); transformers runs one whole model per process")
        if self.kernel_inject and self.weights not in FLOAT_DTYPES:
            raise ValueError(f"kernel_inject=true takes fp32/bf16/fp16 weights; {self.weights} "
                             "layers are not nn.Linear and cannot be fused into DeepSpeed's kernels")
        return self

    @model_serializer(mode="wrap")
    def _as_spec(self, handler):
        """Dump as the spec string when the spec says everything (reports stay readable)."""
        extra = ("compute_dtype", "double_quant", "cpu_allreduce")
        if all(getattr(self, f) == type(self).model_fields[f].default for f in extra):
            return self.name
        return handler(self)

    @classmethod
    def parse(cls, spec: "str | dict | DeployConfig") -> "DeployConfig":
        """A config from a spec string, a dict or a config; bad input -> ``ConfigError``."""
        if isinstance(spec, DeployConfig):
            return spec
        try:
            return cls.model_validate(spec)
        except ValidationError as e:
            msgs = []
            for err in e.errors():
                key = ".".join(str(x) for x in err["loc"])
                text = err["msg"].removeprefix("Value error, ")
                msgs.append(f"{key}: {text} (got {err.get('input')!r})" if key else text)
            raise ConfigError(f"deployment {spec!r}: " + "; ".join(msgs)) from None

    @property
    def name(self) -> str:
        """``engine:weights[:inject][:tpN][:cpu|:cuda]`` — parses back to the same config."""
        parts = [self.engine, self.weights]
        if self.kernel_inject:
            parts.append("inject")
        if self.tp_size > 1:
            parts.append(f"tp{self.tp_size}")
        if self.device != "auto":
            parts.append(self.device)
        return ":".join(parts)

    @property
    def key(self) -> str:
        """The name as a metrics-key suffix (``deepspeed_nf4_bnb``)."""
        return self.name.replace(":", "_").replace("-", "_")


def _parse_spec(spec: str) -> dict:
    """``"deepspeed:fp16:inject:tp2"`` -> field dict. Tokens after engine:weights: ``inject``,
    ``tpN``, ``cpu``/``cuda``."""
    tokens = [t.strip().lower() for t in spec.split(":") if t.strip()]
    if not tokens:
        raise ValueError("empty deployment spec; write engine:weights, e.g. deepspeed:bf16")
    out: dict[str, Any] = {"engine": tokens[0]}
    if tokens[0] not in ENGINES:
        raise ValueError(f"spec {spec!r}: unknown engine '{tokens[0]}'; use {' or '.join(ENGINES)}")
    if len(tokens) > 1:
        if tokens[1] not in WEIGHTS:
            raise ValueError(f"spec {spec!r}: unknown weights '{tokens[1]}'; use one of "
                             f"{', '.join(WEIGHTS)}")
        out["weights"] = tokens[1]
    for t in tokens[2:]:
        if t == "inject":
            out["kernel_inject"] = True
        elif t.startswith("tp") and t[2:].isdigit():
            out["tp_size"] = int(t[2:])
        elif t in ("cpu", "cuda"):
            out["device"] = t
        else:
            raise ValueError(f"spec {spec!r}: unknown option '{t}'; after engine:weights use "
                             "inject, tpN (e.g. tp2), cpu or cuda")
    return out


# --------------------------------------------------------------------------- capabilities

@dataclass(frozen=True)
class Capabilities:
    """What this machine / process can run (``capabilities()`` measures it by trying)."""

    device: str  # where weights go by default: cuda or cpu
    device_name: str
    gpus: int
    world_size: int  # processes in this launch (WORLD_SIZE; 1 when started by plain python)
    rank: int
    fp16_native: bool  # CUDA, or a CPU whose oneDNN has fp16 kernels (AVX512-FP16 / AMX-FP16)
    bf16_native: bool
    deepspeed: str  # version, or why it cannot be imported
    ds_accelerator: str
    ds_dtypes: str  # dtypes DeepSpeed's accelerator accepts for init_inference
    ds_plain: str  # "ok" or the error: init_inference without kernel injection + a forward
    ds_kernel_inject: str  # "ok" or the error
    ds_int8: str  # init_inference(dtype=torch.int8)
    ds_quant_block: str  # init_inference(quant={"enabled": True}): does any weight change?
    bnb: str  # bitsandbytes version and backend, or the import error
    bnb_nf4: str  # "ok" or the error: Linear4bit (NF4) forward on the device
    bnb_int8: str  # "ok" or the error: Linear8bitLt forward on the device

    def as_metrics(self, prefix: str = "cap_") -> dict[str, Any]:
        return {prefix + k: v for k, v in asdict(self).items()}


def _err(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:240]}"


def _probe_model():
    """A 1-layer Llama with random weights, built in memory (milliseconds)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).eval()


def _try_ds(device: str, **kwargs) -> tuple[str, Any]:
    """Run init_inference on the probe model plus one forward; ("ok", engine) or (error, None)."""
    import deepspeed

    try:
        eng = deepspeed.init_inference(_probe_model(), **kwargs)
        with torch.no_grad():
            eng.module(input_ids=torch.tensor([[1, 2, 3]], device=device))
        return "ok", eng
    except Exception as e:  # noqa: BLE001 — the error text is the finding
        return _err(e), None


def _probe_deepspeed(device: str) -> dict[str, str]:
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except Exception as e:  # noqa: BLE001
        why = f"not importable ({_err(e)})"
        return dict(deepspeed=why, ds_accelerator="-", ds_dtypes="-", ds_plain=why,
                    ds_kernel_inject=why, ds_int8=why, ds_quant_block=why)
    acc = get_accelerator()
    names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
             torch.int8: "int8"}
    out = dict(deepspeed=deepspeed.__version__, ds_accelerator=acc.device_name(),
               ds_dtypes=",".join(names.get(d, str(d)) for d in acc.supported_dtypes()))
    out["ds_plain"], _ = _try_ds(device, dtype=torch.float32, replace_with_kernel_inject=False)
    if device == "cuda":
        # Trying it would JIT-compile the CUDA kernels (minutes): ask the op builder instead.
        builder = acc.create_op_builder("InferenceBuilder")
        ok = builder is not None and builder.is_compatible(verbose=False)
        out["ds_kernel_inject"] = ("ok (op builder compatible; compiled on first use)" if ok else
                                   "InferenceBuilder is not compatible with this CUDA setup")
    else:
        out["ds_kernel_inject"], _ = _try_ds(device, dtype=torch.float32,
                                             replace_with_kernel_inject=True)
    out["ds_int8"], _ = _try_ds(device, dtype=torch.int8, replace_with_kernel_inject=False)
    status, eng = _try_ds(device, dtype=torch.float32, replace_with_kernel_inject=False,
                          quant={"enabled": True})
    if eng is not None:
        kinds = sorted({str(p.dtype).replace("torch.", "") for p in eng.module.parameters()})
        status = ("ok: int8 weights" if "int8" in kinds else
                  f"accepted, no effect: weights stay {'/'.join(kinds)}")
    out["ds_quant_block"] = status
    return out


def _probe_bnb(device: str) -> dict[str, str]:
    try:
        import bitsandbytes as bnb
        from bitsandbytes.cextension import BNB_BACKEND
    except Exception as e:  # noqa: BLE001
        why = f"not importable ({_err(e)})"
        return dict(bnb=why, bnb_nf4=why, bnb_int8=why)
    from ..compress.bnb import quiet_bnb_logs

    quiet_bnb_logs()  # the probe runs bnb layers directly
    out = {"bnb": f"{bnb.__version__} ({BNB_BACKEND} backend)"}
    x = torch.randn(2, 64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for key, make, dtype in [
            ("bnb_nf4", lambda: bnb.nn.Linear4bit(64, 64, compute_dtype=torch.bfloat16,
                                                  quant_type="nf4"), torch.bfloat16),
            ("bnb_int8", lambda: bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False),
             torch.float16 if device == "cuda" else torch.float32)]:
            try:
                layer = make().to(device)
                with torch.no_grad():
                    y = layer(x.to(device=device, dtype=dtype))
                out[key] = "ok" if torch.isfinite(y.float()).all() else "ran, non-finite output"
            except Exception as e:  # noqa: BLE001
                out[key] = _err(e)
    return out


def _cpu_model() -> str:
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def capabilities() -> Capabilities:
    """Probe this machine once per process (cached); see ``Capabilities``."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = "cuda" if gpus else "cpu"
    if gpus:
        name = f"{gpus} x {torch.cuda.get_device_name(0)}"
        fp16, bf16 = True, torch.cuda.is_bf16_supported()
    else:
        name = f"CPU {_cpu_model()} ({speed.threads()} threads)"
        fp16 = bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    caps = Capabilities(
        device=device, device_name=name, gpus=gpus,
        world_size=int(os.environ.get("WORLD_SIZE", "1")), rank=int(os.environ.get("RANK", "0")),
        fp16_native=fp16, bf16_native=bf16, **_probe_deepspeed(device), **_probe_bnb(device))
    log.info("capabilities: %s", caps)
    return caps


def resolve_device(cfg: DeployConfig, caps: Capabilities) -> str:
    return caps.device if cfg.device == "auto" else cfg.device


def requirement(cfg: DeployConfig, caps: Capabilities) -> tuple[str, str] | None:
    """``(needs, reason)`` when ``cfg`` cannot run here, else None. Nothing is loaded."""
    device = resolve_device(cfg, caps)
    ds = cfg.engine == "deepspeed"
    if device == "cuda" and caps.gpus == 0:
        return GPU, "device=cuda but torch sees no CUDA device (torch.cuda.is_available() is False)"
    if ds and not caps.deepspeed[:1].isdigit():
        return "DeepSpeed", f"deepspeed is {caps.deepspeed}; pip install deepspeed"
    if cfg.kernel_inject and not caps.ds_kernel_inject.startswith("ok"):
        return GPU, (f"DeepSpeed's fused inference kernels (transformer_inference op) are CUDA/ROCm "
                     f"only; on this {device} init_inference(replace_with_kernel_inject=True) "
                     f"fails with {caps.ds_kernel_inject}")
    if device == "cpu" and cfg.weights == "fp16" and not caps.fp16_native:
        why = ("this CPU has no native fp16 matmul (oneDNN reports no AVX512-FP16/AMX-FP16), so "
               "fp16 would be emulated; use bf16 here")
        if ds:
            why = f"DeepSpeed's {caps.ds_accelerator} accelerator accepts {caps.ds_dtypes} only; " + why
        return GPU, why
    if ds and device == "cpu" and not caps.ds_plain.startswith("ok"):
        return GPU, f"deepspeed.init_inference does not run on this CPU: {caps.ds_plain}"
    if device == "cuda" and cfg.weights == "int8-dynamic":
        return "the CPU", ("PyTorch's dynamic int8 kernels (fbgemm/onednn) run on the CPU only; "
                           "use int8-bnb on a GPU, or device=cpu")
    if cfg.weights in BNB_BITS:
        probe = caps.bnb_nf4 if cfg.weights == "nf4-bnb" else caps.bnb_int8
        if not probe.startswith("ok"):
            return f"bitsandbytes {cfg.weights} support", f"its layer failed on {device}: {probe}"
    if cfg.tp_size > 1:
        if device == "cuda" and cfg.tp_size > caps.gpus:
            return f"{cfg.tp_size} GPUs", f"tp_size={cfg.tp_size} but this machine has {caps.gpus}"
        if caps.world_size != cfg.tp_size:
            return (f"{cfg.tp_size} processes",
                    f"tp_size={cfg.tp_size} shards the model over one process per rank, but this "
                    f"run has WORLD_SIZE={caps.world_size}; start it with `deepspeed --no_local_rank "
                    f"--num_gpus {cfg.tp_size} SCRIPT ...` on a {cfg.tp_size}-GPU machine, or "
                    f"`torchrun --nproc_per_node {cfg.tp_size} SCRIPT ...` on the CPU")
    return None


def check(cfg: DeployConfig, caps: Capabilities | None = None) -> None:
    """Raise ``HardwareUnavailable`` when ``cfg`` cannot run on this machine / launch."""
    need = requirement(cfg, caps or capabilities())
    if need:
        raise HardwareUnavailable(cfg.name, *need)


# --------------------------------------------------------------------------- building

@dataclass
class Engine:
    """A built deployment: ``runner.generate`` generates (the DeepSpeed InferenceEngine or the
    model itself); ``model`` is the Hugging Face model (inside the DeepSpeed engine when wrapped)."""

    cfg: DeployConfig
    model: Any
    tokenizer: Any
    runner: Any
    device: str
    backend: str
    load_s: float
    mem_before: int  # bytes before loading: process RSS (CPU) or torch.cuda.memory_allocated
    load_peak: int  # peak bytes (same measure) while loading / quantising / wrapping

    @property
    def name(self) -> str:
        return self.cfg.name

    def nbytes(self) -> int:
        return speed.model_bytes(self.model)

    def close(self) -> None:
        self.model = self.runner = None
        speed.release_memory()
        if self.device == "cuda":
            torch.cuda.empty_cache()


def _load_weights(cfg: DeployConfig, model_id: str, device: str, seed: int):
    """(model, tokenizer, backend text) with the weights in ``cfg.weights``, on ``device``."""
    from ..compress import bnb, quantize

    if cfg.weights in BNB_BITS:
        bits = BNB_BITS[cfg.weights]
        model, tok = bnb.load_quantized(model_id, bits=bits, quant_type="nf4" if bits == 4 else None,
                                        double_quant=cfg.double_quant,
                                        compute_dtype=cfg.compute_dtype, seed=seed)
        what = (f"NF4{' + double quant' if cfg.double_quant else ''}, {cfg.compute_dtype} compute"
                if bits == 4 else "LLM.int8()")
        return model.eval(), tok, f"bitsandbytes {what}"
    dtype = "float32" if cfg.weights == "int8-dynamic" else str(FLOAT_DTYPES[cfg.weights])[6:]
    model, tok = models.load_lm(model_id, dtype=dtype, seed=seed)
    model.eval()
    quantize.own_weights(model)  # RSS then counts the weights themselves, not a mapped file
    if cfg.weights == "int8-dynamic":
        model, backend = quantize.quantize_int8_dynamic(model)
        return model, tok, f"dynamic int8, {backend}"
    return model.to(device), tok, f"{cfg.weights}"


def _ds_dtype(cfg: DeployConfig, model) -> torch.dtype:
    """The dtype init_inference converts the model to: the weights' float type; for quantised
    weights the dtype their non-quantised parts already have (bnb NF4: the compute dtype)."""
    if cfg.weights in FLOAT_DTYPES:
        return FLOAT_DTYPES[cfg.weights]
    return next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)


def _init_distributed(cfg: DeployConfig, device: str) -> None:
    import deepspeed
    import deepspeed.comm as dist

    if not dist.is_initialized():
        deepspeed.init_distributed()
    if device == "cpu" and cfg.cpu_allreduce == "gloo":
        # DeepSpeed reduces TP partial sums with its shared-memory kernel when it built one; that
        # kernel segfaulted on our test machine (DeepSpeed 0.19.8), so use the process group.
        cdb = dist.comm.cdb
        if hasattr(cdb, "shm_vector_kernel_level"):
            cdb.shm_vector_kernel_level = 0


def _wrap_deepspeed(cfg: DeployConfig, model, device: str):
    import deepspeed

    if cfg.tp_size > 1:
        _init_distributed(cfg, device)
    dtype = _ds_dtype(cfg, model)
    try:
        engine = deepspeed.init_inference(model, dtype=dtype,
                                          replace_with_kernel_inject=cfg.kernel_inject,
                                          tensor_parallel={"tp_size": cfg.tp_size})
    except Exception as e:  # noqa: BLE001 — DeepSpeed raises ValueError/AssertionError/RuntimeError
        raise LlmtechError(f"{cfg.name}: deepspeed.init_inference(dtype={dtype}, "
                           f"replace_with_kernel_inject={cfg.kernel_inject}, tp_size={cfg.tp_size}) "
                           f"failed: {_err(e)}") from None
    how = ("kernel injection" if cfg.kernel_inject else
           f"AutoTP x{cfg.tp_size}" if cfg.tp_size > 1 else "no kernel injection")
    return engine, f"DeepSpeed {deepspeed.__version__} init_inference ({how}, {str(dtype)[6:]})"


def build_engine(cfg: "DeployConfig | str", model_id: str = models.DEFAULT_LM, seed: int = 0,
                 caps: Capabilities | None = None) -> Engine:
    """Load ``model_id`` as ``cfg`` says; see the module docstring. Checks hardware first."""
    cfg = DeployConfig.parse(cfg)
    caps = caps or capabilities()
    check(cfg, caps)
    device = resolve_device(cfg, caps)
    speed.release_memory()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = _mem_now(device)
    t0 = time.perf_counter()
    with speed.MemoryMeter() as mem:
        model, tok, backend = _load_weights(cfg, model_id, device, seed)
        runner = model
        if cfg.engine == "deepspeed":
            runner, ds_backend = _wrap_deepspeed(cfg, model, device)
            backend = f"{ds_backend}; weights {backend}"
        else:
            backend = f"transformers; weights {backend}"
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    load_s = time.perf_counter() - t0
    load_peak = mem.peak
    if device == "cuda":
        load_peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()  # from here on: the serving peak
    log.info("built %s in %.1f s: %s", cfg.name, load_s, backend)
    return Engine(cfg, model, tok, runner, device, backend, load_s, before, load_peak)


def _mem_now(device: str) -> int:
    return torch.cuda.memory_allocated() if device == "cuda" else speed.rss_bytes()


# --------------------------------------------------------------------------- measuring

class _Clock:
    """A ``generate`` streamer noting when each new token exists (synchronising a GPU first)."""

    def __init__(self, cuda: bool):
        self.cuda, self.times, self._prompt_seen = cuda, [], False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt itself
            self._prompt_seen = True
            return
        if self.cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.no_grad()
def timed_generate(engine: Engine, prompt_ids: Sequence[int], max_new_tokens: int,
                   ignore_eos: bool = True) -> tuple[list[int], list[float]]:
    """Greedy generation of one prompt through the engine, stamping each token's arrival."""
    tok = engine.tokenizer
    clock = _Clock(engine.device == "cuda")
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=engine.device)
    out = engine.runner.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens if ignore_eos else None, do_sample=False,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, streamer=clock)
    return out[0, ids.shape[1]:].tolist(), clock.times


@torch.no_grad()
def batch_generate(engine: Engine, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int) -> float:
    """Generate ``max_new_tokens`` for every prompt at once (left-padded batch); wall seconds."""
    tok = engine.tokenizer
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), tok.pad_token_id, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p):] = torch.tensor(list(p))
        att[i, width - len(p):] = 1
    cuda = engine.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = engine.runner.generate(
        input_ids=ids.to(engine.device), attention_mask=att.to(engine.device),
        max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    if out.shape[1] - width != max_new_tokens:
        raise RuntimeError(f"batch generation gave {out.shape[1] - width} tokens, "
                           f"expected {max_new_tokens}")
    return wall


@dataclass
class DeployResult:
    """Measured numbers of one engine (``as_metrics(key)`` flattens them for metrics.json)."""

    load_s: float
    model_mb: float  # parameter + buffer bytes (quantised weights at their stored size)
    ttft_ms: float  # time to first token: prefill + first decode step (batch 1)
    ms_per_token: float  # steady decode latency per token (batch 1)
    tokens_per_s: float  # steady decode rate, one request
    total_tokens_per_s: float  # new tokens / whole request time, one request
    batch_size: int
    batch_tokens_per_s: float  # batch_size * new tokens / wall time of the batched call
    # Memory, in MB above what the process held before loading. CPU: process RSS (VmHWM peaks);
    # GPU: torch.cuda memory_allocated / max_memory_allocated.
    load_peak_mb: float  # peak while loading / quantising / wrapping
    serve_peak_mb: float  # peak while generating (weights + KV cache + activations)
    peak_mem_mb: float  # the larger of the two: what the deployment needs at its worst
    resident_mb: float  # held after generating
    other_cpu_pct: float  # share of the CPU other processes used while timing (>10: skewed)
    texts: list[str] = field(default_factory=list, repr=False)
    token_ids: list[list[int]] = field(default_factory=list, repr=False)

    def as_metrics(self, key: str) -> dict[str, Any]:
        d = asdict(self)
        d.pop("texts"), d.pop("token_ids")
        return {f"{k}_{key}": (round(v, 3) if isinstance(v, float) else v) for k, v in d.items()}


BUSY_PCT = 10.0  # other processes using more than this share of the CPU skew the timings


def measure(engine: Engine, prompts: Sequence[str] = speed.DEFAULT_PROMPTS[:2],
            max_new_tokens: int = 32, warmup: int = 1, batch_size: int = 4,
            busy_retries: int = 1) -> DeployResult:
    """Latency, throughput and memory of ``engine`` (greedy, EOS ignored so lengths match).

    Single-request numbers come from ``evals.speed.measure_generation`` (one prompt at a time,
    after ``warmup`` untimed passes); the batch number from one left-padded batch of the first
    ``batch_size`` prompts (cycled when fewer), after one untimed batch. When other processes
    used more than ``BUSY_PCT`` % of the CPU meanwhile, the timing is repeated up to
    ``busy_retries`` times and the least disturbed run is kept (``other_cpu_pct`` says how busy).
    """
    if batch_size < 1:
        raise LlmtechError(f"batch_size must be >= 1, got {batch_size}")
    batch_ids = speed.render_prompts(engine.tokenizer, [prompts[i % len(prompts)]
                                                        for i in range(batch_size)])
    best = None
    for attempt in range(1 + max(0, busy_retries)):
        run = _timed_run(engine, prompts, batch_ids, max_new_tokens, warmup if attempt == 0 else 0)
        if best is None or run[0].other_cpu_pct < best[0].other_cpu_pct:
            best = run
        if best[0].other_cpu_pct <= BUSY_PCT:
            break
        log.warning("%s: other processes used %.0f%% of the CPU while timing; timing again",
                    engine.name, run[0].other_cpu_pct)
    res, wall, batch_peak, token_ids = best
    if engine.device == "cuda":
        serve = torch.cuda.max_memory_allocated()
    else:
        serve = max(int(res.peak_rss_mb * MB), batch_peak)
    load_mb = (engine.load_peak - engine.mem_before) / MB
    serve_mb = (serve - engine.mem_before) / MB
    return DeployResult(
        load_s=engine.load_s, model_mb=engine.nbytes() / MB, ttft_ms=res.first_token_ms,
        ms_per_token=1000.0 / res.decode_tokens_per_s, tokens_per_s=res.decode_tokens_per_s,
        total_tokens_per_s=res.total_tokens_per_s, batch_size=batch_size,
        batch_tokens_per_s=batch_size * max_new_tokens / wall, load_peak_mb=load_mb,
        serve_peak_mb=serve_mb, peak_mem_mb=max(load_mb, serve_mb),
        resident_mb=(_mem_now(engine.device) - engine.mem_before) / MB,
        other_cpu_pct=res.other_cpu_pct, texts=res.texts, token_ids=token_ids)


def _timed_run(engine: Engine, prompts, batch_ids, max_new_tokens: int, warmup: int):
    """One timing pass: (SpeedResult, batch wall s, batch peak RSS, the timed replies' ids)."""
    captured: list[list[int]] = []

    def gen(ids, n, ignore_eos):
        new, times = timed_generate(engine, ids, n, ignore_eos)
        captured.append(new)
        return new, times

    try:
        res = speed.measure_generation(engine.model, engine.tokenizer, prompts, max_new_tokens,
                                       warmup=warmup, timed_generate=gen)
        batch_generate(engine, batch_ids, min(8, max_new_tokens))  # untimed: new shapes
        with speed.MemoryMeter() as mem:
            wall = batch_generate(engine, batch_ids, max_new_tokens)
    except (RuntimeError, TypeError, ValueError, AttributeError, NotImplementedError) as e:
        # e.g. injected kernels that do not fit this transformers version's generate()/cache API
        raise LlmtechError(f"{engine.name}: built, but generation failed: {_err(e)}") from e
    return res, wall, mem.peak, captured[-len(prompts):]


def prefix_agreement(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> float:
    """Mean share of each greedy reply that is token-for-token identical to the reference reply
    before the first difference (1.0 = same tokens; greedy decoding stays apart once it differs)."""
    if len(reference) != len(other) or not reference:
        raise ValueError("prefix_agreement needs the same, non-zero number of replies")
    shares = []
    for a, b in zip(reference, other):
        same = 0
        for x, y in zip(a, b):
            if x != y:
                break
            same += 1
        shares.append(same / max(len(a), 1))
    return statistics.mean(shares)


def results_figure(metrics: dict[str, Any], keys: Sequence[str], names: Sequence[str],
                   batch_size: int):
    """Three panels from the lab's metrics: decode tokens/s (batch 1), tokens/s (batch), and
    memory (load peak, serving peak, weight bytes) per configuration."""
    import matplotlib.pyplot as plt

    labels = list(names)
    x = list(range(len(keys)))
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.8))
    for a, metric, title in zip(ax[:2], ["tokens_per_s", "batch_tokens_per_s"],
                                ["decode tokens/s (1 request)", f"tokens/s (batch {batch_size})"]):
        a.bar(x, [metrics[f"{metric}_{k}"] for k in keys], color="tab:blue")
        a.set_title(title)
    for i, (metric, label) in enumerate([("load_peak_mb", "load peak"),
                                         ("serve_peak_mb", "serving peak"), ("model_mb", "weights")]):
        ax[2].bar([j + (i - 1) * 0.27 for j in x], [metrics[f"{metric}_{k}"] for k in keys], 0.27,
                  label=label)
    ax[2].set_title("memory MB above the pre-load level")
    ax[2].legend(fontsize=7)
    for a in ax:
        a.set_xticks(x, labels, fontsize=7, rotation=35, ha="right")
    fig.tight_layout()
    return fig


def launch_command(script: str, tp_size: int = 1, config: str | None = None,
                   gpu: bool = True) -> str:
    """The command that runs ``script`` with ``tp_size`` ranks: DeepSpeed's launcher on GPUs
    (``--no_local_rank``: lab scripts take no ``--local_rank``), torchrun on the CPU."""
    args = f" --config {config}" if config else ""
    if gpu:
        return f"deepspeed --no_local_rank --num_gpus {tp_size} {script}{args}"
    if tp_size > 1:
        return f"torchrun --nproc_per_node {tp_size} {script}{args}"
    return f"python {script}{args}"
