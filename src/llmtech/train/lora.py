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
    from ..io import staged_dir

    merged = model.merge_and_unload() if isinstance(model, PeftModel) else model
    with staged_dir(path) as tmp:  # a killed save never leaves a half-written model at `path`
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(path)


def delta_weight(peft_model, module_name: str) -> torch.Tensor:
    """ΔW = B·A·(alpha/r) of one adapted layer (what merging adds to W)."""
    mod = dict(peft_model.named_modules())[module_name]
    return mod.get_delta_weight("default").detach()


def target_linears(model, target_modules: list[str] | str) -> dict[str, tuple[int, int]]:
    """The nn.Linear layers of a plain (un-wrapped) model that a LoRA target spec selects.

    Found without PEFT, by PEFT's matching rule, so it can check PEFT: a list entry matches a
    module whose name equals it or ends with ``.<entry>``; a plain string other than
    ``"all-linear"`` is a regular expression matched against the full name; ``"all-linear"`` is
    every Linear except the output head. Returns name -> (in_features, out_features).
    """
    import re

    from torch import nn

    head = model.get_output_embeddings()
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if target_modules == "all-linear":
            hit = mod is not head
        elif isinstance(target_modules, str):
            hit = re.fullmatch(target_modules, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in target_modules)
        if hit:
            out[name] = (mod.in_features, mod.out_features)
    return out


def peft_count(model, s: LoraSettings) -> tuple[int, dict[str, tuple[int, int]]]:
    """Wrap ``model`` with LoRA, count the trainable parameters PEFT creates, then unwrap.

    Returns (trainable parameters, adapted layer name -> shape with the PEFT prefix removed).
    ``model`` is left as it was (``unload`` removes the adapter layers again).
    """
    from peft import get_peft_model

    was = {n: p.requires_grad for n, p in model.named_parameters()}
    pm = get_peft_model(model, lora_config(s))
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    shapes = {n.removeprefix("base_model.model."): v for n, v in adapted_linears(pm).items()}
    pm.unload()
    for n, p in model.named_parameters():
        p.requires_grad_(was.get(n, True))
    return trainable, shapes


def rank_stats(sv: torch.Tensor, shape: tuple[int, int] | None = None,
               energy: float = 0.9) -> dict[str, float]:
    """Rank measures of a matrix from its singular values ``sv`` (descending).

    * ``rank_energy``: how many singular values hold ``energy`` of the squared Frobenius norm;
    * ``effective_rank``: exp of the entropy of σ/Σσ (Roy & Vetterli 2007);
    * ``numerical_rank``: σ above σ_max·max(m, n)·eps(float32) (numpy's matrix_rank rule).
    """
    sv = sv.detach().double().flatten()
    if float(sv.max()) <= 0:
        return {"rank_energy": 0, "effective_rank": 0.0, "numerical_rank": 0}
    e = sv ** 2
    cum = torch.cumsum(e, 0) / e.sum()
    p = sv / sv.sum()
    p = p[p > 0]
    ent = float(-(p * p.log()).sum())
    n = max(shape) if shape else len(sv)
    tol = float(sv.max()) * n * torch.finfo(torch.float32).eps
    return {"rank_energy": int((cum < energy - 1e-12).sum()) + 1,
            "effective_rank": float(torch.exp(torch.tensor(ent))),
            "numerical_rank": int((sv > tol).sum())}


def injection_table(shapes: dict[str, tuple[int, int]], r: int) -> list[dict]:
    """Group adapted layers by name pattern (layer numbers -> ``*``): one row per pattern with
    its shape, how many layers match, and the LoRA vs full parameters of one such layer."""
    import re

    rows: dict[str, dict] = {}
    for name, (d_in, d_out) in shapes.items():
        pat = re.sub(r"\.\d+\.", ".*.", name)
        row = rows.setdefault(pat, {"pattern": pat, "d_in": d_in, "d_out": d_out, "layers": 0,
                                    f"lora_params_r{r}": r * (d_in + d_out),
                                    "full_W_params": d_in * d_out})
        row["layers"] += 1
    return list(rows.values())
