"""QLoRA: LoRA adapters trained on top of a frozen base whose linear layers are stored in 4 bits.

The recipe (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"):

1. load the base with bitsandbytes: every decoder ``nn.Linear`` becomes a ``Linear4bit`` holding
   NF4 codes in blocks of 64 with one absmax scale each, the scales themselves quantised to 8 bits
   ("double quantisation"); matmuls dequantise on the fly into ``compute_dtype`` (bf16);
2. ``peft.prepare_model_for_kbit_training``: freeze everything, cast the remaining float
   parameters (norms, embeddings, head) to fp32 for stable training, make the input embeddings
   emit tensors that require grad and switch gradient checkpointing on;
3. LoRA on *all* linear layers (the paper's finding: adapting only q/v loses quality under 4 bits);
4. paged AdamW (optimizer states in CUDA unified memory that pages to CPU RAM on memory spikes).

``run_qlora(QLoRASettings(...))`` does 1–3 and trains with the same SFT trainer as LoRA
(``llmtech.train.sft.run_sft``). It runs on a CUDA GPU and, with bitsandbytes 0.50, on the CPU.
Two things differ on the CPU and are handled here:

* paged optimizers need CUDA unified memory: on the CPU ``resolve_optim`` swaps in the unpaged
  optimizer of the same kind and says so;
* bitsandbytes 0.50.2 repacks a ``Linear4bit``'s weight into an AVX-512-BF16 inference layout
  the first time it runs in eval mode without grad (e.g. during an evaluation pass). The matmul
  on that layout has no backward for the input, so training steps taken afterwards silently get
  no gradient into the LoRA layers *below* it. ``keep_training_layout`` unpacks such weights and
  turns the repacking off for the model (the regular kernels are used for evaluation too).

``check_adapter_base`` compares a saved adapter's layer names and shapes with a base model before
loading, so an adapter put on the wrong base is a clear error instead of PEFT's shape dump or a
silent no-op; ``llmtech.train.adapters.load_adapters`` calls it too.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import ConfigError, DataError
from .lora import LoraSettings, lora_config
from .sft import SFTSettings

log = logging.getLogger(__name__)

PAGED_ON_CPU = {"paged_adamw_32bit": "adamw_torch", "paged_adamw_8bit": "adamw_bnb_8bit",
                "paged_adamw": "adamw_torch", "paged_lion_32bit": "lion_32bit",
                "paged_lion_8bit": "lion_8bit"}


class QLoRASettings(SFTSettings):
    """SFT settings plus the quantised base. Defaults are the QLoRA paper's recipe for a 7B model
    (r=64, alpha=16, dropout 0.1 on all linear layers, paged AdamW, checkpointing); labs and
    configs override what a small model or a CPU needs."""

    bits: Literal[4, 8] = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    optim: str | None = "paged_adamw_32bit"
    gradient_checkpointing: bool = True
    lora: LoraSettings = LoraSettings(r=64, alpha=16, dropout=0.1, target_modules="all-linear")


def resolve_optim(optim: str | None, cuda: bool | None = None) -> tuple[str | None, str]:
    """The optimizer the trainer can use here, and a note saying what changed and why."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if optim and optim.startswith("paged_") and not cuda:
        if optim not in PAGED_ON_CPU:
            raise ConfigError(f"optim '{optim}': a paged optimizer with no CPU equivalent known "
                              f"here; known: {', '.join(PAGED_ON_CPU)}")
        alt = PAGED_ON_CPU[optim]
        return alt, (f"{optim} pages optimizer states through CUDA unified memory, which a CPU "
                     f"does not have; using {alt} (same update rule, no paging)")
    return optim, ""


def keep_training_layout(model) -> int:
    """Undo and switch off bitsandbytes' CPU inference repacking of 4-bit weights (see the
    module docstring). Returns how many layers had been repacked."""
    import bitsandbytes as bnb

    unpacked = 0
    for mod in model.modules():
        if not isinstance(mod, bnb.nn.Linear4bit):
            continue
        mod.support_avx512bf16_for_cpu = False
        qs = getattr(mod.weight, "quant_state", None)
        if qs is not None and getattr(qs, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            mod.weight.data, mod.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                mod.weight.data, qs)
            unpacked += 1
    return unpacked


def load_base(s: QLoRASettings, for_training: bool = True):
    """``(model, tokenizer)``: the base in ``s.bits`` bits, prepared for k-bit training."""
    from peft import prepare_model_for_kbit_training

    from ..compress.bnb import load_quantized

    model, tok = load_quantized(s.model, bits=s.bits, quant_type=s.quant_type,
                                double_quant=s.double_quant, compute_dtype=s.compute_dtype,
                                seed=s.seed)
    # fp32 norms / embeddings / head, frozen base, checkpointing (training only)
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=for_training and s.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False})
    keep_training_layout(model)
    return model, tok


def prepare_qlora(s: QLoRASettings):
    """``(peft_model, tokenizer)``: quantised, prepared base + fresh LoRA adapters."""
    from peft import get_peft_model

    model, tok = load_base(s)
    return get_peft_model(model, lora_config(s.lora)), tok


def base_bytes(model) -> int:
    """Bytes of the model's parameters and buffers without the LoRA matrices (a 4-bit weight is
    counted by its packed storage, its quantisation state included)."""
    from ..evals.speed import model_bytes

    lora = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    return model_bytes(model) - lora


def run_qlora(s: QLoRASettings, callbacks=()) -> dict[str, Any]:
    """Train LoRA adapters on the quantised base with the SFT trainer; run_sft's result dict plus
    the optimizer used, the base's bytes and how many linears are 4-bit."""
    from ..compress.bnb import quantized_linears
    from .sft import run_sft

    optim, note = resolve_optim(s.optim)
    if note:
        log.warning(note)
    model, tok = prepare_qlora(s)
    # the model already carries its adapters and checkpointing: the trainer trains what
    # requires grad ("full" = no second PEFT wrapper) with the resolved optimizer
    inner = s.model_copy(update={"finetuning": "full", "optim": optim,
                                 "gradient_checkpointing": False})
    res = run_sft(inner, model=model, tokenizer=tok, callbacks=callbacks)
    keep_training_layout(res["trainer"].model)
    res.update(optim=optim, optim_note=note, base_bytes=base_bytes(res["trainer"].model),
               quantized_linears=len(quantized_linears(res["trainer"].model)))
    return res


# --------------------------------------------------------------------------- adapters on bases

def _adapter_tensor_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    f = adapter_dir / "adapter_model.safetensors"
    if f.is_file():
        with safe_open(str(f), framework="pt") as h:
            return {k: tuple(h.get_slice(k).get_shape()) for k in h.keys()}
    f = adapter_dir / "adapter_model.bin"
    if f.is_file():
        return {k: tuple(v.shape) for k, v in torch.load(f, map_location="cpu").items()}
    raise DataError(f"{adapter_dir}: no adapter_model.safetensors or adapter_model.bin")


def check_adapter_base(model, adapter_dir: str | Path) -> None:
    """Raise ``ConfigError`` unless every LoRA layer saved in ``adapter_dir`` has a layer of the
    same name and in/out size in ``model`` (a plain model or a PeftModel)."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    cfg_file = adapter_dir / "adapter_config.json"
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{cfg_file}: cannot read the adapter config ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        return  # prefix / prompt adapters are checked by PEFT itself
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    mods = dict(base.named_modules())
    trained_on = cfg.get("base_model_name_or_path") or "another model"
    for key, shape in sorted(_adapter_tensor_shapes(adapter_dir).items()):
        for part in (".lora_A.", ".lora_B."):
            if part in key:
                name = key.split(part)[0].removeprefix("base_model.model.")
                break
        else:
            continue
        mod = mods.get(name)
        if mod is None:
            raise ConfigError(f"{adapter_dir}: the adapter (trained on {trained_on}) has a LoRA "
                              f"layer '{name}' that this base model lacks: wrong base model")
        d_in, d_out = getattr(mod, "in_features", None), getattr(mod, "out_features", None)
        want = ("in", shape[1], d_in) if part == ".lora_A." else ("out", shape[0], d_out)
        if want[2] is not None and want[1] != want[2]:
            raise ConfigError(
                f"{adapter_dir}: layer '{name}' of the adapter (trained on {trained_on}) expects "
                f"{want[0]}_features={want[1]} but this base model's layer has {want[2]} "
                f"({d_in}->{d_out}): wrong base model")


def load_qlora(s: QLoRASettings, adapter_dir: str | Path):
    """``(peft_model, tokenizer)``: a fresh quantised base (prepared as for training, so float
    parts match) with the saved adapter in its saved dtype, in eval mode."""
    from peft import PeftModel

    model, tok = load_base(s, for_training=False)
    check_adapter_base(model, adapter_dir)
    # keep the adapter in the dtype it was saved in: TRL trains QLoRA adapters in bf16 when bf16 is
    # on (as the QLoRA reference code does); PEFT's default would upcast them to fp32 on loading
    pm = PeftModel.from_pretrained(model, str(adapter_dir), autocast_adapter_dtype=False)
    pm.eval()
    return pm, tok


# --------------------------------------------------------------------------- QLoRA vs LoRA

def compare_with_lora(model_id: str = "smollm2-135m", batch: int = 4, seq_len: int = 128,
                      steps: int = 3, lora_r: int = 8, gradient_checkpointing: bool = True,
                      data: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Peak training memory and speed of QLoRA vs plain LoRA (fp32 base), each measured in a
    fresh process by ``llmtech.dist.memory.measure`` with the same batch, length, rank and
    checkpointing. Returns flat numbers (MB, tokens/s, ratios QLoRA / LoRA) and the raw runs."""
    from ..dist.memory import measure_subprocess

    runs = {m: measure_subprocess(m, model_id, batch=batch, seq_len=seq_len, steps=steps,
                                  lora_r=lora_r, gradient_checkpointing=gradient_checkpointing,
                                  data=data, seed=seed)
            for m in ("lora", "qlora")}
    out: dict[str, Any] = {}
    for m, r in runs.items():
        out[f"{m}_peak_mb"] = r["measured_mb"]
        out[f"{m}_weights_mb"] = r["model_bytes_mb"]
        out[f"{m}_tokens_per_s"] = round(batch * seq_len / r["step_s"], 1)
        out[f"{m}_step_s"] = r["step_s"]
    out["peak_ratio"] = round(out["qlora_peak_mb"] / out["lora_peak_mb"], 3)
    out["weights_ratio"] = round(out["qlora_weights_mb"] / out["lora_weights_mb"], 3)
    out["speed_ratio"] = round(out["qlora_tokens_per_s"] / out["lora_tokens_per_s"], 3)
    out["runs"] = runs
    return out

