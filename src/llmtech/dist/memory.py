"""Training memory per fine-tuning method: an estimate from the model's shape, a measurement on
this machine, and a selector that recommends full / LoRA / QLoRA / P-Tuning v2 for a GPU.

Estimate (``estimate``)
=======================

For a Llama-architecture decoder (``ModelShape``: layers L, hidden h, intermediate i, heads n,
key/value heads k, head dim d, vocabulary V), batch b, sequence s (T = b·s tokens):

* **weights** — every parameter at its storage dtype: fp32 4 B, bf16 2 B; QLoRA stores the
  decoder's linear layers in NF4 with double quantisation: 4 bits per weight + one 8-bit absmax per
  block of 64 + one fp32 scale per 256 blocks = 4.127 bits (4.5 bits without double
  quantisation). Embeddings, norms and the output head stay unquantised (fp32 after PEFT's
  ``prepare_model_for_kbit_training``, which upcasts them). LoRA / prefix parameters are fp32.
* **gradients** — one per trainable parameter, in the trainable parameter's dtype.
* **optimizer states** — AdamW keeps two states (m, v) per trainable parameter: 8 B in 32 bits,
  2 B with bitsandbytes' 8-bit AdamW; mixed precision (bf16 weights) adds an fp32 master copy,
  4 B (the ZeRO paper's 2 + 2 + 12 = 16 B per parameter for full fine-tuning).
* **activations** — what autograd keeps from the forward pass for the backward pass. The
  per-layer terms (``layer_terms``) are written from what each op of a Llama block saves
  (checked op by op with ``torch.autograd.graph.saved_tensors_hooks``, see ``saved_tensor_bytes``):

  - RMSNorm (×2): its input, upcast to fp32 (4 B · h), and 1/rms (4 B); the normalised input
    (h) only when the norm weight is trained (the product ``weight * x̂`` needs x̂ for the
    weight's gradient, and only ``weight`` for the input's gradient);
  - a linear layer keeps its input only when its weight is trained (``x`` is needed for ∂W,
    ``W`` for ∂x): q/k/v share one input (h), gate/up share one (h), o's input is the
    attention output (kept anyway), down's input is the MLP product (i);
  - attention (PyTorch SDPA, flash kernel): q and k after RoPE, v, the output (n·d, k·d, k·d,
    n·d) and the log-sum-exp (n floats per token). With a padding mask (P-Tuning's prefix mask)
    transformers repeats k/v to n heads, SDPA keeps the repeated copies of length s + p and the
    float mask (s + p per token);
  - SwiGLU MLP: gate output (SiLU's input), SiLU output and up output (3·i);
  - LoRA on a linear with input width d_in: with dropout, the dropout output (d_in) and its
    mask (d_in: a float tensor on the CPU, a bool byte on CUDA); without dropout the layer
    input itself (shared); plus A's output (r) kept by B.

  After the last layer: the final norm (as above), the head's input when the head is trained,
  and the logits. transformers computes the loss in fp32: log-softmax keeps its output
  (T·V·4 B), and backward starts by materialising the gradient of that output and then of the
  logits, so three T×V fp32 tensors live at once (when the caller has dropped the logits, as the
  HF Trainer does) — or the logits' gradient plus the head's weight gradient, whichever is
  larger. For a 49k-vocabulary 135M model this is the largest single term.

  Gradient checkpointing keeps only each layer's input (h per token per layer) and recomputes one
  layer at a time during backward: L·h + max(one layer's terms, head + logits).

Peak. Gradients and activations do not coexist in full: activations are freed during backward
while gradients appear. In steady training (optimizer states exist from step 1 on) the peak is

    total = weights + optimizer + max(activations, gradients + step temporaries)

where step temporaries are two copies of the largest trainable tensor with PyTorch's
single-tensor AdamW (the CPU default: ``exp_avg_sq.sqrt() / c``) and none with the fused CUDA
AdamW that transformers' Trainer uses by default (torch's plain foreach AdamW would add one
temporary copy of the states, 4 B per trainable parameter). ``MemoryEstimate.total`` is that peak;
``naive_sum`` (all four added up) is what simple calculators print.

Measurement (``measure`` / ``python -m llmtech.dist.memory measure``)
=====================================================================

One process per method: imports and a warm-up step with ``tiny-llama`` first (thread pools,
allocator arenas, kernel caches are paid there), then the baseline RSS, then load + ``steps``
training steps (forward, backward, AdamW step; step 2 is the steady state with optimizer
states). The kernel's RSS high-water mark is reset before each phase (``MemoryMeter``), so the
measured peak is exact; measured = peak − baseline. On the CPU "GPU memory" is the process RSS,
with glibc told to return freed blocks at once (``set_mmap_threshold``); when a GPU is present the
same steps run there and ``torch.cuda.max_memory_allocated`` is read instead (fused AdamW).

Selection (``recommend``)
=========================

For each method the cheapest configuration that fits ``usable = gpu_memory × headroom`` (0.9:
CUDA context, allocator fragmentation, kernel workspaces) is found: the requested micro-batch
without gradient checkpointing, then with it, then smaller micro-batches (gradient accumulation
keeps the effective batch). Methods are ranked by expected quality for the goal (``GOALS``); a
method of the same quality tier that fits without compromises (no checkpointing, full
micro-batch) goes before one that needs them — this is how QLoRA wins when memory is tight.
Nothing fitting raises ``DoesNotFit`` with the cheapest option's numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import LlmtechError

log = logging.getLogger(__name__)

MB = 1024 ** 2
GB = 1024 ** 3
METHODS = ("full", "lora", "qlora", "ptuning")
METHOD_NAMES = {"full": "全参微调", "lora": "LoRA", "qlora": "QLoRA", "ptuning": "P-Tuning v2"}

# bits per stored weight
NF4_BITS_DQ = 4 + 8 / 64 + 32 / (64 * 256)  # 4.127: NF4 + 8-bit absmax/64 + fp32 scale/256 blocks
NF4_BITS = 4 + 32 / 64  # 4.5: NF4 + fp32 absmax per block of 64
DTYPE_BYTES = {"fp32": 4.0, "float32": 4.0, "bf16": 2.0, "bfloat16": 2.0, "fp16": 2.0,
               "float16": 2.0, "nf4": NF4_BITS_DQ / 8, "nf4-nodq": NF4_BITS / 8}
OPTIMIZERS = {"adamw": 8.0, "adamw8bit": 2.0, "sgd": 0.0}  # state bytes per trainable parameter
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class EstimateError(LlmtechError):
    """Bad input to the memory estimator (unknown method, model, dtype...)."""


class DoesNotFit(LlmtechError):
    """No method fits the memory given; the message names the cheapest option and its numbers."""

    def __init__(self, message: str, cheapest: "MemoryEstimate | None" = None,
                 usable_bytes: int = 0):
        super().__init__(message)
        self.cheapest = cheapest
        self.usable_bytes = usable_bytes


def _bytes(dtype: str) -> float:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise EstimateError(f"unknown dtype '{dtype}'; known: {', '.join(DTYPE_BYTES)}") from None


# --------------------------------------------------------------------------- model shape

@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-style decoder that memory depends on."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int = 0  # 0 = hidden // heads
    tied_embeddings: bool = False
    qkv_bias: bool = False
    source: str = ""

    def __post_init__(self):
        for f in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab"):
            if getattr(self, f) <= 0:
                raise EstimateError(f"model shape '{self.name}': {f} must be > 0")
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """One decoder layer's linear layers: name -> (in_features, out_features)."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i),
                "down_proj": (i, h)}

    def param_groups(self) -> dict[str, int]:
        """Parameter counts: decoder linears (what QLoRA quantises), biases, norms, embeddings, head."""
        lin = sum(a * b for a, b in self.linear_shapes().values()) * self.layers
        bias = (self.q_dim + 2 * self.kv_dim) * self.layers if self.qkv_bias else 0
        norms = (2 * self.layers + 1) * self.hidden
        emb = self.vocab * self.hidden
        head = 0 if self.tied_embeddings else self.vocab * self.hidden
        return {"linear": lin, "bias": bias, "norm": norms, "embedding": emb, "head": head}

    @property
    def params(self) -> int:
        return sum(self.param_groups().values())

    @classmethod
    def from_config(cls, config: Any, name: str = "", source: str = "") -> "ModelShape":
        """From a transformers config object or a config.json dict."""
        get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
        try:
            heads = int(get("num_attention_heads"))
            return cls(name=name or str(get("_name_or_path", "") or get("model_type", "model")),
                       layers=int(get("num_hidden_layers")), hidden=int(get("hidden_size")),
                       intermediate=int(get("intermediate_size")), heads=heads,
                       kv_heads=int(get("num_key_value_heads") or heads),
                       vocab=int(get("vocab_size")), head_dim=int(get("head_dim") or 0),
                       tied_embeddings=bool(get("tie_word_embeddings", False)),
                       qkv_bias=bool(get("attention_bias", False) or get("model_type") == "qwen2"),
                       source=source)
        except (TypeError, ValueError) as e:
            raise EstimateError(f"config of '{name or 'model'}' lacks a Llama-style field: {e}") from None


# Dimensions from the models' public config.json files (Hugging Face Hub), checked against their
# published parameter counts in tests/test_lab_l206.py.
PRESETS: dict[str, ModelShape] = {s.name: s for s in [
    ModelShape("smollm2-135m", 30, 576, 1536, 9, 3, 49152, 64, tied_embeddings=True,
               source="HuggingFaceTB/SmolLM2-135M-Instruct config.json (the bundled model)"),
    ModelShape("qwen2.5-0.5b", 24, 896, 4864, 14, 2, 151936, 64, tied_embeddings=True,
               qkv_bias=True, source="Qwen/Qwen2.5-0.5B-Instruct config.json"),
    ModelShape("qwen2.5-1.5b", 28, 1536, 8960, 12, 2, 151936, 128, tied_embeddings=True,
               qkv_bias=True, source="Qwen/Qwen2.5-1.5B-Instruct config.json"),
    ModelShape("llama2-7b", 32, 4096, 11008, 32, 32, 32000, source="meta-llama/Llama-2-7b-hf config.json"),
    ModelShape("llama2-13b", 40, 5120, 13824, 40, 40, 32000, source="meta-llama/Llama-2-13b-hf config.json"),
    ModelShape("llama2-70b", 80, 8192, 28672, 64, 8, 32000, source="meta-llama/Llama-2-70b-hf config.json"),
]}
ALIASES = {"135m": "smollm2-135m", "0.5b": "qwen2.5-0.5b", "1.5b": "qwen2.5-1.5b",
           "7b": "llama2-7b", "13b": "llama2-13b", "70b": "llama2-70b"}


def model_shape(model: "str | ModelShape | Any") -> ModelShape:
    """A ``ModelShape`` from a shape, a preset name or alias (``7b``...), a transformers config or
    model, or a model id / folder with a config.json (``tiny-llama`` builds its config)."""
    if isinstance(model, ModelShape):
        return model
    if not isinstance(model, str):
        cfg = getattr(model, "config", model)
        return ModelShape.from_config(cfg, name=getattr(cfg, "_name_or_path", "") or "model")
    key = ALIASES.get(model.lower(), model.lower())
    if key in PRESETS:
        return PRESETS[key]
    from .. import models

    spec = models.REGISTRY.get(model)
    if spec is not None and spec.source == "tiny":
        lm, _ = models.load_lm(model)
        return ModelShape.from_config(lm.config, name=model, source="models.build_tiny_llama")
    path = Path(model) if Path(model).is_dir() else None
    if path is None:
        try:
            path = models.resolve(model)
        except LlmtechError as e:
            raise EstimateError(f"unknown model '{model}': not a preset ({', '.join(PRESETS)}; "
                               f"aliases {', '.join(ALIASES)}) and not resolvable ({e})") from None
    cfg = path / "config.json"
    if not cfg.exists():
        raise EstimateError(f"{path}: no config.json to read the model's dimensions from")
    return ModelShape.from_config(json.loads(cfg.read_text(encoding="utf-8")), name=model,
                                  source=str(cfg))


# --------------------------------------------------------------------------- estimate

@dataclass
class MemoryEstimate:
    """Training memory of one method (bytes). ``total`` is the steady-state peak (module doc)."""

    method: str
    model: str
    batch: int
    seq_len: int
    gradient_checkpointing: bool
    params_total: int
    params_trainable: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    step_temporaries: int
    activation_parts: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + max(self.activations,
                                                   self.gradients + self.step_temporaries)

    @property
    def peak_phase(self) -> str:
        return "backward" if self.activations >= self.gradients + self.step_temporaries \
            else "optimizer step"

    @property
    def naive_sum(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def breakdown(self, unit: int = GB) -> str:
        """'weights a + optimizer b + activations c = X' (the parts present at the peak)."""
        u = "GB" if unit == GB else "MB"
        peak = (f"activations {self.activations / unit:.2f}" if self.peak_phase == "backward"
                else f"gradients {self.gradients / unit:.2f} + step temporaries "
                     f"{self.step_temporaries / unit:.2f}")
        return (f"weights {self.weights / unit:.2f} + optimizer {self.optimizer / unit:.2f} + "
                f"{peak} = {self.total / unit:.2f} {u}")

    def as_metrics(self, prefix: str = "", unit: int = MB) -> dict[str, float]:
        p = f"{prefix}_" if prefix else ""
        out = {f"{p}{k}_mb": round(getattr(self, k) / unit, 2)
               for k in ("weights", "gradients", "optimizer", "activations", "total")}
        out[f"{p}trainable_params"] = self.params_trainable
        return out

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(total=self.total, peak_phase=self.peak_phase, naive_sum=self.naive_sum)
        return d


def lora_targets(shape: ModelShape, targets: str | Iterable[str] = "all-linear") -> list[str]:
    """Which of a layer's linears LoRA adapts ("all-linear" = all seven; the head is excluded)."""
    if targets == "all-linear":
        return list(LINEARS)
    names = [targets] if isinstance(targets, str) else list(targets)
    bad = [t for t in names if t not in LINEARS]
    if bad:
        raise EstimateError(f"LoRA target(s) {bad} are not Llama linears; use {list(LINEARS)} "
                           "or 'all-linear'")
    return [t for t in LINEARS if t in names]


def trainable_params(shape: ModelShape, method: str, lora_r: int = 8,
                     lora_target_modules: str | Iterable[str] = "all-linear",
                     prefix_tokens: int = 16) -> int:
    """Trainable parameters: all (full); r·(d_in + d_out) per adapted linear (LoRA/QLoRA, the
    same count as ``train.lora.analytic_lora_params``); p · L · 2 · k·d (P-Tuning v2 / PEFT
    prefix tuning without reparameterisation: one key and one value vector per layer and
    virtual token)."""
    _check_method(method)
    if method == "full":
        return shape.params
    if method in ("lora", "qlora"):
        shapes = shape.linear_shapes()
        return shape.layers * sum(lora_r * (shapes[t][0] + shapes[t][1])
                                  for t in lora_targets(shape, lora_target_modules))
    return prefix_tokens * shape.layers * 2 * shape.kv_dim


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise EstimateError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")


def layer_terms(shape: ModelShape, method: str, batch: int, seq_len: int, act_bytes: float = 4,
                mask_bytes: float = 4, lora_r: int = 8,
                lora_target_modules: str | Iterable[str] = "all-linear",
                lora_dropout: float = 0.05, prefix_tokens: int = 0) -> dict[str, float]:
    """Bytes one decoder layer keeps for backward, by term (see the module docstring).

    Counts a layer whose input requires grad (every layer but the first under LoRA / P-Tuning,
    where the embeddings are frozen: the first layer keeps a little less)."""
    _check_method(method)
    T = batch * seq_len
    h, i, a = shape.hidden, shape.intermediate, act_bytes
    base_trained = method == "full"
    t: dict[str, float] = {
        "norm inputs (fp32)": 2 * T * h * 4,
        "norm 1/rms": 2 * T * 4,
        "q after RoPE": T * shape.q_dim * a,
        "attention output": T * shape.q_dim * a,
        "attention log-sum-exp": T * shape.heads * 4,
        "MLP gate, SiLU, up outputs": 3 * T * i * a,
    }
    if method == "ptuning":
        s_kv = seq_len + prefix_tokens
        t["k, v with prefix (repeated to all heads)"] = 2 * batch * s_kv * shape.q_dim * a
        t["prefix attention mask"] = T * s_kv * a
    else:
        t["k after RoPE, v"] = 2 * T * shape.kv_dim * a
    if base_trained:
        t["normalised norm inputs"] = 2 * T * h * a
        t["linear inputs (qkv, gate/up, down)"] = T * (2 * h + i) * a
    if method in ("lora", "qlora"):
        shapes = shape.linear_shapes()
        targets = lora_targets(shape, lora_target_modules)
        if lora_dropout > 0:
            d_in = sum(shapes[n][0] for n in targets)
            t["LoRA dropout outputs"] = T * d_in * a
            t["LoRA dropout masks"] = T * d_in * mask_bytes
        else:  # lora_A keeps the base layer's input: one per distinct input tensor
            shared = {"q_proj": h, "k_proj": h, "v_proj": h, "gate_proj": -h, "up_proj": -h,
                      "down_proj": i}  # o_proj's input (attention output) is kept anyway
            groups = {("qkv" if v == h else "gu" if v == -h else n): abs(v)
                      for n, v in shared.items() if n in targets}
            t["LoRA inputs (shared)"] = T * sum(groups.values()) * a
        t["LoRA A outputs"] = T * lora_r * len(targets) * a
    return t


def head_terms(shape: ModelShape, method: str, batch: int, seq_len: int,
               act_bytes: float = 4) -> dict[str, float]:
    """After the last layer: final norm, the head's input (when the head is trained), logits."""
    T = batch * seq_len
    t = {"final norm input (fp32), 1/rms": T * (shape.hidden + 1) * 4,
         "log-softmax output (fp32)": T * shape.vocab * 4}
    if method == "full":
        t["final norm normalised + head input"] = 2 * T * shape.hidden * act_bytes
    return t


def estimate(model: "str | ModelShape | Any", method: str, batch: int = 4, seq_len: int = 512,
             weight_dtype: str | None = None, optimizer: str = "adamw",
             gradient_checkpointing: bool = False, lora_r: int = 8,
             lora_target_modules: str | Iterable[str] = "all-linear", lora_dropout: float = 0.05,
             prefix_tokens: int = 16, activation_dtype: str | None = None,
             device: str = "cuda", double_quant: bool = True,
             master_weights: bool | None = None) -> MemoryEstimate:
    """Training memory of ``method`` for ``model`` (see the module docstring for every term).

    Defaults follow the usual recipe per device: on ``cuda`` the base weights are bf16 (mixed
    precision; full fine-tuning keeps fp32 master weights) and activations bf16; on ``cpu``
    everything is fp32 (what ``measure`` runs). QLoRA: NF4 decoder linears, fp32 embeddings,
    norms and head (``prepare_model_for_kbit_training``).
    """
    _check_method(method)
    if device not in ("cuda", "cpu"):
        raise EstimateError(f"device must be 'cuda' or 'cpu', not '{device}'")
    if batch < 1 or seq_len < 1:
        raise EstimateError(f"batch and seq_len must be >= 1 (got {batch}, {seq_len})")
    if optimizer not in OPTIMIZERS:
        raise EstimateError(f"unknown optimizer '{optimizer}'; known: {', '.join(OPTIMIZERS)}")
    shape = model_shape(model)
    g = shape.param_groups()
    wdt = weight_dtype or ("fp32" if device == "cpu" else "bf16")
    if method == "qlora" and weight_dtype is None:
        wdt = "nf4" if double_quant else "nf4-nodq"
    wb = _bytes(wdt)
    adt = activation_dtype or ("fp32" if device == "cpu" else "bf16")
    a = _bytes(adt)
    mask_b = a if device == "cpu" else 1.0  # CPU dropout keeps a float mask, CUDA a bool byte
    n_train = trainable_params(shape, method, lora_r, lora_target_modules, prefix_tokens)

    # weights
    if method == "qlora":
        unquant = g["bias"] + g["norm"] + g["embedding"] + g["head"]
        weights = g["linear"] * wb + unquant * 4 + n_train * 4
    elif method == "full":
        weights = shape.params * wb
    else:  # frozen base + fp32 adapter / prefix
        weights = shape.params * wb + n_train * 4
    # gradients + optimizer (full: trainable = the weights' dtype; adapters: fp32)
    grad_b = wb if method == "full" else 4.0
    gradients = n_train * grad_b
    master = (method == "full" and wb < 4) if master_weights is None else master_weights
    opt = n_train * (OPTIMIZERS[optimizer] + (4 if master else 0))
    # largest trainable tensor, for the optimizer's temporaries
    if method == "full":
        largest = max(g["embedding"], shape.intermediate * shape.hidden) * grad_b
    elif method == "ptuning":
        largest = n_train * 4
    else:
        largest = max(lora_r * (d_in + d_out) for d_in, d_out in shape.linear_shapes().values()) * 4
    # single-tensor AdamW (the CPU default) makes two temporaries of one tensor at a time; the
    # fused CUDA kernel (transformers' default optimizer, adamw_torch_fused) makes none
    temps = 2 * largest if device == "cpu" else 0

    # activations
    lt = layer_terms(shape, method, batch, seq_len, a, mask_b, lora_r, lora_target_modules,
                     lora_dropout, prefix_tokens)
    ht = head_terms(shape, method, batch, seq_len, a)
    T = batch * seq_len
    # backward starts with the gradients of the log-softmax output and of the logits (2 × T×V
    # fp32 next to the saved log-softmax output); once the head's backward ran, those three are
    # gone and the head's weight gradient exists instead (full fine-tuning) — whichever is larger
    head_grad = g["embedding"] * grad_b if method == "full" else 0
    logits_peak = max(2 * T * shape.vocab * 4, head_grad)
    parts: dict[str, int] = {}
    if gradient_checkpointing:
        parts["layer inputs (checkpoints)"] = int(shape.layers * T * shape.hidden * a)
        end = sum(ht.values()) + logits_peak
        one = sum(lt.values())
        parts["max(head + logits backward, one recomputed layer)"] = int(max(end, one))
    else:
        parts["decoder layers"] = int(shape.layers * sum(lt.values()))
        parts["final norm + head + log-softmax"] = int(sum(ht.values()))
        parts["logits backward (2 × T×V fp32 or head grad)"] = int(logits_peak)
    if method == "qlora":  # one linear dequantised to the compute dtype at a time
        parts["NF4 dequantisation buffer"] = int(max(a * b for a, b in shape.linear_shapes().values()) * 2)
    activations = sum(parts.values())
    return MemoryEstimate(
        method=method, model=shape.name, batch=batch, seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing, params_total=shape.params,
        params_trainable=n_train, weights=int(weights), gradients=int(gradients),
        optimizer=int(opt), activations=int(activations), step_temporaries=int(temps),
        activation_parts=parts,
        settings={"weight_dtype": wdt, "activation_dtype": adt, "optimizer": optimizer,
                  "device": device, "lora_r": lora_r, "lora_dropout": lora_dropout,
                  "prefix_tokens": prefix_tokens, "master_weights": master,
                  "layer_terms": {k: int(v) for k, v in lt.items()}})


def estimate_figure(estimates: Mapping[str, MemoryEstimate], measured: Mapping[str, float]):
    """Left: per method the estimate's parts present at the peak (weights, optimizer, then
    activations or gradients + step temporaries), stacked, next to the measured peak (bytes).
    Right: the estimated activations by part. Returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    names = list(estimates)
    xs = list(range(len(names)))
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"weights": "tab:blue", "optimizer": "tab:orange", "activations": "tab:green",
              "gradients + temporaries": "tab:olive"}
    seen: set[str] = set()
    for x, name in zip(xs, names):
        e = estimates[name]
        last = (("activations", e.activations) if e.peak_phase == "backward"
                else ("gradients + temporaries", e.gradients + e.step_temporaries))
        bottom = 0.0
        for part, val in [("weights", e.weights), ("optimizer", e.optimizer), last]:
            ax[0].bar(x - 0.2, val / MB, 0.4, bottom=bottom, color=colors[part],
                      label=None if part in seen else part)
            seen.add(part)
            bottom += val / MB
        if name in measured:
            ax[0].bar(x + 0.2, measured[name] / MB, 0.4, color="tab:gray",
                      label=None if "measured" in seen else "measured")
            seen.add("measured")
    ax[0].set_ylabel("MB above baseline RSS")
    ax[0].set_title("estimate (parts at the peak) vs measured peak")
    parts = sorted({k for e in estimates.values() for k in e.activation_parts})
    bottoms = [0.0] * len(names)
    for k in parts:
        vals = [estimates[n].activation_parts.get(k, 0) / MB for n in names]
        ax[1].bar(xs, vals, bottom=bottoms, label=k)
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    ax[1].set_title("estimated activations by part (MB)")
    for a in ax:
        a.set_xticks(xs, names)
        a.legend(fontsize=7)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- selection

GOALS = {
    "domain": "heavy domain shift / new knowledge (medicine, law, a new language)",
    "instruction": "instruction following, format and tone (the knowledge is already in the base)",
    "multitask": "many small tasks on one shared frozen base (one small artefact per task)",
}
SMALL_DATA = 5000  # training examples below which full fine-tuning tends to overfit


def quality_tiers(goal: str, data_size: int) -> list[list[str]]:
    """Methods by expected quality for a goal, best tier first (equal quality within a tier).

    * domain, lots of data: full > LoRA ≈ QLoRA > P-Tuning — updating all weights learns the most
      new knowledge (Biderman et al. 2024, "LoRA Learns Less and Forgets Less"); QLoRA matches
      16-bit LoRA (Dettmers et al. 2023); deep prompts alone move the model least.
    * domain with little data (< ``SMALL_DATA`` examples): LoRA ≈ QLoRA > full > P-Tuning — the
      low-rank update regularises; full fine-tuning overfits and forgets.
    * instruction: LoRA ≈ QLoRA ≈ full > P-Tuning (LoRA matches full fine-tuning on instruction
      tuning: Hu et al. 2021; Dettmers et al. 2023) — so the cheapest of the tier wins.
    * multitask: P-Tuning v2 ≈ LoRA > QLoRA > full — one tiny prefix or adapter per task on a
      shared base (Liu et al. 2022, P-Tuning v2), full fine-tuning copies the model per task.
    """
    if goal not in GOALS:
        raise EstimateError(f"unknown goal '{goal}'; choose one of: " +
                           "; ".join(f"{k} = {v}" for k, v in GOALS.items()))
    if goal == "domain":
        if data_size >= SMALL_DATA:
            return [["full"], ["lora", "qlora"], ["ptuning"]]
        return [["lora", "qlora"], ["full"], ["ptuning"]]
    if goal == "instruction":
        return [["lora", "qlora", "full"], ["ptuning"]]
    return [["ptuning", "lora"], ["qlora"], ["full"]]


FIT_LEVELS = ("fits as asked", "needs gradient checkpointing", "needs a smaller micro-batch",
              "does not fit")


@dataclass
class Option:
    method: str
    level: int  # index into FIT_LEVELS
    tier: int
    micro_batch: int
    gradient_checkpointing: bool
    estimate: MemoryEstimate
    reason: str

    @property
    def fits(self) -> bool:
        return self.level < 3


@dataclass
class Recommendation:
    model: str
    gpu_memory_gb: float
    usable_bytes: int
    goal: str
    data_size: int
    seq_len: int
    options: list[Option]  # ranked, fitting ones first

    @property
    def best(self) -> Option | None:
        return self.options[0] if self.options and self.options[0].fits else None

    @property
    def fitting(self) -> list[str]:
        return [o.method for o in self.options if o.fits]

    def rows(self) -> list[dict[str, Any]]:
        return [{"rank": k + 1, "method": METHOD_NAMES[o.method], "fit": FIT_LEVELS[o.level],
                 "micro_batch": o.micro_batch, "grad_ckpt": o.gradient_checkpointing,
                 "total_GB": round(o.estimate.total / GB, 2), "reason": o.reason}
                for k, o in enumerate(self.options)]


def _fit(shape: ModelShape, method: str, micro_batch: int, seq_len: int, usable: int,
         **kw) -> tuple[int, int, bool, MemoryEstimate]:
    """The least compromising configuration of ``method`` that fits: (level, micro-batch, GC, est)."""
    tries = [(0, micro_batch, False), (1, micro_batch, True)]
    mb = micro_batch // 2
    while mb >= 1:
        tries.append((2, mb, True))
        mb //= 2
    if tries[-1][1] != 1:
        tries.append((2, 1, True))
    est = None
    for level, b, gc in tries:
        est = estimate(shape, method, batch=b, seq_len=seq_len, gradient_checkpointing=gc, **kw)
        if est.total <= usable:
            return level, b, gc, est
    return 3, 1, True, est  # the cheapest configuration, which does not fit


def recommend(model: "str | ModelShape", gpu_memory_gb: float, data_size: int, seq_len: int,
              goal: str = "instruction", micro_batch: int = 4, headroom: float = 0.9,
              device: str = "cuda", strict: bool = True, **estimate_kw) -> Recommendation:
    """Rank full / LoRA / QLoRA / P-Tuning v2 for ``model`` on a GPU with ``gpu_memory_gb`` GB
    (1 GB = 2^30 bytes), ``data_size`` training examples of ``seq_len`` tokens and a ``goal``
    (``GOALS``). See the module docstring for the rule. ``strict``: raise ``DoesNotFit`` when no
    method fits (else return the ranking with every option marked "does not fit")."""
    if gpu_memory_gb <= 0:
        raise EstimateError(f"gpu_memory_gb must be > 0 (got {gpu_memory_gb})")
    if data_size < 1 or seq_len < 1 or micro_batch < 1:
        raise EstimateError("data_size, seq_len and micro_batch must be >= 1 "
                           f"(got {data_size}, {seq_len}, {micro_batch})")
    if not 0 < headroom <= 1:
        raise EstimateError(f"headroom must be in (0, 1] (got {headroom})")
    shape = model_shape(model)
    tiers = quality_tiers(goal, data_size)
    usable = int(gpu_memory_gb * GB * headroom)
    use = f"{usable / GB:.1f} GB usable ({gpu_memory_gb:g} GB × {headroom:g})"
    options = []
    for t, tier in enumerate(tiers):
        for pos, method in enumerate(tier):
            level, b, gc, est = _fit(shape, method, micro_batch, seq_len, usable,
                                     device=device, **estimate_kw)
            how = (f"micro-batch {b} × {seq_len}" + (", gradient checkpointing" if gc else ""))
            if level < 3:
                reason = f"{how}: {est.breakdown()} ≤ {use}"
            else:
                reason = f"does not fit: needs {est.total / GB:.2f} GB at {how} ({est.breakdown()}) > {use}"
            options.append((level >= 3, t, level, pos, Option(method, level, t, b, gc, est, reason)))
    options.sort(key=lambda x: x[:4])
    ranked = [o[-1] for o in options]
    rec = Recommendation(shape.name, gpu_memory_gb, usable, goal, data_size, seq_len, ranked)
    if rec.best is None and strict:
        cheapest = min(ranked, key=lambda o: o.estimate.total)
        e = cheapest.estimate
        raise DoesNotFit(
            f"{shape.name} does not fit in {gpu_memory_gb:g} GB with any method: the cheapest, "
            f"{METHOD_NAMES[e.method]} (micro-batch 1 × {seq_len}, gradient checkpointing), needs "
            f"{e.total / GB:.2f} GB (weights {e.weights / GB:.2f} + optimizer {e.optimizer / GB:.2f}"
            f" + max(activations {e.activations / GB:.2f}, gradients {e.gradients / GB:.2f} + step "
            f"temporaries {e.step_temporaries / GB:.2f})) > {use}", e, usable)
    return rec


# --------------------------------------------------------------------------- measurement

MMAP_THRESHOLD = 64 * 1024  # see set_mmap_threshold


def set_mmap_threshold(nbytes: int) -> bool:
    """Have glibc give every block of at least ``nbytes`` its own mapping, returned to the OS
    when freed, so RSS follows the bytes of live tensors (what ``torch.cuda.max_memory_allocated``
    reports on a GPU). glibc's default raises the threshold to 32 MB after the first large free;
    freed activations and gradients below it then stay in the heap, and RSS counts memory no
    longer in use (about 14% more at the peak for full fine-tuning of the 135M model here).
    ``mallopt(M_MMAP_THRESHOLD)`` also switches that dynamic adjustment off. False if not glibc."""
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, int(nbytes)))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False


class MeasurementFailed(LlmtechError):
    """The measuring subprocess failed; the message carries its last error lines."""


def _token_batch(tokenizer, batch: int, seq_len: int, data: str | None, seed: int):
    """``batch`` rows of ``seq_len`` tokens, no padding: packed instruction/answer texts from a
    JSONL file (repeated as needed), or seeded random token ids when ``data`` is None."""
    import torch

    n = batch * seq_len
    if data is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, len(tokenizer), (batch, seq_len), generator=g)
    from ..data import read_records

    ids: list[int] = []
    for _, row in read_records(data):  # JSON/JSONL/CSV/Parquet; errors name the file and line
        text = "\n".join(str(row.get(k, "")) for k in ("instruction", "input", "output")
                         if row.get(k))
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if not ids:
        raise EstimateError(f"{data}: no instruction/input/output text to train on")
    while len(ids) < n:
        ids = ids + ids
    return torch.tensor(ids[:n]).view(batch, seq_len)


def build_training_model(method: str, model_id: str, lora_r: int = 8, lora_dropout: float = 0.05,
                         prefix_tokens: int = 16, gradient_checkpointing: bool = False,
                         seed: int = 0, device: str = "cpu"):
    """``(model, tokenizer)`` set up for ``method`` the usual way (PEFT for LoRA / prefix, the
    QLoRA recipe: NF4 + double quantisation, ``prepare_model_for_kbit_training``, LoRA), fp32
    base weights, on ``device`` (``load_quantized`` itself puts QLoRA on the GPU when there is one)."""
    from peft import PrefixTuningConfig, get_peft_model, prepare_model_for_kbit_training

    from .. import models
    from ..train.lora import LoraSettings, lora_config

    _check_method(method)
    gc_kw = {"use_reentrant": False}
    lora = lora_config(LoraSettings(r=lora_r, dropout=lora_dropout))
    if method == "qlora":
        from ..compress.bnb import load_quantized

        model, tok = load_quantized(model_id, bits=4, double_quant=True, seed=seed)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs=gc_kw)
        model = get_peft_model(model, lora)
    else:
        model, tok = models.load_lm(model_id, seed=seed)
        model.to(device)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kw)
        if method == "lora":
            model = get_peft_model(model, lora)
        elif method == "ptuning":
            model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM",
                                                             num_virtual_tokens=prefix_tokens))
    model.config.use_cache = False
    model.train()
    return model, tok


class _Peak:
    """Peak memory of a block, absolute bytes: process RSS on the CPU (``MemoryMeter``, the
    kernel's high-water mark reset on entry), allocated tensor bytes on CUDA."""

    def __init__(self, device: str):
        self.device, self.peak, self._meter = device, 0, None

    @staticmethod
    def now(device: str) -> int:
        import torch

        from ..evals.speed import rss_bytes

        return torch.cuda.memory_allocated() if device == "cuda" else rss_bytes()

    def __enter__(self) -> "_Peak":
        import torch

        from ..evals.speed import MemoryMeter

        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            self._meter = MemoryMeter().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device == "cuda":
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._meter.__exit__(*exc)
            self.peak = self._meter.peak


def _train_steps(model, ids, steps: int, device: str = "cpu",
                 lr: float = 1e-4) -> tuple[list[dict], list[float], float]:
    """``steps`` × (forward, backward, AdamW step); peak memory of each phase (bytes, absolute).
    AdamW: PyTorch's default on the CPU (single-tensor), the fused kernel on CUDA (the HF
    Trainer's default there) — the two ``estimate`` models."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, fused=True if device == "cuda" else None)
    phases, losses = [], []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        with _Peak(device) as m_f:
            loss = model(input_ids=ids, labels=ids).loss  # the output (and its logits) is dropped
        with _Peak(device) as m_b:
            loss.backward()
        with _Peak(device) as m_s:
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        del loss
        phases += [{"step": step, "phase": p, "peak": m.peak}
                   for p, m in (("forward", m_f), ("backward", m_b), ("optimizer step", m_s))]
    return phases, losses, (time.perf_counter() - t0) / steps


def measured_setup(method: str, device: str = "cpu") -> dict[str, Any]:
    """The ``estimate`` keywords that describe what ``measure`` runs: fp32 base weights and
    activations (NF4 linears for QLoRA), on ``device``."""
    return {"device": device, "activation_dtype": "fp32",
            "weight_dtype": None if method == "qlora" else "fp32"}


def measure(method: str, model_id: str = "smollm2-135m", batch: int = 4, seq_len: int = 128,
            steps: int = 2, lora_r: int = 8, lora_dropout: float = 0.05, prefix_tokens: int = 16,
            gradient_checkpointing: bool = False, data: str | None = None, seed: int = 0,
            warmup: bool = True, mmap_threshold: int | None = MMAP_THRESHOLD) -> dict[str, Any]:
    """Peak memory of ``steps`` real training steps of ``method`` in THIS process (run it in a
    fresh one: ``measure_subprocess``). Memory figures are MB above the baseline, taken after
    imports and a warm-up step with ``tiny-llama``, before the model is loaded: process RSS on
    the CPU, ``torch.cuda.memory_allocated`` when a GPU is present (that path has not been run on
    this project's CPU machine). ``mmap_threshold``: see ``set_mmap_threshold`` (None or 0:
    glibc's default)."""
    import torch

    from .. import models
    from ..evals.speed import model_bytes, release_memory

    if steps < 1:
        raise EstimateError(f"steps must be >= 1 (got {steps})")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mmap_set = device == "cpu" and bool(mmap_threshold) and set_mmap_threshold(mmap_threshold)
    torch.manual_seed(seed)
    kw = dict(lora_r=lora_r, lora_dropout=lora_dropout, prefix_tokens=prefix_tokens,
              gradient_checkpointing=gradient_checkpointing, seed=seed, device=device)
    if warmup:  # pay one-time costs (thread pools, allocator arenas, kernels) before the baseline
        wm, wt = build_training_model(method, "tiny-llama", **kw)
        wids = _token_batch(wt, batch, min(seq_len, 32), None, seed).to(wm.device)
        _train_steps(wm, wids, 1, device)
        del wm, wt, wids
    # the tokenizer and the token batch are not training memory: made before the baseline
    ids = _token_batch(models.load_tokenizer(model_id), batch, seq_len, data, seed)
    release_memory()
    baseline = _Peak.now(device)
    with _Peak(device) as m_load:
        model, _ = build_training_model(method, model_id, **kw)
        ids = ids.to(model.device)
    release_memory()
    after_load = _Peak.now(device)
    n_total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    phases, losses, step_s = _train_steps(model, ids, steps, device)
    top = max(phases, key=lambda p: p["peak"])
    return {
        "method": method, "model": model_id, "device": device,
        "memory": "cuda_allocated" if device == "cuda" else "cpu_rss",
        "batch": batch, "seq_len": seq_len, "steps": steps,
        "gradient_checkpointing": gradient_checkpointing, "lora_r": lora_r,
        "lora_dropout": lora_dropout, "prefix_tokens": prefix_tokens,
        "baseline_mb": round(baseline / MB, 1),
        "load_peak_mb": round((m_load.peak - baseline) / MB, 1),
        "after_load_mb": round((after_load - baseline) / MB, 1),
        "model_bytes_mb": round(model_bytes(model) / MB, 1),
        "params_total": n_total, "params_trainable": n_train,
        "measured_mb": round((top["peak"] - baseline) / MB, 1),
        "peak_at": f"step {top['step']} {top['phase']}",
        "phases": [{**p, "peak_mb": round((p.pop("peak") - baseline) / MB, 1)} for p in phases],
        "losses": [round(x, 4) for x in losses], "step_s": round(step_s, 2),
        "threads": torch.get_num_threads(), "mmap_threshold": mmap_threshold if mmap_set else None,
    }


def measure_subprocess(method: str, model_id: str = "smollm2-135m", timeout: float = 600,
                       **kw) -> dict[str, Any]:
    """``measure`` in a fresh interpreter (RSS high-water marks are per process), via this
    module's command line; returns its JSON. ``mmap_threshold``: see ``set_mmap_threshold``."""
    import subprocess

    cmd = [sys.executable, "-m", "llmtech.dist.memory", "measure", "--method", method,
           "--model", model_id]
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            cmd.append(flag if v else "--no-" + flag[2:])
        elif v is not None:
            cmd += [flag, str(v)]
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parents[2])  # the llmtech the caller imported
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise MeasurementFailed(f"measuring {method} on {model_id} took over {timeout:.0f} s") from None
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode != 0 or not lines:
        tail = " | ".join(r.stderr.strip().splitlines()[-3:])
        raise MeasurementFailed(f"measuring {method} on {model_id} failed (exit {r.returncode}): {tail}")
    return json.loads(lines[-1])


def saved_tensor_bytes(model, input_ids) -> int:
    """Bytes autograd keeps for backward in one forward pass with labels (unique storages,
    parameters excluded) — what ``layer_terms`` / ``head_terms`` model, counted by PyTorch."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    del loss
    return sum(seen.values())


# --------------------------------------------------------------------------- command line

def _cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmtech.dist.memory",
                                description="training memory: measure / estimate / recommend")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("measure", "estimate"):
        q = sub.add_parser(name)
        q.add_argument("--method", required=True, choices=METHODS)
        q.add_argument("--model", default="smollm2-135m")
        q.add_argument("--batch", type=int, default=4)
        q.add_argument("--seq-len", type=int, default=128)
        q.add_argument("--lora-r", type=int, default=8)
        q.add_argument("--lora-dropout", type=float, default=0.05)
        q.add_argument("--prefix-tokens", type=int, default=16)
        q.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
        if name == "measure":
            q.add_argument("--steps", type=int, default=2)
            q.add_argument("--data", default=None)
            q.add_argument("--seed", type=int, default=0)
            q.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True)
            q.add_argument("--mmap-threshold", type=int, default=MMAP_THRESHOLD,
                           help="glibc mmap threshold in bytes (0 = glibc's dynamic default)")
        else:
            q.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    r = sub.add_parser("recommend")
    r.add_argument("--model", required=True)
    r.add_argument("--gpu-gb", type=float, required=True)
    r.add_argument("--data-size", type=int, required=True)
    r.add_argument("--seq-len", type=int, default=512)
    r.add_argument("--goal", default="instruction", choices=list(GOALS))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        if a.cmd == "measure":
            out = measure(a.method, a.model, a.batch, a.seq_len, a.steps, a.lora_r, a.lora_dropout,
                          a.prefix_tokens, a.gradient_checkpointing, a.data, a.seed, a.warmup,
                          a.mmap_threshold)
        elif a.cmd == "estimate":
            out = estimate(a.model, a.method, a.batch, a.seq_len, lora_r=a.lora_r,
                           lora_dropout=a.lora_dropout, prefix_tokens=a.prefix_tokens,
                           gradient_checkpointing=a.gradient_checkpointing,
                           device=a.device).to_json()
        else:
            rec = recommend(a.model, a.gpu_gb, a.data_size, a.seq_len, a.goal)
            out = {"best": rec.best.method if rec.best else None, "options": rec.rows()}
    except LlmtechError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
