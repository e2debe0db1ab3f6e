"""bf16 autocast vs fp32 for LoRA SFT on this CPU: tokens/s ratio and loss-curve agreement.

The faster one should be the default only where the loss curves agree within 2%.

    .venv/bin/python bench/bf16_vs_fp32.py [--steps 20]
"""

import argparse
import tempfile

from common import bench_settings, save

from llmtech.train.callbacks import read_log
from llmtech.train.sft import run_sft


def measure(model, steps, batch, max_length, bf16):
    with tempfile.TemporaryDirectory() as d:
        r = run_sft(bench_settings(d, model, steps, batch, max_length, bf16=bf16, logging_steps=1))
        losses = [x["loss"] for x in read_log(f"{d}/trainer_log.jsonl") if "loss" in x]
        return r["tokens_per_s"], losses


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--model", default="smollm2-135m")
    a = ap.parse_args()
    fp32, l32 = measure(a.model, a.steps, a.batch, a.max_length, False)
    bf16, l16 = measure(a.model, a.steps, a.batch, a.max_length, True)
    n = min(len(l32), len(l16))
    rel = [abs(x - y) / abs(x) for x, y in zip(l32[:n], l16[:n])]
    mean_rel, max_rel = sum(rel) / n, max(rel)
    print(f"\nfp32 : {fp32:8.1f} tokens/s")
    print(f"bf16 : {bf16:8.1f} tokens/s   ratio {bf16 / fp32:.2f}x")
    print(f"loss curves: mean relative difference {mean_rel:.2%}, max {max_rel:.2%} (agree if mean <= 2%)")
    save("bf16_vs_fp32", {"fp32_tokens_per_s": fp32, "bf16_tokens_per_s": bf16,
                          "ratio": round(bf16 / fp32, 3), "loss_mean_rel_diff": round(mean_rel, 4),
                          "loss_max_rel_diff": round(max_rel, 4), "curves_agree": mean_rel <= 0.02,
                          "fp32_final_loss": l32[-1], "bf16_final_loss": l16[-1]})


if __name__ == "__main__":
    main()
