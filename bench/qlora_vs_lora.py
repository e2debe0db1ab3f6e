"""QLoRA vs LoRA on the bundled model: peak training memory and tokens/s, ratios side by side.

Both arms train the same LoRA (rank, all linear layers, gradient checkpointing) on the same
packed batch of real instruction text, each in a fresh process (llmtech.dist.memory.measure):
LoRA on the fp32 base, QLoRA on the NF4 + double-quantised base (bitsandbytes, bf16 compute).
Peak memory is process RSS above the baseline on the CPU (allocated bytes on a GPU).

    .venv/bin/python bench/qlora_vs_lora.py [--model smollm2-135m] [--batch 4] [--seq-len 256]
"""

import argparse

from common import TRAIN, row, save

from llmtech.train.peft_methods import compare_with_lora


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--no-checkpointing", action="store_true")
    a = ap.parse_args()
    gc = not a.no_checkpointing
    c = compare_with_lora(a.model, batch=a.batch, seq_len=a.seq_len, steps=a.steps, lora_r=a.r,
                          gradient_checkpointing=gc, data=TRAIN)
    runs = c.pop("runs")
    print(f"\n{a.model}: batch {a.batch} x {a.seq_len}, LoRA r={a.r} all-linear, "
          f"checkpointing={gc}, {a.steps} steps each, {runs['lora']['memory']}")
    print(row("weights, LoRA (fp32 base)", c["lora_weights_mb"], c["lora_weights_mb"], "MB"))
    print(row("weights, QLoRA (NF4 base)", c["qlora_weights_mb"], c["lora_weights_mb"], "MB"))
    print(row("peak memory, LoRA", c["lora_peak_mb"], c["lora_peak_mb"], "MB"))
    print(row("peak memory, QLoRA", c["qlora_peak_mb"], c["lora_peak_mb"], "MB", "(lower is better)"))
    print(row("tokens/s, LoRA", c["lora_tokens_per_s"], c["lora_tokens_per_s"], "tok/s"))
    print(row("tokens/s, QLoRA", c["qlora_tokens_per_s"], c["lora_tokens_per_s"], "tok/s",
              "(dequantising every matmul costs time)"))
    save("qlora_vs_lora", {"model": a.model, "batch": a.batch, "seq_len": a.seq_len,
                           "steps": a.steps, "lora_r": a.r, "gradient_checkpointing": gc,
                           "device": runs["lora"]["device"], **c,
                           "pass": c["peak_ratio"] < 1.0})


if __name__ == "__main__":
    main()
