"""ZeRO planning for data-parallel training: parameter counts of a DeepSeek-style MoE, model-state
memory per GPU for each ZeRO stage and offload choice, activations, communication per step, and
DeepSpeed config files built and validated with DeepSpeed's own parser.

Units: ``GB = 1e9`` bytes, as in the ZeRO paper (its Figure 1: Ψ = 7.5B parameters, 64 GPUs,
baseline 16Ψ = 120 GB, stage 3 16Ψ/64 = 1.9 GB). DeepSpeed's estimators print GiB (2**30).

Parameters (``MoEShape``)
=========================

A DeepSeek-V2/V3 decoder: ``first_dense_layers`` layers with a dense SwiGLU MLP (intermediate
``dense_intermediate``), then MoE layers with ``routed_experts`` routed + ``shared_experts`` shared
SwiGLU experts (intermediate ``expert_intermediate``, ``experts_per_token`` routed experts active
per token) and a router (``routed_experts × hidden``; its ``e_score_correction_bias`` is a buffer
updated by a rule, not by gradients, so it is not counted, as in transformers' DeepseekV3). Every
layer has MLA attention: q_a (h → q_lora), q_a norm, q_b (q_lora → heads·(nope + rope)),
kv_a (h → kv_lora + rope), kv_a norm, kv_b (kv_lora → heads·(nope + v)), o (heads·v → h), and two
RMSNorms. ``DEEPSEEK_V3`` gives 671,026,404,352 parameters, the count of transformers'
``DeepseekV3ForCausalLM`` built from its default config (checked in the tests); the multi-token
prediction module of the released checkpoint (another ~14B) is not part of the 671B.

Model states per GPU (``model_states``)
=======================================

Mixed-precision Adam, per trainable parameter: 2 B bf16 weight + 2 B bf16 gradient + 12 B
optimizer states (fp32 master weight, momentum, variance) = 16 B (the ZeRO paper's K = 12).
With N GPUs: stage 0 keeps all of it on every GPU (16Ψ); stage 1 partitions the optimizer states
(4Ψ + 12Ψ/N); stage 2 also the gradients (2Ψ + 14Ψ/N); stage 3 also the weights (16Ψ/N). Frozen
parameters (LoRA's base) cost only their storage bytes (2 for bf16, 4.127 bits for NF4 with
double quantisation), partitioned at stage 3. Offloading moves terms off the GPU: the optimizer
states and the gradient partition to CPU memory (``opt-cpu``) or the states to NVMe
(``opt-nvme``, the gradients stay in CPU memory: DeepSpeed 0.19's stage 3 keeps the gradient
partition in a CPU buffer of the gradient-accumulation dtype, bf16 unless
``data_types.grad_accum_dtype`` says fp32); with ``opt+param-*`` the 16-bit weights too (stage 3
only). Stage 3 also needs a working buffer on the GPU: the largest module's parameters
gathered in 16 bits, plus its 16-bit gradients when it is trained (4 B × largest layer, the term
DeepSpeed's estimator adds). CPU and NVMe figures are per node (the node's GPUs added up).

``accounting="deepspeed"`` reproduces DeepSpeed's own estimators
(``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``, the
functions behind ``..._all_cold``) exactly. It differs from the paper in three named terms:

* gradients: DeepSpeed's stage-2 estimator counts a 16-bit and an fp32 gradient partition
  (2 + 4 B: ``18 = 2 + 4 + 4 + 8`` in its source), its stage-3 estimator one fp32 partition (4 B);
  with optimizer offload the fp32 partition (4 B) is counted in CPU memory instead;
* CPU memory: ×``additional_buffer_factor`` (1.5), and the model-loading peak when it is larger
  than the steady state: without ``zero_init`` every process of the node materialises the full
  model in fp32 (4 B × Ψ × GPUs per node); with it (stage 3) one layer at a time (4 B × largest
  layer × GPUs per node), which DeepSpeed counts only when nothing is offloaded;
* the stage-2 offload CPU figure of DeepSpeed uses all GPUs of all nodes (max(4·GPUs, 16)·Ψ, not
  divided by the number of nodes): identical on one node, which is what is compared.

Activations, communication, offload traffic
===========================================

``activation_bytes``: what autograd keeps per token for each layer in bf16 training (RMSNorm
inputs and the router in fp32, as transformers computes them; terms listed in
``activation_terms``), with a flash-attention kernel (no s² term), the logits in fp32 (three T×V
copies at the start of backward, see ``memory``'s module doc); gradient checkpointing keeps each
layer's input and one layer's saved tensors at a time. ``measure_saved_bytes`` counts the same on
a small transformers DeepseekV3 with ``saved_tensors_hooks`` (the formula matches to < 1 %). ``comm_volume``: per GPU and training step (accumulation 1) the
ZeRO paper's counts — data-parallel all-reduce 2Ψ, stage 1/2 reduce-scatter + all-gather 2Ψ,
stage 3 all-gather in forward and backward + reduce-scatter 3Ψ elements (frozen weights: the two
all-gathers only); a ring collective sends (N − 1)/N of that. ``offload_traffic``: bytes per step
over PCIe per GPU and to/from NVMe per node.

DeepSpeed configs (``zero_config``, ``validate_ds_config``)
===========================================================

``zero_config`` builds a ZeRO config dict (bf16, AdamW, offload blocks, buckets sized from the
hidden size as transformers' ``auto`` rules do: ``reduce_bucket_size = h²``,
``stage3_prefetch_bucket_size = int(0.9·h²)``, ``stage3_param_persistence_threshold = 10·h``).
``validate_ds_config`` checks batch sizes against the world size (``check_batch``), offload
placement and NVMe paths, then parses the config with ``deepspeed.runtime.config.DeepSpeedConfig``.
Offline that parser sees a world size of 1, so it gets the config without ``train_batch_size``
(it derives micro × accumulation × 1) after our own check with the real world size.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError
from .memory import NF4_BITS_DQ, EstimateError, ModelShape

GB = 1e9  # decimal gigabytes, as in the ZeRO paper
GIB = 2 ** 30
STAGES = (0, 1, 2, 3)
METHODS = ("full", "lora", "qlora")
# offload choice -> (optimizer device, parameter device); None = stays on the GPU
OFFLOADS: dict[str, tuple[str | None, str | None]] = {
    "none": (None, None), "opt-cpu": ("cpu", None), "opt-nvme": ("nvme", None),
    "opt+param-cpu": ("cpu", "cpu"), "opt+param-nvme": ("nvme", "nvme")}
BF16, GRAD16, ADAM_STATES = 2.0, 2.0, 12.0  # bytes per parameter (ZeRO paper, mixed-precision Adam)
NF4_BYTES = NF4_BITS_DQ / 8


# --------------------------------------------------------------------------- MoE shape

@dataclass(frozen=True)
class MoEShape:
    """A DeepSeek-style MoE decoder with MLA attention (see module docstring)."""

    name: str
    layers: int
    hidden: int
    vocab: int
    heads: int
    q_lora_rank: int  # 0 = no low-rank query (q_proj: h -> heads·(nope + rope))
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    dense_intermediate: int
    first_dense_layers: int
    routed_experts: int
    shared_experts: int
    experts_per_token: int
    expert_intermediate: int
    tied_embeddings: bool = False
    n_group: int = 8  # router: experts in groups, top groups first (activation bytes only)
    topk_group: int = 4
    source: str = ""

    def __post_init__(self):
        for f in ("layers", "hidden", "vocab", "heads", "kv_lora_rank", "qk_nope_head_dim",
                  "v_head_dim", "routed_experts", "experts_per_token", "expert_intermediate"):
            if getattr(self, f) <= 0:
                raise EstimateError(f"MoE shape '{self.name}': {f} must be > 0")
        if not 0 <= self.first_dense_layers <= self.layers:
            raise EstimateError(f"MoE shape '{self.name}': first_dense_layers must be in 0..layers")
        if self.experts_per_token > self.routed_experts:
            raise EstimateError(f"MoE shape '{self.name}': experts_per_token "
                                f"{self.experts_per_token} > routed_experts {self.routed_experts}")

    @property
    def moe_layers(self) -> int:
        return self.layers - self.first_dense_layers

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def attention_linears(self) -> dict[str, tuple[int, int]]:
        """MLA's linear layers: name -> (in_features, out_features)."""
        h, n = self.hidden, self.heads
        out = {}
        if self.q_lora_rank:
            out["q_a_proj"] = (h, self.q_lora_rank)
            out["q_b_proj"] = (self.q_lora_rank, n * self.qk_head_dim)
        else:
            out["q_proj"] = (h, n * self.qk_head_dim)
        out["kv_a_proj_with_mqa"] = (h, self.kv_lora_rank + self.qk_rope_head_dim)
        out["kv_b_proj"] = (self.kv_lora_rank, n * (self.qk_nope_head_dim + self.v_head_dim))
        out["o_proj"] = (n * self.v_head_dim, h)
        return out

    def attention_params(self) -> int:
        lin = sum(a * b for a, b in self.attention_linears().values())
        return lin + self.q_lora_rank + self.kv_lora_rank  # + q_a / kv_a RMSNorm weights

    def swiglu(self, intermediate: int) -> int:
        return 3 * self.hidden * intermediate

    @property
    def expert_params(self) -> int:
        return self.swiglu(self.expert_intermediate)

    @property
    def router_params(self) -> int:
        return self.routed_experts * self.hidden

    def layer_params(self, moe: bool, active: bool = False) -> int:
        """One decoder layer: attention + two RMSNorms + MLP (all experts, or the active ones)."""
        base = self.attention_params() + 2 * self.hidden
        if not moe:
            return base + self.swiglu(self.dense_intermediate)
        routed = self.experts_per_token if active else self.routed_experts
        return base + (routed + self.shared_experts) * self.expert_params + self.router_params

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def total_params(self, active: bool = False) -> int:
        """All parameters, or those one token passes through (``active``: 8 of 256 routed
        experts; the input embedding counted, as its row is read)."""
        head = 0 if self.tied_embeddings else self.embedding_params
        return (self.first_dense_layers * self.layer_params(False)
                + self.moe_layers * self.layer_params(True, active)
                + self.embedding_params + head + self.hidden)

    @property
    def params(self) -> int:
        return self.total_params()

    @property
    def active_params(self) -> int:
        return self.total_params(active=True)

    def arithmetic(self) -> list[dict[str, Any]]:
        """The parameter count written out term by term: rows of {item, formula, params}."""
        h, rows = self.hidden, []
        for name, (a, b) in self.attention_linears().items():
            rows.append({"item": f"MLA {name}", "formula": f"{a} × {b}", "params": a * b})
        rows.append({"item": "MLA norms (q_a, kv_a)", "formula": f"{self.q_lora_rank} + {self.kv_lora_rank}",
                     "params": self.q_lora_rank + self.kv_lora_rank})
        rows.append({"item": "attention per layer", "formula": "sum of the above",
                     "params": self.attention_params()})
        rows.append({"item": "RMSNorm ×2 per layer", "formula": f"2 × {h}", "params": 2 * h})
        rows.append({"item": "dense MLP (SwiGLU)", "formula": f"3 × {h} × {self.dense_intermediate}",
                     "params": self.swiglu(self.dense_intermediate)})
        rows.append({"item": "one expert (SwiGLU)", "formula": f"3 × {h} × {self.expert_intermediate}",
                     "params": self.expert_params})
        rows.append({"item": "router", "formula": f"{self.routed_experts} × {h}", "params": self.router_params})
        e = self.routed_experts + self.shared_experts
        rows.append({"item": "MoE MLP per layer", "formula": f"({self.routed_experts} + {self.shared_experts}) "
                     f"× {self.expert_params} + {self.router_params}",
                     "params": e * self.expert_params + self.router_params})
        rows.append({"item": "dense layer", "formula": "attention + norms + dense MLP",
                     "params": self.layer_params(False)})
        rows.append({"item": "MoE layer", "formula": "attention + norms + MoE MLP",
                     "params": self.layer_params(True)})
        rows.append({"item": f"{self.first_dense_layers} dense layers", "formula": f"{self.first_dense_layers} × "
                     f"{self.layer_params(False)}", "params": self.first_dense_layers * self.layer_params(False)})
        rows.append({"item": f"{self.moe_layers} MoE layers", "formula": f"{self.moe_layers} × "
                     f"{self.layer_params(True)}", "params": self.moe_layers * self.layer_params(True)})
        emb = self.embedding_params
        rows.append({"item": "embedding + lm_head + final norm",
                     "formula": f"{self.vocab} × {h} × {1 if self.tied_embeddings else 2} + {h}",
                     "params": emb * (1 if self.tied_embeddings else 2) + h})
        rows.append({"item": "TOTAL", "formula": "layers + embedding + head", "params": self.params})
        act = self.layer_params(True, active=True)
        rows.append({"item": "MoE layer, active per token",
                     "formula": f"attention + norms + ({self.experts_per_token} + {self.shared_experts}) "
                     f"× {self.expert_params} + router", "params": act})
        rows.append({"item": "ACTIVE per token", "formula": f"dense layers + {self.moe_layers} × {act} + "
                     "embedding + head", "params": self.active_params})
        return rows

    # -- what ZeRO-3 gathers at once, what LoRA / NF4 touch
    def largest_module(self, fused_experts: bool = False) -> int:
        """Largest set of parameters one module owns directly (ZeRO-3 gathers per module): the
        embedding / head with one module per expert (DeepSeek's own modeling code), or all routed
        experts of a layer when they are stored as one 3-D tensor pair (transformers 5's
        ``DeepseekV3Experts``)."""
        lin = [a * b for a, b in self.attention_linears().values()]
        lin += [self.hidden * self.dense_intermediate, self.embedding_params]
        if fused_experts:
            lin.append(self.routed_experts * self.expert_params)
        return max(lin)

    def largest_param(self, fused_experts: bool = False) -> int:
        """Largest single parameter tensor (NVMe parameter offload needs a swap buffer this big)."""
        big = [self.embedding_params, self.hidden * self.dense_intermediate]
        if fused_experts:
            big.append(self.routed_experts * 2 * self.expert_intermediate * self.hidden)
        return max(big)

    def linear_params(self) -> int:
        """Parameters in linear layers that bitsandbytes would store in NF4 (attention, MLPs,
        experts; not the embedding, head, norms or router)."""
        att = sum(a * b for a, b in self.attention_linears().values())
        return (self.layers * att + self.first_dense_layers * self.swiglu(self.dense_intermediate)
                + self.moe_layers * (self.routed_experts + self.shared_experts) * self.expert_params)

    def lora_params(self, r: int, targets: str = "attention") -> int:
        """LoRA adapter parameters r·(d_in + d_out) per adapted linear: ``attention`` (MLA's
        projections in every layer) or ``all-linear`` (also dense MLPs and every expert)."""
        if targets not in ("attention", "all-linear"):
            raise EstimateError(f"LoRA targets '{targets}': use 'attention' or 'all-linear'")
        per_layer = sum(r * (a + b) for a, b in self.attention_linears().values())
        total = self.layers * per_layer
        if targets == "all-linear":
            h = self.hidden
            total += self.first_dense_layers * 3 * r * (h + self.dense_intermediate)
            total += (self.moe_layers * (self.routed_experts + self.shared_experts)
                      * 3 * r * (h + self.expert_intermediate))
        return total

    @classmethod
    def from_config(cls, config: Any, name: str = "") -> "MoEShape":
        """From a transformers ``DeepseekV3Config`` (or V2) or a config.json dict."""
        get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
        try:
            return cls(name=name or str(get("model_type", "moe")), layers=int(get("num_hidden_layers")),
                       hidden=int(get("hidden_size")), vocab=int(get("vocab_size")),
                       heads=int(get("num_attention_heads")), q_lora_rank=int(get("q_lora_rank") or 0),
                       kv_lora_rank=int(get("kv_lora_rank")),
                       qk_nope_head_dim=int(get("qk_nope_head_dim")),
                       qk_rope_head_dim=int(get("qk_rope_head_dim")), v_head_dim=int(get("v_head_dim")),
                       dense_intermediate=int(get("intermediate_size")),
                       first_dense_layers=int(get("first_k_dense_replace") or 0),
                       routed_experts=int(get("n_routed_experts")),
                       shared_experts=int(get("n_shared_experts") or 0),
                       experts_per_token=int(get("num_experts_per_tok")),
                       expert_intermediate=int(get("moe_intermediate_size")),
                       tied_embeddings=bool(get("tie_word_embeddings", False)),
                       n_group=int(get("n_group") or 1), topk_group=int(get("topk_group") or 1))
        except (TypeError, ValueError) as e:
            raise EstimateError(f"config of '{name or 'model'}' lacks a DeepSeek MoE field: {e}") from None


# DeepSeek-V3 / R1 config.json (deepseek-ai/DeepSeek-V3), also transformers' DeepseekV3Config defaults
DEEPSEEK_V3 = MoEShape("deepseek-v3", layers=61, hidden=7168, vocab=129280, heads=128, q_lora_rank=1536,
                       kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                       dense_intermediate=18432, first_dense_layers=3, routed_experts=256,
                       shared_experts=1, experts_per_token=8, expert_intermediate=2048,
                       source="deepseek-ai/DeepSeek-V3 config.json")
MOE_PRESETS = {"deepseek-v3": DEEPSEEK_V3, "671b": DEEPSEEK_V3}


def moe_shape(name: "str | MoEShape") -> MoEShape:
    if isinstance(name, MoEShape):
        return name
    try:
        return MOE_PRESETS[name.lower()]
    except KeyError:
        raise EstimateError(f"unknown MoE preset '{name}'; known: {', '.join(MOE_PRESETS)}") from None


def dense_largest_module(shape: ModelShape) -> int:
    """Largest module of a dense Llama-style decoder (embedding/head or the biggest linear)."""
    return max([shape.vocab * shape.hidden] + [a * b for a, b in shape.linear_shapes().values()])


# --------------------------------------------------------------------------- model states

def offload_devices(offload: str) -> tuple[str | None, str | None]:
    try:
        return OFFLOADS[offload]
    except KeyError:
        raise ConfigError(f"offload '{offload}': choose one of {', '.join(OFFLOADS)}") from None


def check_placement(stage: int, offload: str) -> tuple[str | None, str | None]:
    """Which ZeRO stage allows which offload: optimizer offload needs stage >= 1, parameter
    offload stage 3 (DeepSpeed's parser accepts both elsewhere and ignores them)."""
    if stage not in STAGES:
        raise ConfigError(f"ZeRO stage {stage!r}: must be one of 0, 1, 2, 3")
    opt, par = offload_devices(offload)
    if opt and stage < 1:
        raise ConfigError(f"offload '{offload}' needs ZeRO stage >= 1 (stage 0 has no partitioned "
                          "optimizer states to offload)")
    if par and stage != 3:
        raise ConfigError(f"offload '{offload}' moves parameters: that needs ZeRO stage 3 (got {stage})")
    return opt, par


@dataclass
class StateMemory:
    """Model-state bytes: ``gpu`` per GPU, ``cpu`` and ``nvme`` per node, each by term."""

    gpu: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    nvme: dict[str, float] = field(default_factory=dict)

    @property
    def gpu_total(self) -> float:
        return sum(self.gpu.values())

    @property
    def gpu_model_states(self) -> float:
        """Weights + gradients + optimizer states on the GPU (the paper's figure; no buffers)."""
        return sum(v for k, v in self.gpu.items() if k != WORK_BUFFER)

    @property
    def cpu_total(self) -> float:
        return sum(self.cpu.values())

    @property
    def nvme_total(self) -> float:
        return sum(self.nvme.values())


WORK_BUFFER = "stage-3 gathered largest module"
LOAD_PEAK = "model load peak (fp32)"


def model_states(trainable: float, stage: int, offload: str = "none", world_size: int = 1, *,
                 frozen: float = 0, frozen_bytes: float = BF16, largest_layer: float = 0,
                 largest_layer_bytes: float | None = None, gpus_per_node: int | None = None,
                 accounting: str = "paper", zero_init: bool = True,
                 buffer_factor: float = 1.5) -> StateMemory:
    """Model-state memory of mixed-precision Adam training under ZeRO (module docstring).

    ``trainable`` / ``frozen``: parameter counts; ``frozen_bytes``: bytes per frozen parameter;
    ``largest_layer``: parameters of the largest module (stage-3 working buffer) and
    ``largest_layer_bytes`` what each costs there (default: 2 + 2 B, weight and gradient, when
    anything is trained, else ``frozen_bytes``);
    ``accounting``: ``paper`` or ``deepspeed`` (DeepSpeed's estimators, stages 2 and 3 only);
    ``zero_init`` / ``buffer_factor``: used by the deepspeed accounting's CPU figure."""
    if accounting not in ("paper", "deepspeed"):
        raise EstimateError(f"accounting '{accounting}': use 'paper' or 'deepspeed'")
    if accounting == "deepspeed" and stage not in (2, 3):
        raise EstimateError("DeepSpeed has estimators for ZeRO stages 2 and 3 only")
    opt_dev, par_dev = check_placement(stage, offload)
    n = int(world_size)
    g = int(gpus_per_node or n)
    if n < 1 or g < 1 or n % g:
        raise EstimateError(f"world size {n} must be a positive multiple of gpus_per_node {g}")
    out = StateMemory()

    def put(where: str | None, name: str, nbytes: float):
        if nbytes:
            if where is None:
                out.gpu[name] = out.gpu.get(name, 0) + nbytes
            else:  # per node: the node's g GPUs each hold a partition there
                d = out.cpu if where == "cpu" else out.nvme
                d[name] = d.get(name, 0) + nbytes * g

    share = lambda partitioned: 1 / n if partitioned else 1  # noqa: E731
    put(par_dev, "bf16 weights", BF16 * trainable * share(stage == 3))
    put(par_dev, "frozen weights", frozen_bytes * frozen * share(stage == 3))
    grad_where = "cpu" if opt_dev else None  # offloaded gradients live in CPU memory (also with NVMe)
    if accounting == "paper":
        put(grad_where, "bf16 gradients", GRAD16 * trainable * share(stage >= 2))
    elif opt_dev:
        put("cpu", "fp32 gradients", 4 * trainable / n)
    else:
        if stage == 2:
            put(None, "bf16 gradients", GRAD16 * trainable / n)
        put(None, "fp32 gradients", 4 * trainable / n)
    put(opt_dev, "Adam states (fp32 master, m, v)", ADAM_STATES * trainable * share(stage >= 1))
    if stage == 3 and largest_layer:
        per = largest_layer_bytes
        if per is None:
            per = BF16 + GRAD16 if trainable else frozen_bytes
        out.gpu[WORK_BUFFER] = per * largest_layer
    if accounting == "deepspeed":
        steady = out.cpu_total
        if stage == 3 and zero_init:  # zero.Init builds one layer at a time; DeepSpeed counts it
            peak = 4 * largest_layer * g if not opt_dev else 0  # only when nothing is offloaded
        else:
            peak = 4 * (trainable + frozen) * g
        out.cpu = ({LOAD_PEAK: peak * buffer_factor} if peak > steady else
                   {k: v * buffer_factor for k, v in out.cpu.items()})
    return out


def deepspeed_estimate(total_params: float, stage: int, offload: str, gpus_per_node: int,
                       nodes: int = 1, largest_layer: float = 0, zero_init: bool = True,
                       buffer_factor: float = 1.5) -> tuple[int, int]:
    """(CPU bytes per node, GPU bytes per GPU) from DeepSpeed's own estimator functions."""
    opt, par = check_placement(stage, offload)
    if opt == "nvme":
        raise EstimateError("DeepSpeed's estimators have no NVMe option")
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        return estimate_zero2_model_states_mem_needs(int(total_params), gpus_per_node, nodes,
                                                     cpu_offload=bool(opt),
                                                     additional_buffer_factor=buffer_factor)
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            int(total_params), int(largest_layer), gpus_per_node, nodes, cpu_offload=bool(opt),
            cpu_offload_params=bool(par), zero_init=zero_init, additional_buffer_factor=buffer_factor)
        return cpu, gpu
    raise EstimateError("DeepSpeed has estimators for ZeRO stages 2 and 3 only")


def compare_with_deepspeed(total_params: int, largest_layer: int, gpus_per_node: int,
                           nodes: int = 1) -> tuple[list[dict[str, Any]], float]:
    """DeepSpeed's estimates next to ours (deepspeed and paper accounting) for every option its
    estimators cover; returns (rows in GB, largest relative difference of ours(deepspeed) vs DS)."""
    rows, worst = [], 0.0
    n = gpus_per_node * nodes
    for stage, off in [(2, "none"), (2, "opt-cpu"), (3, "none"), (3, "opt-cpu"), (3, "opt+param-cpu")]:
        for zi in (True, False):
            ds_cpu, ds_gpu = deepspeed_estimate(total_params, stage, off, gpus_per_node, nodes,
                                                largest_layer, zi)
            kw = dict(largest_layer=largest_layer, gpus_per_node=gpus_per_node)
            ours = model_states(total_params, stage, off, n, accounting="deepspeed", zero_init=zi, **kw)
            paper = model_states(total_params, stage, off, n, **kw)
            worst = max(worst, abs(ours.gpu_total - ds_gpu) / ds_gpu,
                        abs(ours.cpu_total - ds_cpu) / max(ds_cpu, 1))
            rows.append({"stage": stage, "offload": off, "zero_init": zi,
                         "DS GPU GB": round(ds_gpu / GB, 1), "ours(DS) GPU GB": round(ours.gpu_total / GB, 1),
                         "paper GPU GB": round(paper.gpu_total / GB, 1), "DS CPU GB": round(ds_cpu / GB),
                         "ours(DS) CPU GB": round(ours.cpu_total / GB),
                         "paper CPU GB": round(paper.cpu_total / GB)})
    return rows, worst


def deepspeed_estimator_table(total_params: int, largest_layer: int, gpus_per_node: int,
                              nodes: int = 1) -> str:
    """What ``estimate_zero2/3_model_states_mem_needs_all_cold`` print (their own tables, GiB)."""
    import contextlib
    import io

    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        estimate_zero2_model_states_mem_needs_all_cold(total_params, gpus_per_node, nodes)
        estimate_zero3_model_states_mem_needs_all_cold(total_params, largest_layer, gpus_per_node, nodes)
    return buf.getvalue()


# --------------------------------------------------------------------------- activations

def _norm_bytes(d: int) -> int:
    """An RMSNorm keeps its input upcast to fp32, 1/rms (fp32) and the normalised bf16 copy."""
    return 4 * d + 4 + 2 * d


def activation_terms(shape: MoEShape) -> dict[str, int]:
    """Bytes kept for backward per token by one layer's parts, in bf16 training with
    transformers' DeepseekV3 modules (checked tensor by tensor with saved_tensors_hooks, see
    ``measure_saved_bytes``) and a flash-attention kernel (keeps q, k, v, the output and the
    log-sum-exp; no s² term):

    * MLA: input norm; the q_a/kv_a input (the norm's output); q_a norm and the q_b input; kv_a
      norm and the kv_b input; q and k (heads × qk_head_dim each); v (a slice of kv_b's output, so
      that whole output: heads × (nope + v)); the attention output and its contiguous copy (o_proj's
      input); log-sum-exp (fp32 per head);
    * MoE MLP: norm; router: fp32 input, fp32 logits and scores, the expert mask (bool), group and
      top-k indices (int64), top-k weights and their sum (fp32); per selected expert: the gathered
      input, gate/up output, SiLU output, their product, the expert output, three int64 indices;
      shared experts: their input, gate, SiLU, up and product (4 × intermediate);
    * dense MLP: norm; input; gate, SiLU, up, product (4 × intermediate).

    What the measurement adds beyond these terms is routing-dependent bookkeeping (a few index
    tensors, one fp32 weight per selection in some batches): < 1 % on small shapes."""
    h, n = shape.hidden, shape.heads
    mla = (_norm_bytes(h) + 2 * h + _norm_bytes(shape.q_lora_rank) + 2 * shape.q_lora_rank
           + _norm_bytes(shape.kv_lora_rank) + 2 * shape.kv_lora_rank
           + 2 * 2 * n * shape.qk_head_dim + 2 * n * (shape.qk_nope_head_dim + shape.v_head_dim)
           + 2 * 2 * n * shape.v_head_dim + 4 * n)
    if not shape.q_lora_rank:  # q_proj straight from the input: no q_a norm (the formula gave 4)
        mla -= 4
    e, k = shape.routed_experts, shape.experts_per_token
    router = 4 * h + 2 * 4 * e + e + 16 * shape.n_group + 8 * shape.topk_group + 8 * k + 4 * k + 4
    routed = k * (2 * h + 2 * 2 * shape.expert_intermediate + 2 * 2 * shape.expert_intermediate
                  + 2 * h + 3 * 8)
    shared = (2 * h + 4 * 2 * shape.shared_experts * shape.expert_intermediate) if shape.shared_experts else 0
    moe = _norm_bytes(h) + router + routed + shared
    dense = _norm_bytes(h) + 2 * h + 4 * 2 * shape.dense_intermediate
    return {"attention (MLA)": mla, "MoE MLP": moe, "dense MLP": dense}


def activation_bytes(shape: MoEShape, micro_batch: int, seq_len: int,
                     checkpointing: bool = True) -> dict[str, float]:
    """Activation memory per GPU (bytes) by part for one micro-batch of ``micro_batch × seq_len``
    tokens (data parallel: every GPU runs the whole model on its own micro-batch). After the last
    layer: final norm, the head's input, the fp32 log-softmax output, and at the start of backward
    the fp32 gradients of that output and of the logits (2 × T×V, ``memory.estimate``'s rule).
    Gradient checkpointing keeps every layer's bf16 input and recomputes one layer at a time."""
    t = micro_batch * seq_len
    terms = activation_terms(shape)
    dense_layer = (terms["attention (MLA)"] + terms["dense MLP"]) * t
    moe_layer = (terms["attention (MLA)"] + terms["MoE MLP"]) * t
    head = (_norm_bytes(shape.hidden) + 2 * shape.hidden + 4 * shape.vocab) * t
    logits_back = 2 * 4 * shape.vocab * t
    if checkpointing:
        one = max(dense_layer if shape.first_dense_layers else 0, moe_layer if shape.moe_layers else 0)
        return {"checkpointed layer inputs": shape.layers * 2 * shape.hidden * t,
                "max(one layer recomputed, head + logits backward)": max(one, head + logits_back)}
    return {"dense layers": shape.first_dense_layers * dense_layer,
            "MoE layers": shape.moe_layers * moe_layer,
            "final norm + head input + log-softmax": head, "logits backward (2 × T×V fp32)": logits_back}


def _transformers_config(shape: MoEShape, layers: int, first_dense: int):
    from transformers import DeepseekV3Config

    cfg = DeepseekV3Config(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.dense_intermediate,
        moe_intermediate_size=shape.expert_intermediate, num_hidden_layers=layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
        n_shared_experts=shape.shared_experts, n_routed_experts=shape.routed_experts,
        kv_lora_rank=shape.kv_lora_rank, q_lora_rank=shape.q_lora_rank or None,
        qk_rope_head_dim=shape.qk_rope_head_dim, v_head_dim=shape.v_head_dim,
        qk_nope_head_dim=shape.qk_nope_head_dim, n_group=shape.n_group, topk_group=shape.topk_group,
        num_experts_per_tok=shape.experts_per_token, first_k_dense_replace=first_dense,
        tie_word_embeddings=shape.tied_embeddings)
    cfg._attn_implementation = _register_attention()
    return cfg


def _register_attention() -> str:
    """A causal attention for transformers that keeps for backward exactly what a flash-attention
    kernel keeps (q, k, v, output, fp32 log-sum-exp) and recomputes the rest; registered once."""
    import torch
    from transformers import AttentionInterface

    name = "llmtech_qkvo_lse"
    if name in AttentionInterface._global_mapping:
        return name

    def scores(q, k, scale):
        s = (q.float() @ k.float().transpose(-1, -2)) * scale
        n = s.shape[-1]
        return s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1), float("-inf"))

    class KeepQKVO(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, scale):
            with torch.no_grad():
                s = scores(q, k, scale)
                lse = torch.logsumexp(s, -1)
                out = (torch.exp(s - lse[..., None]) @ v.float()).to(q.dtype)
            ctx.scale = scale
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):
            q, k, v, _, _ = ctx.saved_tensors
            with torch.enable_grad():
                q2, k2, v2 = (x.detach().requires_grad_() for x in (q, k, v))
                out = (torch.softmax(scores(q2, k2, ctx.scale), -1) @ v2.float()).to(q.dtype)
                gq, gk, gv = torch.autograd.grad(out, (q2, k2, v2), grad)
            return gq, gk, gv, None

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return KeepQKVO.apply(query, key, value, scale).transpose(1, 2), None

    AttentionInterface.register(name, attention)
    return name


def transformers_param_count(shape: MoEShape) -> tuple[int, int]:
    """(parameters, largest module's own parameters) of transformers' ``DeepseekV3ForCausalLM``
    with ``shape``'s dimensions, built on the meta device (no memory, ~2 s for 671B)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            _transformers_config(shape, shape.layers, shape.first_dense_layers))
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def measure_saved_bytes(shape: MoEShape, batch: int = 2, seq_len: int = 64, seed: int = 0) -> dict[str, float]:
    """Measured bytes per token that autograd keeps for a dense layer and for a MoE layer of
    transformers' DeepseekV3 with ``shape``'s dimensions in bf16 (a 3-layer model: layer 1 dense,
    layer 2 MoE; use a small shape, it is built for real on the CPU). Every saved tensor's storage
    is counted once (parameters excluded) and charged to the decoder layer running when it was
    saved. Compare with ``activation_terms``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_transformers_config(shape, 3, 2)).to(torch.bfloat16)
    ids = torch.randint(0, shape.vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    where = ["embedding"]
    per: dict[str, int] = {}
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, f"layer{i}"))
             for i, layer in enumerate(model.model.layers)]
    hooks.append(model.model.norm.register_forward_pre_hook(lambda m, a: where.__setitem__(0, "head")))

    def pack(x):
        st = x.untyped_storage()
        if st.data_ptr() not in params and st.data_ptr() not in seen:
            seen[st.data_ptr()] = st.nbytes()
            per[where[0]] = per.get(where[0], 0) + st.nbytes()
        return x

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()  # the kept tensors suffice for backward (and the graph is freed)
    finally:
        for h in hooks:
            h.remove()
    t = batch * seq_len
    return {"dense_layer": per["layer1"] / t, "moe_layer": per["layer2"] / t}


# --------------------------------------------------------------------------- communication

def comm_volume(trainable: float, stage: int, world_size: int, frozen: float = 0,
                frozen_bytes: float = BF16, elem_bytes: float = BF16) -> dict[str, float]:
    """Collective traffic per GPU for one training step (ZeRO paper, section 7): elements, bytes,
    and the bytes a ring collective actually sends ((N − 1)/N of them)."""
    if stage not in STAGES:
        raise ConfigError(f"ZeRO stage {stage!r}: must be one of 0, 1, 2, 3")
    elems = (3 if stage == 3 else 2) * trainable
    nbytes = elems * elem_bytes
    if stage == 3 and frozen:  # frozen weights are all-gathered in forward and backward
        elems += 2 * frozen
        nbytes += 2 * frozen * frozen_bytes
    ring = nbytes * (world_size - 1) / world_size
    return {"elements": elems, "bytes": nbytes, "ring_bytes": ring}


def offload_traffic(trainable: float, stage: int, offload: str, world_size: int,
                    frozen: float = 0, frozen_bytes: float = BF16,
                    gpus_per_node: int | None = None) -> dict[str, float]:
    """Bytes moved per training step by offloading: ``pcie`` per GPU (gradient partition down,
    updated weights up; with parameter offload the partition fetched for forward and backward),
    ``nvme`` per node (optimizer states read + written; weights read twice, written once)."""
    opt, par = check_placement(stage, offload)
    n = world_size
    g = gpus_per_node or n
    w16 = (BF16 * trainable + frozen_bytes * frozen) / n  # this GPU's 16-bit weight partition
    pcie = nvme = 0.0
    if opt:
        pcie += GRAD16 * trainable / n + (0 if par else BF16 * trainable / n)
    if par:
        pcie += 2 * w16
    if opt == "nvme":
        nvme += 2 * ADAM_STATES * trainable / n * g
    if par == "nvme":
        nvme += (2 * w16 + BF16 * trainable / n) * g
    return {"pcie": pcie, "nvme": nvme}


def seconds(nbytes: float, gb_per_s: float) -> float:
    return nbytes / (gb_per_s * GB) if gb_per_s > 0 else math.inf


# --------------------------------------------------------------------------- whole-setup plan

@dataclass(frozen=True)
class Setup:
    """One training setup: method (full / lora / qlora), ZeRO stage, offload choice."""

    method: str
    stage: int
    offload: str = "none"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"setup method '{self.method}': use one of {', '.join(METHODS)}")
        check_placement(self.stage, self.offload)

    @classmethod
    def parse(cls, spec: str) -> "Setup":
        """``"full/3/opt-cpu"`` -> Setup("full", 3, "opt-cpu") (offload defaults to none)."""
        parts = spec.split("/")
        if len(parts) not in (2, 3) or not parts[1].isdigit():
            raise ConfigError(f"setup '{spec}': expected method/stage[/offload], e.g. full/3/opt-cpu")
        return cls(parts[0], int(parts[1]), parts[2] if len(parts) == 3 else "none")

    @property
    def key(self) -> str:
        off = "" if self.offload == "none" else "_" + self.offload.replace("+", "_").replace("-", "_")
        return f"{self.method}_z{self.stage}{off}"

    @property
    def label(self) -> str:
        return f"{self.method} Z{self.stage}" + ("" if self.offload == "none" else f" {self.offload}")


@dataclass(frozen=True)
class Cluster:
    """Hardware the plan is checked against (bandwidths per direction)."""

    gpus: int = 8
    gpus_per_node: int = 8
    headroom: float = 0.9  # usable share of GPU memory (CUDA context, fragmentation)
    cpu_gb_per_node: float = 2048
    nvme_gb_per_node: float = 30720
    nvlink_gb_s: float = 450  # H100/H200 NVLink 4: 900 GB/s bidirectional
    ib_gbit_s: float = 400  # one 400 Gb/s NIC per GPU
    pcie_gb_s: float = 50  # PCIe Gen5 x16: 64 GB/s nominal per direction
    nvme_gb_s: float = 25  # per node, the drives together
    gpu_tflops: float = 989  # H100/H200 SXM dense bf16
    mfu: float = 0.4


@dataclass(frozen=True)
class Training:
    """Batch shape and method settings the plan depends on."""

    micro_batch: int = 1
    grad_accum: int = 8
    seq_len: int = 4096
    gradient_checkpointing: bool = True
    lora_r: int = 16
    lora_targets: str = "attention"
    fused_experts: bool = False


@dataclass
class Plan:
    """Memory, traffic and time of one setup on one cluster (bytes, seconds)."""

    setup: Setup
    trainable: int
    frozen: int
    states: StateMemory
    activations: dict[str, float]
    comm: dict[str, float]
    offload: dict[str, float]
    times: dict[str, float]
    cluster: Cluster

    @property
    def gpu_bytes(self) -> float:
        return self.states.gpu_total + sum(self.activations.values())

    @property
    def step_s(self) -> float:
        """Lower bound of one step: the slowest of compute, collectives (NVLink inside one node,
        InfiniBand across nodes), PCIe offload traffic and NVMe traffic, assuming full overlap."""
        t = self.times
        comm = t["comm_nvlink_s"] if self.cluster.gpus <= self.cluster.gpus_per_node else t["comm_ib_s"]
        return max(t["compute_s"], comm, t["pcie_s"], t["nvme_s"])

    def fits(self, gpu_gb: float) -> bool:
        c = self.cluster
        return (self.gpu_bytes <= gpu_gb * GB * c.headroom
                and self.states.cpu_total <= c.cpu_gb_per_node * GB
                and self.states.nvme_total <= c.nvme_gb_per_node * GB)

    def limits(self, gpu_gb: float) -> str:
        """What does not fit, in words with numbers ('' when all fits)."""
        c, out = self.cluster, []
        if self.gpu_bytes > gpu_gb * GB * c.headroom:
            out.append(f"GPU {self.gpu_bytes / GB:.0f} > {gpu_gb * c.headroom:.0f} GB")
        if self.states.cpu_total > c.cpu_gb_per_node * GB:
            out.append(f"CPU {self.states.cpu_total / GB:.0f} > {c.cpu_gb_per_node:.0f} GB")
        if self.states.nvme_total > c.nvme_gb_per_node * GB:
            out.append(f"NVMe {self.states.nvme_total / GB:.0f} > {c.nvme_gb_per_node:.0f} GB")
        return "; ".join(out)

    def row(self, gpu_gb: tuple[float, ...] = (80, 141)) -> dict[str, Any]:
        """One table row (GB = 1e9 bytes; large values rounded to whole GB)."""
        def gb(x: float):
            return round(x / GB) if x >= 1000 * GB else round(x / GB, 1)

        out = {"setup": self.setup.label, "stage": self.setup.stage,
               "trainable_B": round(self.trainable / 1e9, 3), "states_GB/GPU": gb(self.states.gpu_model_states),
               "buffer_GB": gb(self.states.gpu.get(WORK_BUFFER, 0)),
               "activations_GB": gb(sum(self.activations.values())), "GPU_GB": gb(self.gpu_bytes),
               "CPU_GB/node": gb(self.states.cpu_total), "NVMe_GB/node": gb(self.states.nvme_total),
               "step_s≥": round(self.step_s, 1)}
        out.update({f"fits {self.cluster.gpus}×{g:g}": self.fits(g) for g in gpu_gb})
        out[f"why not ({gpu_gb[0]:g} GB)"] = self.limits(gpu_gb[0]) or "-"
        return out


def plan(shape: MoEShape, setup: Setup, cluster: Cluster = Cluster(),
         training: Training = Training()) -> Plan:
    """Everything the 8-GPU table shows for one setup (paper accounting + stage-3 buffer)."""
    n = shape.params
    if setup.method == "full":
        trainable, frozen, fbytes = n, 0, BF16
    else:
        trainable = shape.lora_params(training.lora_r, training.lora_targets)
        frozen = n
        if setup.method == "qlora":
            lin = shape.linear_params()
            fbytes = (lin * NF4_BYTES + (n - lin) * BF16) / n
        else:
            fbytes = BF16
    layer = shape.largest_module(training.fused_experts)
    states = model_states(trainable, setup.stage, setup.offload, cluster.gpus, frozen=frozen,
                          frozen_bytes=fbytes, largest_layer=layer,
                          # LoRA: the largest module (embedding) is frozen and stays bf16 in QLoRA
                          largest_layer_bytes=BF16 + GRAD16 if setup.method == "full" else BF16,
                          gpus_per_node=cluster.gpus_per_node)
    acts = activation_bytes(shape, training.micro_batch, training.seq_len, training.gradient_checkpointing)
    comm = comm_volume(trainable, setup.stage, cluster.gpus, frozen, fbytes)
    traffic = offload_traffic(trainable, setup.stage, setup.offload, cluster.gpus, frozen, fbytes,
                              cluster.gpus_per_node)
    tokens = training.micro_batch * training.seq_len
    flops_per_token = (6 if setup.method == "full" else 4) + (2 if training.gradient_checkpointing else 0)
    compute = flops_per_token * shape.active_params * tokens / (cluster.gpu_tflops * 1e12 * cluster.mfu)
    times = {"compute_s": compute, "comm_nvlink_s": seconds(comm["ring_bytes"], cluster.nvlink_gb_s),
             "comm_ib_s": seconds(comm["ring_bytes"], cluster.ib_gbit_s / 8),
             "pcie_s": seconds(traffic["pcie"], cluster.pcie_gb_s),
             "nvme_s": seconds(traffic["nvme"], cluster.nvme_gb_s)}
    return Plan(setup, trainable, frozen, states, acts, comm, traffic, times, cluster)


def plan_figure(plans: list[Plan], gpu_gb: tuple[float, ...] = (80, 141), title: str = ""):
    """Bar per setup: GPU memory per GPU (log scale) against the capacity lines; green fits the
    first capacity, orange only a larger one, red none; each bar is labelled with what does not fit
    on the largest GPU (or the step-time bound). Returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(13, 5))
    vals = [p.gpu_bytes / GB for p in plans]
    colors = ["tab:green" if p.fits(gpu_gb[0]) else "tab:orange" if any(p.fits(g) for g in gpu_gb)
              else "tab:red" for p in plans]
    ax.bar(range(len(vals)), vals, color=colors)
    for i, p in enumerate(plans):
        why = p.limits(gpu_gb[-1]).replace("; ", "\n") or f"≥{p.step_s:.0f} s/step"
        ax.annotate(why, (i, vals[i]), ha="center", va="bottom", fontsize=6)
    for g, style in zip(gpu_gb, ("--", ":", "-.")):
        ax.axhline(g, color="k", ls=style, lw=1, label=f"{g:g} GB (usable {g * plans[0].cluster.headroom:.0f})")
    ax.set(yscale="log", ylim=(min(vals) / 2, max(vals) * 8), ylabel="GB per GPU (log)",
           title=title or f"per-GPU memory (green: fits {gpu_gb[0]:g} GB, orange: only "
                          f"{gpu_gb[-1]:g} GB, red: neither)")
    ax.set_xticks(range(len(vals)), [p.setup.label for p in plans], rotation=35, ha="right", fontsize=8)
    ax.legend()
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- DeepSpeed configs

def check_batch(train_batch_size: int, micro_batch: int, grad_accum: int, world_size: int,
                source: str = "") -> None:
    """train_batch_size must equal micro-batch per GPU × accumulation steps × world size."""
    where = f"{source}: " if source else ""
    for name, v in (("train_batch_size", train_batch_size), ("train_micro_batch_size_per_gpu", micro_batch),
                    ("gradient_accumulation_steps", grad_accum), ("world_size", world_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{where}{name} must be a positive integer (got {v!r})")
    if train_batch_size != micro_batch * grad_accum * world_size:
        raise ConfigError(
            f"{where}inconsistent batch sizes: train_batch_size {train_batch_size} != "
            f"train_micro_batch_size_per_gpu {micro_batch} × gradient_accumulation_steps "
            f"{grad_accum} × world_size {world_size} (= {micro_batch * grad_accum * world_size})")


def resolve_batch(config: Mapping[str, Any], world_size: int, source: str = "") -> tuple[int, int, int]:
    """(train_batch_size, micro batch, accumulation) as DeepSpeed derives the missing ones, with
    the real world size; raises ``ConfigError`` when they are inconsistent."""
    def get(key):  # "auto" (transformers fills it from its arguments) counts as not given
        v = config.get(key)
        return None if v == "auto" else v

    tb, mb = get("train_batch_size"), get("train_micro_batch_size_per_gpu")
    ga = get("gradient_accumulation_steps")
    where = f"{source}: " if source else ""
    for name, v in (("train_batch_size", tb), ("train_micro_batch_size_per_gpu", mb),
                    ("gradient_accumulation_steps", ga)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ConfigError(f"{where}{name} must be a positive integer (got {v!r})")
    if tb is None and mb is None:
        raise ConfigError(f"{where}set train_micro_batch_size_per_gpu (or train_batch_size)")
    if mb is None:
        ga = ga or 1
        mb = tb // (world_size * ga) or 1
    elif ga is None:
        ga = (tb // (mb * world_size) or 1) if tb is not None else 1
    if tb is None:
        tb = mb * ga * world_size
    check_batch(tb, mb, ga, world_size, source)
    return tb, mb, ga


def zero_config(stage: int, offload: str = "none", bf16: bool = True, micro_batch: int = 1,
                grad_accum: int = 1, world_size: int = 1, hidden_size: int | None = None, *,
                lr: float = 1e-5, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95),
                gradient_clipping: float = 1.0, nvme_path: str | None = None,
                largest_param: int | None = None, train_batch_size: int | None = None) -> dict[str, Any]:
    """A DeepSpeed ZeRO config dict (module docstring). ``hidden_size`` None leaves the three
    bucket sizes ``"auto"`` for transformers' Trainer to fill. ``largest_param`` sizes the NVMe
    parameter swap buffers (they must hold the largest tensor). ``train_batch_size`` defaults to
    micro × accumulation × world size; a different value is a ``ConfigError``."""
    opt_dev, par_dev = check_placement(stage, offload)
    for name, v in (("micro_batch", micro_batch), ("grad_accum", grad_accum), ("world_size", world_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{name} must be a positive integer (got {v!r})")
    tb = micro_batch * grad_accum * world_size if train_batch_size is None else train_batch_size
    check_batch(tb, micro_batch, grad_accum, world_size)
    if "nvme" in (opt_dev, par_dev) and not nvme_path:
        raise ConfigError(f"offload '{offload}' writes to NVMe: give nvme_path (a local NVMe mount)")
    zero: dict[str, Any] = {"stage": stage}
    if stage in (1, 2):
        zero.update(allgather_partitions=True, reduce_scatter=True, overlap_comm=True,
                    contiguous_gradients=True,
                    reduce_bucket_size=hidden_size * hidden_size if hidden_size else "auto")
    if stage == 3:
        h2 = hidden_size * hidden_size if hidden_size else None
        zero.update(overlap_comm=True, contiguous_gradients=True,
                    reduce_bucket_size=h2 if h2 else "auto",
                    stage3_prefetch_bucket_size=int(0.9 * h2) if h2 else "auto",
                    stage3_param_persistence_threshold=10 * hidden_size if hidden_size else "auto",
                    stage3_max_live_parameters=1_000_000_000, stage3_max_reuse_distance=1_000_000_000,
                    sub_group_size=1_000_000_000, stage3_gather_16bit_weights_on_model_save=True)
    if opt_dev == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    elif opt_dev == "nvme":
        zero["offload_optimizer"] = {"device": "nvme", "nvme_path": nvme_path, "pin_memory": True,
                                     "buffer_count": 4, "fast_init": False}
    if par_dev == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    elif par_dev == "nvme":
        zero["offload_param"] = {"device": "nvme", "nvme_path": nvme_path, "pin_memory": True,
                                 "buffer_count": 5, "buffer_size": max(100_000_000, int(largest_param or 0)),
                                 "max_in_cpu": 1_000_000_000}
    cfg: dict[str, Any] = {
        "train_batch_size": tb, "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum, "gradient_clipping": gradient_clipping,
        "bf16": {"enabled": bool(bf16)},
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": list(betas), "eps": 1e-8,
                                                  "weight_decay": weight_decay}},
        "zero_optimization": zero, "steps_per_print": 10, "wall_clock_breakdown": False}
    if "nvme" in (opt_dev, par_dev):
        cfg["aio"] = {"block_size": 1_048_576, "queue_depth": 8, "thread_count": 1,
                      "single_submit": False, "overlap_events": True}
    return cfg


def _device(block: Any) -> str:
    if isinstance(block, Mapping):
        return str(block.get("device") or "none")
    return "none"


def validate_ds_config(config: Mapping[str, Any], world_size: int, source: str = "<config>"):
    """Check a DeepSpeed config for ``world_size`` GPUs (our checks first, with messages that name
    the keys), then parse it with ``deepspeed.runtime.config.DeepSpeedConfig``; returns that
    object. Raises ``ConfigError`` naming ``source``."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"{source}: a DeepSpeed config must be a JSON object")
    tb, mb, ga = resolve_batch(config, world_size, source)
    zero = config.get("zero_optimization", {}) or {}
    if not isinstance(zero, Mapping):
        raise ConfigError(f"{source}: zero_optimization must be an object")
    stage = zero.get("stage", 0)
    if stage not in STAGES:
        raise ConfigError(f"{source}: zero_optimization.stage {stage!r} must be 0, 1, 2 or 3")
    opt, par = _device(zero.get("offload_optimizer")), _device(zero.get("offload_param"))
    if opt != "none" and stage < 1:
        raise ConfigError(f"{source}: zero_optimization.offload_optimizer needs stage >= 1 (stage {stage})")
    if par != "none" and stage != 3:
        raise ConfigError(f"{source}: zero_optimization.offload_param needs stage 3 (stage {stage})")
    for key, dev in (("offload_optimizer", opt), ("offload_param", par)):
        if dev == "nvme" and not zero[key].get("nvme_path"):
            raise ConfigError(f"{source}: zero_optimization.{key}.device is nvme but nvme_path is missing")
    enabled = lambda k: isinstance(config.get(k), Mapping) and bool(config[k].get("enabled"))  # noqa: E731
    if enabled("bf16") and enabled("fp16"):
        raise ConfigError(f"{source}: bf16.enabled and fp16.enabled cannot both be true")
    from deepspeed.runtime.config import DeepSpeedConfig

    offline = copy.deepcopy(dict(config))  # the parser sees world size 1 here: give it mb and ga only
    offline.pop("train_batch_size", None)
    offline.update(train_micro_batch_size_per_gpu=mb, gradient_accumulation_steps=ga)
    try:
        ds = DeepSpeedConfig(offline)
    except Exception as e:  # pydantic ValidationError, AssertionError, ValueError from the parser
        msg = " ".join(str(e).split())[:400]
        raise ConfigError(f"{source}: DeepSpeed rejected the config: {msg}") from None
    if ds.train_batch_size * world_size != tb:  # the parser derived mb × ga × 1
        raise ConfigError(f"{source}: DeepSpeed derived train_batch_size {ds.train_batch_size} for one "
                          f"GPU, which × {world_size} != {tb}")
    return ds


def load_ds_config(path: str | Path, world_size: int) -> tuple[dict[str, Any], Any]:
    """Read a DeepSpeed JSON config and validate it (``validate_ds_config``): (dict, parsed)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: DeepSpeed config file not found")
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: line {e.lineno} column {e.colno}: invalid JSON: {e.msg}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    return cfg, validate_ds_config(cfg, world_size, str(p))
