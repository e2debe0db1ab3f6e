"""Compare compressed variants of a model on one scale: size on disk (``saved_bytes``), held-out
perplexity, tensor bytes, RSS and decode tokens/s (``measure_variant``), and the Pareto front of
two costs to minimise (``pareto_front``). Used by the compression lab (L2.04) for pruned,
distilled and quantised variants alike."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import torch
from torch import nn

from ..errors import LlmtechError


# --------------------------------------------------------------------------- size on disk

def folder_bytes(folder: str | Path) -> int:
    """Total bytes of the files under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def saved_bytes(model: nn.Module, folder: str | Path,
                fmt: Literal["safetensors", "torch"] = "safetensors") -> int:
    """Save ``model`` under ``folder`` and return the bytes written (weights + config).

    ``safetensors``: ``save_pretrained`` (also bitsandbytes 4/8-bit models, with their quant
    states). ``torch``: ``torch.save(state_dict)`` — for models whose modules safetensors cannot
    hold, e.g. ``torch.ao`` dynamically quantised linears (packed int8 weights).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        model.save_pretrained(folder)
    elif fmt == "torch":
        torch.save(model.state_dict(), folder / "model.pt")
        if hasattr(model, "config"):
            model.config.save_pretrained(folder)
    else:
        raise LlmtechError(f"unknown save format {fmt!r}; use 'safetensors' or 'torch'")
    return folder_bytes(folder)



# --------------------------------------------------------------------------- comparing variants

def measure_variant(name: str, model, tokenizer, texts: Sequence[str], prompts: Sequence[str],
                    save_dir: str | Path, fmt: Literal["safetensors", "torch", "gguf"] = "safetensors",
                    rss_base: int | None = None, window: int = 256, max_tokens: int | None = 512,
                    max_new_tokens: int = 16, keep: bool = False) -> dict:
    """One compressed variant measured the same way as every other: held-out perplexity on the
    same token windows (``quantize.perplexity``), bytes on disk after saving (``saved_bytes``; the
    file itself for a ``GGUFModel``), bytes of its tensors, RSS growth since ``rss_base`` and greedy
    decode tokens/s (``evals.speed.measure_generation``). The saved copy under ``save_dir/name`` is
    removed unless ``keep``. Returns a flat dict: ``ppl``, ``size_mb``, ``mem_mb``, ``tokens_per_s``,
    ``other_cpu_pct`` (and ``rss_mb`` when ``rss_base`` is given) — each key suffixed ``_<name>``."""
    import shutil

    from ..evals import speed
    from .quantize import perplexity

    ppl = perplexity(model, tokenizer, texts, window, max_tokens)
    res = speed.measure_generation(model, tokenizer, list(prompts), max_new_tokens, warmup=1)
    folder = Path(save_dir) / name
    if fmt == "gguf":
        size = mem = model.nbytes()
    else:
        size, mem = saved_bytes(model, folder, fmt), speed.model_bytes(model)
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
            try:
                folder.parent.rmdir()  # only if no other variant was kept there
            except OSError:
                pass
    out = {"ppl": ppl, "size_mb": size / speed.MB, "mem_mb": mem / speed.MB,
           "tokens_per_s": res.decode_tokens_per_s, "other_cpu_pct": round(res.other_cpu_pct, 1)}
    if rss_base is not None:
        out["rss_mb"] = (speed.rss_bytes() - rss_base) / speed.MB
    return {f"{k}_{name}": v for k, v in out.items()}


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the points no other point dominates, both coordinates to be minimised (negate one
    to maximise it): ``b`` dominates ``a`` if it is no worse in both and better in one."""
    def dominated(a):
        return any(b[0] <= a[0] and b[1] <= a[1] and b != a for b in points.values())

    return [n for n, p in points.items() if not dominated(p)]
