"""LoRA helpers: config, analytic parameter count, where adapters sit, merging."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel

from ..config import StrictModel


class LoraSettings(StrictModel):
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # "all-linear" = every nn.Linear except the output head (PEFT's own rule)
    target_modules: list[str] | str = "all-linear"


def lora_config(s: LoraSettings, task_type: str = "CAUSAL_LM") -> LoraConfig:
    return LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout,
                      target_modules=s.target_modules, task_type=task_type, bias="none")


def adapted_linears(model) -> dict[str, tuple[int, int]]:
    """Names of the Linear layers that carry a LoRA adapter -> (in_features, out_features)."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "base_layer"):
            base = mod.base_layer
            out[name] = (base.in_features, base.out_features)
    return out


def analytic_lora_params(shapes: dict[str, tuple[int, int]], r: int) -> int:
    """Each adapted W (d_out × d_in) gains A (r × d_in) and B (d_out × r): r·(d_in + d_out)."""
    return sum(r * (d_in + d_out) for d_in, d_out in shapes.values())


def merge_and_save(model, tokenizer, path: str | Path) -> Path:
    """Fold the adapters into the base weights (W + B·A·alpha/r) and save a plain model."""
    path = Path(path)
    merged = model.merge_and_unload() if isinstance(model, PeftModel) else model
    merged.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def delta_weight(peft_model, module_name: str) -> torch.Tensor:
    """ΔW = B·A·(alpha/r) of one adapted layer (what merging adds to W)."""
    mod = dict(peft_model.named_modules())[module_name]
    return mod.get_delta_weight("default").detach()
