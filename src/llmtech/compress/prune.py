"""Pruning a causal LM: unstructured magnitude pruning and structured MLP-channel pruning.

* **Unstructured** (``magnitude_prune``): the smallest-magnitude entries of the linear weights are
  set to zero, either with one threshold over all target matrices (``scope="global"``: layers with
  many small weights lose more) or the same fraction in every matrix (``scope="layer"``). The
  zeros are written into the weights (permanent: no mask or ``weight_orig`` is left behind, as
  ``torch.nn.utils.prune.remove`` would leave it). The tensors keep their shapes and are still
  stored and multiplied densely: **the saved file is exactly as large and generation exactly as
  fast** as before. Sparsity pays off only with sparse storage/kernels — ``csr_bytes`` shows that
  at 50 % sparsity even CSR storage (value + column index per non-zero) is no smaller than dense
  fp32, and 2:4 semi-structured sparsity needs GPU sparse tensor cores.
* **Structured** (``prune_mlp_channels``): whole intermediate neurons of every MLP block are
  removed — row ``i`` of ``gate_proj`` and ``up_proj`` and column ``i`` of ``down_proj`` — and the
  three matrices are rebuilt smaller, with ``config.intermediate_size`` updated, so the saved model
  is smaller and every forward pass does less work. Neurons are ranked per layer by
  ``mlp_channel_scores``: ``weight`` (product of the channel's weight norms) or ``activation``
  (mean |input of down_proj| on calibration tokens × the norm of its down_proj column — how much
  the neuron actually adds to the residual stream; data-aware scores keep quality far better).

``llmtech.compress.compare`` measures every compressed variant (pruned, distilled, quantised) on
one scale: size on disk, held-out perplexity, memory, tokens/s, and the Pareto front.

Only Llama-style gated MLPs (``gate_proj`` / ``up_proj`` / ``down_proj``: Llama, Qwen2, Mistral,
SmolLM2...) can be pruned structurally here; other models get a clear error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import torch
from torch import nn

from ..errors import LlmtechError

log = logging.getLogger(__name__)

SKIP = ("lm_head",)  # the output head is tied to the embedding in small models: never pruned


class PruningError(LlmtechError):
    """A pruning request the model or the arguments cannot satisfy."""


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise PruningError(f"{name} must be in [0, 1), got {value}")


# --------------------------------------------------------------------------- unstructured

def prunable_linears(model: nn.Module, skip: Sequence[str] = SKIP) -> dict[str, nn.Linear]:
    """Name -> ``nn.Linear`` for every linear layer except those named in ``skip``."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.split(".")[-1] not in skip and n not in skip}


@dataclass
class PruneReport:
    """What ``magnitude_prune`` did: the asked and the measured sparsity."""

    target: float  # asked fraction of zeros in the target weights
    scope: str
    matrices: int
    weights: int  # entries in the target matrices
    zeros: int  # zero entries in them afterwards
    threshold: float | None  # global magnitude threshold (scope="global")

    @property
    def sparsity(self) -> float:
        """Measured fraction of zeros in the target matrices."""
        return self.zeros / max(self.weights, 1)


@torch.no_grad()
def magnitude_prune(model: nn.Module, sparsity: float, scope: Literal["global", "layer"] = "global",
                    skip: Sequence[str] = SKIP) -> PruneReport:
    """Zero the ``sparsity`` fraction of smallest-|w| entries of the linear weights, in place.

    ``global``: one threshold (the k-th smallest |w| over all target matrices together);
    ``layer``: each matrix loses the same fraction. Shapes and dtypes do not change.
    """
    _check_fraction("sparsity", sparsity)
    if scope not in ("global", "layer"):
        raise PruningError(f"pruning scope must be 'global' or 'layer', got {scope!r}")
    layers = prunable_linears(model, skip)
    if not layers:
        raise PruningError("the model has no nn.Linear layers to prune")
    weights = [m.weight for m in layers.values()]
    total = sum(w.numel() for w in weights)
    threshold = None
    if sparsity > 0 and scope == "global":
        k = int(round(sparsity * total))
        flat = torch.cat([w.detach().abs().flatten().float() for w in weights])
        threshold = float(flat.kthvalue(max(k, 1)).values)
        del flat
        for w in weights:
            w.masked_fill_(w.abs() <= threshold, 0)
    elif sparsity > 0:
        for w in weights:
            k = int(round(sparsity * w.numel()))
            if k:
                t = w.detach().abs().flatten().float().kthvalue(k).values
                w.masked_fill_(w.abs() <= t, 0)
    zeros = sum(int((w == 0).sum()) for w in weights)
    rep = PruneReport(sparsity, scope, len(weights), total, zeros, threshold)
    log.info("magnitude pruning (%s): asked %.1f%%, got %.2f%% zeros in %d matrices",
             scope, 100 * sparsity, 100 * rep.sparsity, rep.matrices)
    return rep


def weight_sparsity(model: nn.Module, skip: Sequence[str] = SKIP) -> float:
    """Fraction of exactly-zero entries in the prunable linear weights."""
    weights = [m.weight for m in prunable_linears(model, skip).values()]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / max(total, 1)


def csr_bytes(model: nn.Module, index_bytes: int = 4, skip: Sequence[str] = SKIP) -> int:
    """Bytes the model's tensors would take with the prunable weights in CSR form (non-zero values
    + one column index each + one row pointer per row) and everything else dense. Compare with
    ``evals.speed.model_bytes``: CSR only wins above ~``index_bytes / (value + index bytes)``
    sparsity (fp32 + int32 indices: 50 %)."""
    from ..evals.speed import model_bytes

    total = model_bytes(model)
    for m in prunable_linears(model, skip).values():
        w = m.weight
        nnz = int((w != 0).sum())
        total += nnz * (w.element_size() + index_bytes) + (w.shape[0] + 1) * index_bytes
        total -= w.numel() * w.element_size()
    return total


# --------------------------------------------------------------------------- structured (MLP)

def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a causal LM (``model.model.layers`` for Llama)."""
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(dec, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise PruningError(f"{type(model).__name__}: cannot find the decoder's layer list")
    return layers


def _gated_mlps(model: nn.Module) -> list[nn.Module]:
    mlps = []
    for i, layer in enumerate(decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not all(isinstance(getattr(mlp, p, None), nn.Linear)
                                  for p in ("gate_proj", "up_proj", "down_proj")):
            raise PruningError(
                f"{type(model).__name__} layer {i}: structured MLP pruning needs a gated MLP with "
                "gate_proj / up_proj / down_proj linears (Llama-style)")
        mlps.append(mlp)
    return mlps


@torch.no_grad()
def mlp_channel_scores(model: nn.Module, method: Literal["weight", "activation"] = "activation",
                       calib: Iterable[Sequence[int]] | None = None) -> list[torch.Tensor]:
    """One importance score per intermediate neuron, per layer (higher = keep).

    ``weight``: ||gate_i|| · ||up_i|| · ||down_:,i|| (no data needed).
    ``activation``: mean over the ``calib`` token windows of |h_i| · ||down_:,i||, where
    ``h = act(gate x) * up x`` is what ``down_proj`` receives.
    """
    mlps = _gated_mlps(model)
    down_norm = [m.down_proj.weight.float().norm(dim=0) for m in mlps]
    if method == "weight":
        return [m.gate_proj.weight.float().norm(dim=1) * m.up_proj.weight.float().norm(dim=1) * d
                for m, d in zip(mlps, down_norm)]
    if method != "activation":
        raise PruningError(f"unknown channel score {method!r}; use 'weight' or 'activation'")
    windows = [list(w) for w in (calib or [])]
    if not windows:
        raise PruningError("activation scores need calibration token windows (calib=...)")
    sums = [torch.zeros_like(d) for d in down_norm]
    count = 0

    def hook(i):
        def pre(module, args):
            sums[i].add_(args[0].detach().float().abs().flatten(0, -2).sum(0))
        return pre

    handles = [m.down_proj.register_forward_pre_hook(hook(i)) for i, m in enumerate(mlps)]
    was_training = model.training
    model.eval()
    try:
        dev = next(model.parameters()).device
        for w in windows:
            model(input_ids=torch.tensor([w], device=dev), use_cache=False)
            count += len(w)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [s / max(count, 1) * d for s, d in zip(sums, down_norm)]


def _sliced_linear(old: nn.Linear, idx: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear with rows (dim=0: output features) or columns (dim=1) ``idx`` of ``old``."""
    w = old.weight.index_select(dim, idx)
    new = nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None,
                    device=w.device, dtype=w.dtype)
    new.weight.copy_(w)
    if old.bias is not None:
        new.bias.copy_(old.bias if dim == 1 else old.bias.index_select(0, idx))
    new.weight.requires_grad_(old.weight.requires_grad)
    return new


@dataclass
class StructuredReport:
    """What ``prune_mlp_channels`` did."""

    fraction: float  # asked fraction of intermediate neurons to remove
    method: str
    intermediate_before: int
    intermediate_after: int
    params_before: int
    params_after: int

    @property
    def removed_fraction(self) -> float:
        return 1 - self.intermediate_after / self.intermediate_before

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before


@torch.no_grad()
def prune_mlp_channels(model: nn.Module, fraction: float,
                       scores: list[torch.Tensor] | None = None, multiple_of: int = 8,
                       method: str = "weight") -> StructuredReport:
    """Remove ``fraction`` of every MLP block's intermediate neurons (the lowest-scoring ones of
    each layer), rebuilding gate/up/down smaller and setting ``config.intermediate_size``, in place.

    Every layer keeps the same number of neurons (rounded down to ``multiple_of``, at least
    ``multiple_of``) so the config still describes the model and ``save_pretrained`` /
    ``from_pretrained`` round-trip. ``scores`` default to ``mlp_channel_scores(model, "weight")``;
    ``method`` only labels the report.
    """
    _check_fraction("fraction", fraction)
    mlps = _gated_mlps(model)
    before_i = mlps[0].gate_proj.out_features
    if any(m.gate_proj.out_features != before_i for m in mlps):
        raise PruningError("the MLP blocks have different widths; prune a uniform model")
    keep = int(before_i * (1 - fraction)) // multiple_of * multiple_of
    keep = max(min(keep, before_i), min(multiple_of, before_i))
    if scores is None:
        scores = mlp_channel_scores(model, "weight")
    if len(scores) != len(mlps) or any(s.numel() != before_i for s in scores):
        raise PruningError(f"need {len(mlps)} score vectors of length {before_i}")
    params_before = sum(p.numel() for p in model.parameters())
    for mlp, s in zip(mlps, scores):
        idx = s.topk(keep).indices.sort().values.to(mlp.gate_proj.weight.device)
        mlp.gate_proj = _sliced_linear(mlp.gate_proj, idx, 0)
        mlp.up_proj = _sliced_linear(mlp.up_proj, idx, 0)
        mlp.down_proj = _sliced_linear(mlp.down_proj, idx, 1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = keep
    model.config.intermediate_size = keep
    rep = StructuredReport(fraction, method, before_i, keep, params_before,
                           sum(p.numel() for p in model.parameters()))
    log.info("structured MLP pruning: %d -> %d neurons per layer, %.1fM -> %.1fM parameters",
             before_i, keep, params_before / 1e6, rep.params_after / 1e6)
    return rep
