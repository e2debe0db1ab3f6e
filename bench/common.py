"""Shared bits of the benchmark scripts: settings, output, the CPU lock."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
OUT = ROOT / "runs" / "bench"
TRAIN = str(ROOT / "data" / "support" / "sft_train.jsonl")


def save(name: str, result: dict) -> Path:
    from llmtech.io import atomic_write_json

    OUT.mkdir(parents=True, exist_ok=True)
    result = {"bench": name, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **result}
    path = atomic_write_json(OUT / f"{name}.json", result)
    print(json.dumps(result, ensure_ascii=False, indent=2))
    return path


def row(label: str, value: float, baseline: float, unit: str, target: str = "") -> str:
    ratio = value / baseline if baseline else float("nan")
    return f"{label:38} {value:10.1f} {unit:9} ratio {ratio:5.2f}x  {target}"


def bench_settings(output_dir: str, model: str, steps: int, batch: int, max_length: int, **kw):
    """SFT settings shared by the benchmarks: training only (no eval, no saves), constant LR,
    fp32 unless a benchmark says otherwise, so arms differ only in what is being compared."""
    from llmtech.train.sft import SFTSettings

    base = dict(model=model, train_file=TRAIN, eval_file=None, output_dir=output_dir,
                max_steps=steps, batch_size=batch, max_length=max_length, save_steps=10**6,
                save_final=False, logging_steps=10, lr_scheduler="constant", eval_before=False,
                bf16=False)
    base.update(kw)
    return SFTSettings(**base)
