"""QLoRA's storage format built from its definition, plus the memory side of QLoRA training.

QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314) stores the frozen base weights as
**NF4** (4-bit NormalFloat): each block of 64 weights is divided by its absolute maximum and
every value is rounded to the nearest of 16 levels that are quantiles of N(0, 1). The fp32 block
scales are then quantised once more (**double quantisation**: 8 bits, blocks of 256, mean
subtracted), and training uses **paged optimisers** and gradient checkpointing to survive memory
spikes. This module rebuilds each piece with plain torch so it can be checked against
bitsandbytes:

- ``nf4_codebook()`` / ``fp4_codebook()`` / ``int4_codebook()`` / ``int8_codebook()``: level tables.
- ``quantize_blockwise`` / ``BlockQuant.dequantize``: block-wise absmax + nearest-level rounding.
- ``double_quantize`` / ``scale_storage_bytes``: scale compression and its exact byte count.
- ``compare_with_bnb``: our codes and values vs ``bitsandbytes.functional.quantize_4bit``.
- ``error_metrics``: MSE, relative error and SQNR of dequantised vs original weights.
- ``optimizer_state_bytes`` / ``measure_optimizers``: optimiser-state bytes after one real step.
- ``measure_grad_checkpointing``: peak memory and step time of forward+backward with/without it.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from ..errors import LlmtechError

log = logging.getLogger(__name__)

BLOCKSIZE = 64           # QLoRA / bitsandbytes default block for the 4-bit weights
DQ_BLOCKSIZE = 256       # block of the second (scale) quantisation
METHODS = ("nf4", "fp4", "int4", "int8")
CODE_BITS = {"nf4": 4, "fp4": 4, "int4": 4, "int8": 8}


class QuantizationError(LlmtechError):
    """Bad input to the block quantiser (block size, codebook, method name)."""


# --------------------------------------------------------------------------- codebooks

def nf4_offset(bits: int = 4) -> float:
    """Probability of the outermost NF level: mean of ``1 - 1/(2(2^k-1))`` and ``1 - 1/(2*2^k)``.

    ``norm.ppf(1)`` is infinite, so the extreme level needs a probability below 1. For k=4 this
    is (1 - 1/30 + 1 - 1/32) / 2 = 0.96770833..., bitsandbytes' constant 0.9677083 to 7 places.
    """
    n = 2 ** bits
    return 0.5 * ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n)))


def normal_float_levels(bits: int = 4, offset: float | None = None) -> np.ndarray:
    """The 2^k NormalFloat levels in float64, sorted, normalised to [-1, 1], with an exact 0.

    Asymmetric construction of the QLoRA paper: 2^(k-1) positive quantiles of N(0, 1) at
    probabilities evenly spaced in (0.5, offset], 2^(k-1) - 1 negative ones at probabilities
    evenly spaced in (0.5, offset] (mirrored), plus 0; divided by the largest so both ends are +-1.
    """
    from scipy.stats import norm

    if bits < 2:
        raise QuantizationError(f"NormalFloat needs at least 2 bits, got bits={bits}")
    off = nf4_offset(bits) if offset is None else float(offset)
    if not 0.5 < off < 1.0:
        raise QuantizationError(f"NormalFloat offset must lie in (0.5, 1), got {off}")
    half = 2 ** (bits - 1)
    pos = norm.ppf(np.linspace(off, 0.5, half + 1)[:-1])     # 8 positive levels (k=4)
    neg = -norm.ppf(np.linspace(off, 0.5, half)[:-1])        # 7 negative levels
    levels = np.sort(np.concatenate([neg, [0.0], pos]))
    return levels / levels.max()


def nf4_codebook(offset: float | None = None) -> torch.Tensor:
    """NF4's 16 levels (float32, ascending) from the definition (``normal_float_levels``)."""
    return torch.tensor(normal_float_levels(4, offset), dtype=torch.float32)


def bnb_codebook(name: str) -> torch.Tensor:
    """bitsandbytes' own 4-bit table (``get_4bit_type``), ascending; 'nf4' or 'fp4'."""
    from bitsandbytes.functional import get_4bit_type

    return get_4bit_type(name, device="cpu").float().sort().values


def fp4_codebook() -> torch.Tensor:
    """bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit) levels, ascending, max 1.

    +0 and -0 both appear, so FP4 has 15 distinct values."""
    return bnb_codebook("fp4")


def int4_codebook() -> torch.Tensor:
    """Uniform symmetric int4: the 15 levels -7..7 divided by 7 (code -8 is unused)."""
    return torch.arange(-7, 8, dtype=torch.float32) / 7


def int8_codebook() -> torch.Tensor:
    """Uniform symmetric int8 (absmax): the 255 levels -127..127 divided by 127."""
    return torch.arange(-127, 128, dtype=torch.float32) / 127


def dynamic_codebook() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic-tree map (its 8-bit 'float' for scales and optimiser
    states), ascending, 256 values."""
    from bitsandbytes.functional import create_dynamic_map

    return create_dynamic_map(signed=True).float().sort().values


def codebook(method: str) -> torch.Tensor:
    """Level table of a method in ``METHODS``."""
    makers: dict[str, Callable[[], torch.Tensor]] = {
        "nf4": nf4_codebook, "fp4": fp4_codebook, "int4": int4_codebook, "int8": int8_codebook}
    if method not in makers:
        raise QuantizationError(f"unknown quantisation method '{method}'; choose from {METHODS}")
    return makers[method]()


# --------------------------------------------------------------------------- block-wise quantiser

@dataclass
class BlockQuant:
    """A tensor stored as codes (indices into ``code``) + one fp32 absmax per block."""

    codes: torch.Tensor      # uint8, flat, one index per weight
    absmax: torch.Tensor     # float32, one per block (last block may be partial)
    code: torch.Tensor       # ascending level table in [-1, 1]
    blocksize: int
    shape: tuple[int, ...]
    code_bits: int

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))

    def dequantize(self, absmax: torch.Tensor | None = None) -> torch.Tensor:
        """Weights back in fp32: level[code] * absmax of the block (``absmax`` overrides, e.g.
        the double-quantised scales)."""
        scales = self.absmax if absmax is None else absmax
        n, b = self.numel, self.blocksize
        vals = self.code[self.codes.long()]
        pad = (-n) % b
        if pad:
            vals = torch.nn.functional.pad(vals, (0, pad))
        return (vals.view(-1, b) * scales.view(-1, 1)).reshape(-1)[:n].view(self.shape)

    def weight_bytes(self) -> int:
        """Bytes of the packed codes (4-bit codes: two per byte)."""
        return math.ceil(self.numel * self.code_bits / 8)

    def scale_bytes(self) -> int:
        return self.absmax.numel() * self.absmax.element_size()


def quantize_blockwise(w: torch.Tensor, code: torch.Tensor, blocksize: int = BLOCKSIZE,
                       code_bits: int | None = None) -> BlockQuant:
    """Block-wise absmax quantisation with nearest-level rounding.

    The flattened tensor is cut into blocks of ``blocksize`` values (the last one may be
    shorter); each block is scaled by 1/absmax into [-1, 1] and every value takes the index of
    its nearest level in ``code`` (ties go to the lower level; the same arithmetic as
    bitsandbytes' reference kernel: multiply by the reciprocal, clamp, bucketize at midpoints).
    """
    if blocksize < 1:
        raise QuantizationError(f"blocksize must be a positive integer, got {blocksize}")
    code = code.float().flatten()
    if code.numel() < 2 or code.numel() > 256 or bool((code.diff() < 0).any()):
        raise QuantizationError("code must be an ascending table of 2..256 levels")
    bits = code_bits if code_bits is not None else max(1, math.ceil(math.log2(code.numel())))
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    if n == 0:
        raise QuantizationError("cannot quantise an empty tensor")
    pad = (-n) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)  # zeros leave absmax as is
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1)
    bounds = (code[:-1] + code[1:]) / 2
    codes = torch.bucketize(scaled.reshape(-1)[:n], bounds).to(torch.uint8)
    return BlockQuant(codes, absmax, code, blocksize, tuple(w.shape), bits)


def quantize(w: torch.Tensor, method: str, blocksize: int = BLOCKSIZE) -> BlockQuant:
    """``quantize_blockwise`` with the level table of ``method`` (nf4 / fp4 / int4 / int8)."""
    return quantize_blockwise(w, codebook(method), blocksize, CODE_BITS.get(method))


# --------------------------------------------------------------------------- double quantisation

@dataclass
class DoubleQuant:
    """The fp32 block scales stored as 8-bit codes in blocks of 256, after subtracting the mean."""

    inner: BlockQuant        # 8-bit codes of (absmax - offset) + one fp32 absmax per 256 scales
    offset: float            # mean of the original scales (one fp32 per tensor)

    def dequantize(self) -> torch.Tensor:
        return self.inner.dequantize() + self.offset

    def nbytes(self) -> int:
        """8-bit codes + second-level fp32 absmax + the fp32 offset (the shared 256-entry code
        table is not counted: one per program, not per tensor)."""
        return self.inner.weight_bytes() + self.inner.scale_bytes() + 4


def double_quantize(absmax: torch.Tensor, blocksize: int = DQ_BLOCKSIZE,
                    code: torch.Tensor | None = None) -> DoubleQuant:
    """Quantise the first-level scales: subtract their mean (scales are all positive, so this
    centres them and uses the signed 8-bit range), then 8-bit block-wise absmax quantisation.
    ``code`` defaults to bitsandbytes' dynamic map (the paper's 8-bit float for the scales)."""
    offset = absmax.float().mean()
    table = dynamic_codebook() if code is None else code
    inner = quantize_blockwise(absmax.float() - offset, table, blocksize, code_bits=8)
    return DoubleQuant(inner, float(offset))


def scale_storage_bytes(numel: int, blocksize: int = BLOCKSIZE, double_quant: bool = False,
                        dq_blocksize: int = DQ_BLOCKSIZE) -> int:
    """Bytes of the block scales of one tensor with ``numel`` weights (what ``BlockQuant`` /
    ``DoubleQuant`` hold): fp32 per block, or 8 bits per block + fp32 per 256 blocks + the fp32
    offset."""
    blocks = math.ceil(numel / blocksize)
    if not double_quant:
        return 4 * blocks
    return blocks + 4 * math.ceil(blocks / dq_blocksize) + 4


def bits_per_param(scale_bytes: int, numel: int) -> float:
    return 8 * scale_bytes / numel


# --------------------------------------------------------------------------- errors + bnb parity

def error_sums(w: torch.Tensor, w_hat: torch.Tensor) -> tuple[float, float, int]:
    """(sum of squared error, sum of squared weights, count) in float64, for aggregating."""
    w64, e = w.detach().double(), (w_hat.detach().double() - w.detach().double())
    return float((e * e).sum()), float((w64 * w64).sum()), w.numel()


def metrics_from_sums(sse: float, ssw: float, n: int) -> dict[str, float]:
    """MSE, relative error ||w - w_hat|| / ||w|| and SQNR = 10 log10(sum w^2 / sum err^2) dB."""
    return {"mse": sse / n, "rel_error": math.sqrt(sse / ssw) if ssw else float("nan"),
            "sqnr_db": 10 * math.log10(ssw / sse) if sse > 0 else float("inf")}


def error_metrics(w: torch.Tensor, w_hat: torch.Tensor) -> dict[str, float]:
    return metrics_from_sums(*error_sums(w, w_hat))


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """bitsandbytes' packed uint8 (first value in the high nibble) -> n codes."""
    p = packed.reshape(-1).view(torch.uint8) if packed.dtype != torch.uint8 else packed.reshape(-1)
    out = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)
    return out[:n]


def _nearer_or_equal(x: torch.Tensor, code: torch.Tensor, ours: torch.Tensor,
                     theirs: torch.Tensor) -> bool:
    """Is our chosen level never farther from ``x`` than theirs (float64)?"""
    x64, c64 = x.double(), code.double()
    return bool(((x64 - c64[ours.long()]).abs() <= (x64 - c64[theirs.long()]).abs() + 1e-12).all())


def compare_with_bnb(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = BLOCKSIZE,
                     double_quant: bool = False,
                     code: torch.Tensor | None = None) -> dict[str, float]:
    """Quantise ``w`` with this module and with ``bitsandbytes.functional.quantize_4bit``.

    ``code`` overrides our level table (default: NF4 built from its definition, bnb's FP4).
    Returns the share and count of 4-bit codes that pick the same level, how far the
    disagreeing values (w / block absmax) sit from the nearest rounding boundary (a midpoint
    between two levels), the max |difference| of the dequantised weights (all of them, and
    where the codes agree: float rounding only),
    and with ``double_quant`` the same for the 8-bit scale codes plus the max relative scale
    difference and whether our scale level is never farther from the true scale than bnb's.
    """
    import bitsandbytes.functional as bf

    if quant_type not in ("nf4", "fp4"):
        raise QuantizationError(f"bitsandbytes 4-bit types are nf4 and fp4, got '{quant_type}'")
    ours_code = code if code is not None else codebook(quant_type)
    ours = quantize_blockwise(w, ours_code, blocksize, 4)
    packed, state = bf.quantize_4bit(w.detach().float().contiguous(), blocksize=blocksize,
                                     compress_statistics=double_quant, quant_type=quant_type)
    theirs = bf.dequantize_4bit(packed, state).float().reshape(-1)
    # bnb's 4-bit code is an index into its own table (bit-pattern order for FP4): map it to the
    # level's rank so it compares with our index into an ascending table
    rank = torch.empty(16, dtype=torch.long)
    rank[torch.argsort(state.code.float(), stable=True)] = torch.arange(16)
    bnb_codes = unpack_4bit(packed, w.numel()).long()
    if quant_type == "fp4":  # +0 and -0 are two codes for one value: compare values there
        same = ours_code[ours.codes.long()] == state.code.float()[bnb_codes]
    else:
        same = ours.codes.long() == rank[bnb_codes]
    out = {"numel": w.numel(), "code_agreement": float(same.float().mean()),
           "code_mismatches": int((~same).sum()), "mismatch_max_midpoint_distance": 0.0}
    if out["code_mismatches"]:  # how close to a rounding boundary the disagreeing values sit
        idx = (~same).nonzero().flatten()
        x = w.detach().reshape(-1).float()[idx] * (
            1.0 / ours.absmax.clamp(min=1e-38))[idx // blocksize]
        bounds = (ours_code[:-1] + ours_code[1:]) / 2
        out["mismatch_max_midpoint_distance"] = float(
            (x.double().unsqueeze(1) - bounds.double()).abs().min(dim=1).values.max())
    scales = ours.absmax
    if double_quant:
        dq = double_quantize(ours.absmax)
        scales = dq.dequantize()
        bnb_scale_codes = state.absmax.reshape(-1)
        bnb_scales = bf.dequantize_blockwise(state.absmax, state.state2).float() + state.offset
        s_same = dq.inner.codes == bnb_scale_codes
        shifted = (ours.absmax - dq.offset) / torch.repeat_interleave(
            dq.inner.absmax, DQ_BLOCKSIZE)[: ours.absmax.numel()]
        out.update(scale_code_agreement=float(s_same.float().mean()),
                   scale_code_mismatches=int((~s_same).sum()),
                   scale_max_rel_diff=float(((scales - bnb_scales) / bnb_scales).abs().max()),
                   scale_ours_never_farther=_nearer_or_equal(
                       shifted, dq.inner.code, dq.inner.codes, bnb_scale_codes))
    mine = ours.dequantize(scales).reshape(-1)
    diff = (mine - theirs).abs()
    both = same if not double_quant else same & torch.repeat_interleave(
        s_same, blocksize)[: w.numel()]
    out.update(dequant_max_abs_diff=float(diff.max()),
               dequant_max_abs_diff_same_codes=float(diff[both].max()) if bool(both.any()) else 0.0)
    return out


# --------------------------------------------------------------------------- whole-model helpers

def linear_weights(model, skip: Iterable[str] = ("lm_head",),
                   limit: int | None = None) -> dict[str, torch.Tensor]:
    """Name -> weight of every ``nn.Linear`` (QLoRA quantises these; the head stays 16-bit);
    ``limit`` keeps the first N in module order."""
    if limit is not None and limit < 1:
        raise QuantizationError(f"max_tensors must be at least 1 (or None for all), got {limit}")
    skip = tuple(skip)
    found = [(f"{n}.weight", m.weight) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and not any(s in n for s in skip)]
    if not found:
        raise QuantizationError(f"{type(model).__name__} has no nn.Linear layers to quantise")
    return dict(found[:limit])


def bnb_agreement(weights: dict[str, torch.Tensor], quant_type: str = "nf4",
                  blocksize: int = BLOCKSIZE, double_quant: bool = False,
                  code: torch.Tensor | None = None) -> dict[str, float]:
    """``compare_with_bnb`` over many tensors: mismatch counts summed, max differences maxed,
    agreement shares weighted by count; ``scale_ours_never_farther`` must hold for every tensor."""
    agg: dict[str, float] = {}
    n = n_scales = 0
    for w in weights.values():
        r = compare_with_bnb(w, quant_type, blocksize, double_quant, code)
        n += r["numel"]
        n_scales += math.ceil(r["numel"] / blocksize)
        for k, v in r.items():
            if k.endswith("mismatches") or k == "numel":
                agg[k] = agg.get(k, 0) + v
            elif k == "scale_ours_never_farther":
                agg[k] = agg.get(k, True) and v
            elif k.startswith(("dequant_", "scale_max", "mismatch_max")):
                agg[k] = max(agg.get(k, 0.0), v)
    agg["code_agreement"] = 1 - agg["code_mismatches"] / n
    if double_quant:
        agg["scales"] = n_scales
        agg["scale_code_agreement"] = 1 - agg["scale_code_mismatches"] / n_scales
    return agg


def error_table(weights: dict[str, torch.Tensor], methods: Iterable[str] = METHODS,
                blocksize: int = BLOCKSIZE, double_quant_nf4: bool = True) -> dict[str, dict]:
    """Method -> MSE / relative error / SQNR over all ``weights`` together, plus the storage
    cost in bits per weight (codes + fp32 block scales). With ``double_quant_nf4`` a row
    ``nf4+dq`` dequantises NF4 with the double-quantised scales."""
    rows: dict[str, dict] = {}
    names = list(methods) + (["nf4+dq"] if double_quant_nf4 else [])
    for name in names:
        sums, scale_b, code_b, n = [0.0, 0.0, 0], 0, 0, 0
        for w in weights.values():
            q = quantize(w, name.split("+")[0], blocksize)
            if name.endswith("+dq"):
                dq = double_quantize(q.absmax)
                w_hat, sb = q.dequantize(dq.dequantize()), dq.nbytes()
            else:
                w_hat, sb = q.dequantize(), q.scale_bytes()
            sums = [a + b for a, b in zip(sums, error_sums(w, w_hat))]
            scale_b, code_b, n = scale_b + sb, code_b + q.weight_bytes(), n + q.numel
        rows[name] = {**metrics_from_sums(*sums), "bits_per_param": 8 * (code_b + scale_b) / n}
    return rows


def scale_bytes_report(weights: dict[str, torch.Tensor], blocksize: int = BLOCKSIZE,
                       dq_blocksize: int = DQ_BLOCKSIZE) -> dict[str, float]:
    """Scale storage of NF4 over ``weights``, measured from the quantised tensors, without and
    with double quantisation, and the same from ``scale_storage_bytes`` (they must agree)."""
    n = plain = dq = predicted_plain = predicted_dq = 0
    for w in weights.values():
        q = quantize(w, "nf4", blocksize)
        n += q.numel
        plain += q.scale_bytes()
        dq += double_quantize(q.absmax, dq_blocksize).nbytes()
        predicted_plain += scale_storage_bytes(q.numel, blocksize)
        predicted_dq += scale_storage_bytes(q.numel, blocksize, True, dq_blocksize)
    return {"params": n, "scale_bytes": plain, "scale_bytes_dq": dq,
            "bits_per_param": bits_per_param(plain, n), "bits_per_param_dq": bits_per_param(dq, n),
            "formula_matches": plain == predicted_plain and dq == predicted_dq}


def block_normalised(w: torch.Tensor, blocksize: int = BLOCKSIZE) -> torch.Tensor:
    """Weights divided by their block's absmax (what the 4-bit levels have to cover)."""
    flat = w.detach().reshape(-1).float()
    flat = flat[: flat.numel() - flat.numel() % blocksize].view(-1, blocksize)
    return (flat / flat.abs().amax(dim=1, keepdim=True).clamp(min=1e-38)).reshape(-1)


def linear_numels(config) -> list[int]:
    """Weight counts of the linear layers a model built from ``config`` would have (lm_head
    excluded), from a meta-device instance: no memory is allocated."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [w.numel() for w in linear_weights(model).values()]


def llama7b_config():
    """LLaMA-7B's published shape (Touvron et al. 2023): 32 layers, hidden 4096, MLP 11008,
    32 heads, vocabulary 32000."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       tie_word_embeddings=False)


# --------------------------------------------------------------------------- optimiser state

def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Sum of the bytes of every tensor in the optimiser's state (moments, 8-bit absmax, maps,
    step counters)."""
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if torch.is_tensor(v))


def paged_tensor_count(opt: torch.optim.Optimizer) -> int:
    """State tensors that live in CUDA unified (paged) memory."""
    return sum(bool(getattr(v, "is_paged", False)) for st in opt.state.values()
               for v in st.values() if torch.is_tensor(v))


OPTIMIZERS = ("torch.AdamW", "bnb.AdamW", "bnb.AdamW8bit", "bnb.PagedAdamW", "bnb.PagedAdamW8bit")


def make_optimizer(name: str, params, lr: float = 1e-5):
    if name == "torch.AdamW":
        return torch.optim.AdamW(params, lr=lr)
    if not name.startswith("bnb.") or name not in OPTIMIZERS:
        raise QuantizationError(f"unknown optimiser '{name}'; choose from {OPTIMIZERS}")
    import bitsandbytes as bnb

    return getattr(bnb.optim, name[4:])(params, lr=lr)


@dataclass
class OptimizerResult:
    name: str
    state_bytes: int
    step_s: float
    paged_tensors: int
    status: str              # "ok", a bitsandbytes warning (e.g. paging unsupported) or an error
    max_param_change: float  # |delta p| after the step: proof the step really updated the weights

    def paging(self, device: str) -> str:
        """One line saying whether the state really lives in paged (CUDA unified) memory."""
        if self.paged_tensors:
            return f"paged: {self.paged_tensors} state tensors in CUDA unified memory"
        return f"not paged on {device}: {self.status}"


def measure_optimizers(params: list[torch.nn.Parameter], names: Iterable[str] = OPTIMIZERS,
                       lr: float = 1e-5) -> list[OptimizerResult]:
    """One real ``step()`` of each optimiser on the same parameters and the same gradients
    (``p.grad`` must already hold them); parameters are restored after each step."""
    params = [p for p in params if p.grad is not None]
    if not params:
        raise QuantizationError("no parameter has a gradient: run backward() before measuring")
    saved = [p.detach().clone() for p in params]
    out = []
    for name in names:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                opt = make_optimizer(name, params, lr)
                t0 = time.perf_counter()
                opt.step()
                dt = time.perf_counter() - t0
            msgs = sorted({str(w.message) for w in caught if "aged" in str(w.message)})
            change = max(float((p.detach() - s).abs().max()) for p, s in zip(params, saved))
            out.append(OptimizerResult(name, optimizer_state_bytes(opt), dt,
                                       paged_tensor_count(opt), "; ".join(msgs) or "ok", change))
            del opt
        except (RuntimeError, NotImplementedError, AttributeError, OSError) as e:
            log.warning("optimiser %s failed: %s", name, e)
            out.append(OptimizerResult(name, 0, float("nan"), 0, f"failed: {e}", 0.0))
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    return out


def train_device(name: str = "auto") -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; 'cuda' without a GPU is an error."""
    if name not in ("auto", "cpu", "cuda"):
        raise QuantizationError(f"device must be auto, cpu or cuda, got '{name}'")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise QuantizationError("device=cuda but torch sees no CUDA GPU on this machine")
    return name


def text_batch(tokenizer, texts: Iterable[str], batch_size: int, seq_len: int) -> torch.Tensor:
    """A ``[batch_size, seq_len]`` batch of real token ids: the texts' tokens laid end to end."""
    if batch_size < 1 or seq_len < 2:
        raise QuantizationError(f"batch needs batch_size >= 1 and seq_len >= 2, got "
                                f"{batch_size} x {seq_len}")
    ids: list[int] = []
    need = batch_size * seq_len
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"]
        if len(ids) >= need:
            return torch.tensor(ids[:need]).view(batch_size, seq_len)
    raise QuantizationError(f"the texts hold {len(ids)} tokens; a {batch_size} x {seq_len} batch "
                            f"needs {need}: lower batch_size or seq_len")


# --------------------------------------------------------------------------- gradient checkpointing

@dataclass
class StepCost:
    checkpointing: bool
    peak_bytes: int     # peak RSS (CPU) / peak allocated (CUDA) above the level before the step
    step_s: float       # median forward+backward time
    loss: float


def measure_grad_checkpointing(model, input_ids: torch.Tensor, repeats: int = 2) -> list[StepCost]:
    """Forward+backward of the same batch without and with gradient checkpointing.

    Peak memory is measured around the first timed step (VmHWM on Linux CPUs via
    ``evals.speed.MemoryMeter``; ``torch.cuda.max_memory_allocated`` on a GPU); gradients are
    dropped between steps so both runs start from the same state. One untimed warm-up step each.
    """
    from ..evals import speed

    if repeats < 1:
        raise QuantizationError(f"repeats must be >= 1, got {repeats}")
    cuda = input_ids.is_cuda
    model.config.use_cache = False
    model.train()
    out = []
    for ckpt in (False, True):
        _set_checkpointing(model, ckpt)

        def step() -> float:
            loss = model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            value = float(loss.detach())
            model.zero_grad(set_to_none=True)
            return value

        step()  # warm-up: first-call allocations and kernel selection
        times, peak, loss = [], 0, float("nan")
        for i in range(repeats):
            speed.release_memory()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            if i == 0 and not cuda:
                with speed.MemoryMeter() as meter:
                    loss = step()
                peak = meter.peak_delta
            else:
                loss = step()
            if cuda:
                torch.cuda.synchronize()
                if i == 0:
                    peak = torch.cuda.max_memory_allocated() - base
            times.append(time.perf_counter() - t0)
        out.append(StepCost(ckpt, int(peak), float(np.median(times)), loss))
    _set_checkpointing(model, False)
    model.eval()
    return out


def _set_checkpointing(model, on: bool) -> None:
    """transformers >= 5.x names it activation checkpointing; older releases gradient_."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
