"""Non-pad tokens/s of padded batches vs length-grouping vs packing on the sample SFT data.

Target: packing or length-grouping >= 1.3x padded batches.

    .venv/bin/python bench/packing_vs_padding.py [--steps 16]
"""

import argparse
import tempfile

from common import bench_settings, save

from llmtech.train.sft import run_sft


def measure(model, steps, batch, max_length, **kw):
    with tempfile.TemporaryDirectory() as d:
        return run_sft(bench_settings(d, model, steps, batch, max_length, **kw))["tokens_per_s"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--model", default="smollm2-135m")
    a = ap.parse_args()
    padded = measure(a.model, a.steps, a.batch, a.max_length)
    grouped = measure(a.model, a.steps, a.batch, a.max_length, group_by_length=True)
    # packed rows hold several examples each: fewer rows per batch keeps the tokens per step close
    packed = measure(a.model, a.steps, max(1, a.batch // 4), a.max_length * 2, packing=True)
    best = max(grouped, packed)
    print(f"\npadded batches   : {padded:8.1f} non-pad tokens/s")
    print(f"group_by_length  : {grouped:8.1f}  ratio {grouped / padded:.2f}x")
    print(f"packing (bfd)    : {packed:8.1f}  ratio {packed / padded:.2f}x   (target: best >= 1.3x)")
    save("packing_vs_padding", {"padded_tokens_per_s": padded, "grouped_tokens_per_s": grouped,
                                "packed_tokens_per_s": packed,
                                "grouped_ratio": round(grouped / padded, 3),
                                "packed_ratio": round(packed / padded, 3), "target": 1.3,
                                "pass": best / padded >= 1.3, "steps": a.steps, "batch": a.batch})


if __name__ == "__main__":
    main()
