"""Load a causal LM with its linear layers quantised by bitsandbytes (the QLoRA storage format).

``load_quantized(model_id, bits=4)`` returns ``(model, tokenizer)`` where every ``nn.Linear``
except the output head is a ``bitsandbytes.nn.Linear4bit`` (NF4 or FP4 blocks of 64 weights with
one absmax scale each, optionally double-quantised) or ``Linear8bitLt`` (LLM.int8()). Weights are
stored in 4 or 8 bits; matmuls run in ``compute_dtype`` after on-the-fly dequantisation.
bitsandbytes 0.50 runs both on the CPU (checked on this machine) as well as on CUDA GPUs.

The same call serves the real model (``smollm2-135m``, ``hf:...``, ``ms:...``, a folder) and the
random ``tiny-llama`` used by tests (built, saved once under the cache dir, then loaded).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch

from .. import models
from ..errors import LlmtechError

log = logging.getLogger(__name__)

BACKEND = "bitsandbytes"
# what bitsandbytes' transformers integration can store: bits -> quantisation types
SUPPORTED: dict[int, tuple[str, ...]] = {4: ("nf4", "fp4"), 8: ("int8",)}
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


class QuantizationUnsupported(LlmtechError):
    """The requested bit width / quantisation type is not something the backend can do."""


def check_request(bits: int, quant_type: str | None = None, compute_dtype: str = "bfloat16") -> str:
    """Validate a (bits, quant_type, compute_dtype) request; return the quant type to use."""
    if bits not in SUPPORTED:
        can = ", ".join(f"{b}-bit ({'/'.join(t)})" for b, t in SUPPORTED.items())
        raise QuantizationUnsupported(
            f"{BACKEND} cannot store weights in {bits} bits; it supports {can}")
    qt = (quant_type or SUPPORTED[bits][0]).lower()
    if qt not in SUPPORTED[bits]:
        raise QuantizationUnsupported(
            f"{BACKEND} has no {bits}-bit quantisation type '{quant_type}'; {bits}-bit supports "
            f"{', '.join(SUPPORTED[bits])}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise QuantizationUnsupported(
            f"compute dtype '{compute_dtype}' is not one of {', '.join(COMPUTE_DTYPES)}")
    return qt


def bnb_config(bits: int = 4, quant_type: str | None = None, double_quant: bool = True,
               compute_dtype: str = "bfloat16"):
    """The ``transformers.BitsAndBytesConfig`` for a validated request."""
    from transformers import BitsAndBytesConfig

    qt = check_request(bits, quant_type, compute_dtype)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=qt,
                              bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, compute_dtype))


class _Once(logging.Filter):
    """Let each distinct message through once."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


_ONCE = _Once()


def quiet_bnb_logs() -> None:
    """bitsandbytes' LLM.int8() warns 'inputs will be cast ... to float16' on every matmul (thousands
    of lines per generation): once is enough."""
    lg = logging.getLogger("bitsandbytes.autograd._functions")
    if _ONCE not in lg.filters:
        lg.addFilter(_ONCE)


@torch.no_grad()
def own_float_weights(model) -> None:
    """Copy the plain float tensors a bitsandbytes model still maps from its safetensors file.

    8-bit loading keeps e.g. the fp32 embedding as a view of the file, which keeps all the file's
    pages mapped and counted in RSS (~0.5 GB for the bundled model); the quantised parameters are
    already the process's own and are left alone."""
    for t in list(model.parameters()) + list(model.buffers()):
        if type(t) in (torch.Tensor, torch.nn.Parameter) and t.is_floating_point():
            t.data = t.data.clone()


def _model_folder(model_id: str, seed: int) -> Path:
    """A folder with config.json + weights for ``model_id`` (tiny-llama is saved once)."""
    spec = models.REGISTRY.get(model_id)
    if spec is None or spec.source != "tiny":
        path = models.resolve(model_id)
        if not (path / "config.json").exists():
            raise QuantizationUnsupported(
                f"{path}: {BACKEND} quantises safetensors/bin checkpoints with a config.json; "
                "a bare GGUF file is already quantised (run it with llama.cpp instead)")
        return path
    folder = models.cache_dir() / f"tiny-llama-seed{seed}"
    if not (folder / "config.json").exists():
        model, tok = models.load_lm(model_id, seed=seed)
        # a private temp folder per process: two processes saving at once never mix files
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.replace(folder)
        except OSError:  # another process saved it meanwhile (the target is a non-empty folder)
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_quantized(model_id: str = models.DEFAULT_LM, bits: int = 4, quant_type: str | None = None,
                   double_quant: bool = True, compute_dtype: str = "bfloat16", seed: int = 0,
                   trust_remote_code: bool | None = None):
    """``(model, tokenizer)`` with the linear layers stored in ``bits`` bits by bitsandbytes.

    Non-quantised parts (embeddings, norms, head) are kept in ``compute_dtype`` for 4-bit, fp32
    for 8-bit. ``device_map`` is the GPU when one is present, else the CPU.
    """
    from transformers import AutoModelForCausalLM

    qconf = bnb_config(bits, quant_type, double_quant, compute_dtype)
    tok = models.load_tokenizer(model_id, trust_remote_code)
    folder = _model_folder(model_id, seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, compute_dtype) if bits == 4 else torch.float32
    remote = models.trust_remote_code_for(model_id, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=qconf, dtype=dtype, device_map=device,
            **({"trust_remote_code": True} if remote else {}))
    except (ImportError, RuntimeError, ValueError) as e:
        raise QuantizationUnsupported(
            f"{BACKEND} could not load '{model_id}' in {bits} bits on {device}: {e}") from None
    quiet_bnb_logs()
    if device == "cpu":
        own_float_weights(model)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def quantized_linears(model) -> dict[str, str]:
    """Module name -> bitsandbytes layer class name, for every quantised linear layer."""
    import bitsandbytes as bnb

    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, kinds)}
