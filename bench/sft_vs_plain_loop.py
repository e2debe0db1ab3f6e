"""`llmtech train sft` (TRL SFTTrainer + PEFT LoRA) vs a plain PEFT + torch training loop.

Same model, same LoRA, same examples, batch size and length. Every batch is padded to the same
fixed length in both, so each step does the same arithmetic and the ratio shows only what the
framework costs; the first step (set-up, warm-up) is left out of both timings.
Target: llmtech's throughput >= 0.95x the plain loop.

    .venv/bin/python bench/sft_vs_plain_loop.py [--steps 16] [--model smollm2-135m]
"""

import argparse
import tempfile
import time

import torch
from transformers import TrainerCallback

from common import TRAIN, bench_settings, save

from llmtech import data, models
from llmtech.evals.lm import encode_chat_example
from llmtech.train.lora import LoraSettings, lora_config
from llmtech.train.sft import run_sft


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter())


def plain_loop(model_id, records, steps, batch, length, lr, seed):
    from peft import get_peft_model

    torch.manual_seed(seed)
    model, tok = models.load_lm(model_id)
    model = get_peft_model(model, lora_config(LoraSettings()))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ex = [encode_chat_example(tok, data.to_messages(r), length) for r in records]
    times, i = [], 0
    for _ in range(steps):
        chunk = [ex[(i + j) % len(ex)] for j in range(batch)]
        i += batch
        ids = torch.full((batch, length), tok.pad_token_id)
        att = torch.zeros((batch, length), dtype=torch.long)
        labels = torch.full((batch, length), -100)
        for k, e in enumerate(chunk):
            n = len(e["input_ids"])
            ids[k, :n] = torch.tensor(e["input_ids"])
            att[k, :n] = 1
            mask = torch.tensor(e["target_mask"]) == 1
            labels[k, :n] = torch.where(mask, torch.tensor(e["input_ids"]), -100)
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter())
    return (steps - 1) * batch / (times[-1] - times[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=160)
    ap.add_argument("--model", default="smollm2-135m")
    a = ap.parse_args()
    records = data.load(TRAIN)[: a.steps * a.batch]
    plain = plain_loop(a.model, records, a.steps, a.batch, a.length, 2e-4, 0)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as d:
        # same precision (fp32) and fixed-shape batches as the plain loop
        s = bench_settings(d, a.model, a.steps, a.batch, a.length, max_train_samples=len(records),
                           pad_to_multiple_of=a.length, learning_rate=2e-4)
        run_sft(s, callbacks=[timer])
    ours = (a.steps - 1) * a.batch / (timer.times[-1] - timer.times[0])
    ratio = ours / plain
    tok_plain, tok_ours = plain * a.length, ours * a.length
    print(f"\nplain PEFT+torch loop : {plain:6.2f} sequences/s ({tok_plain:7.1f} tokens/s incl. padding)")
    print(f"llmtech train sft     : {ours:6.2f} sequences/s ({tok_ours:7.1f} tokens/s incl. padding)"
          f"   ratio {ratio:.2f}x  (target >= 0.95x)")
    save("sft_vs_plain_loop", {"plain_sequences_per_s": round(plain, 3), "llmtech_sequences_per_s": round(ours, 3),
                               "plain_tokens_per_s": round(tok_plain, 1), "llmtech_tokens_per_s": round(tok_ours, 1),
                               "ratio": round(ratio, 3), "target": 0.95, "pass": ratio >= 0.95,
                               "steps": a.steps, "batch": a.batch, "length": a.length, "model": a.model})


if __name__ == "__main__":
    main()
