"""`llmtech train sft` (TRL SFTTrainer + PEFT LoRA) vs a plain PEFT + torch training loop.

Same model, same LoRA, same examples, batch size and max length; both count non-pad tokens.
Target: llmtech's throughput >= 0.95x the plain loop.

    .venv/bin/python bench/sft_vs_plain_loop.py [--steps 20] [--model smollm2-135m]
"""

import argparse
import tempfile
import time

import torch

from common import TRAIN, save

from llmtech import data, models
from llmtech.evals.lm import encode_chat_example
from llmtech.train.lora import LoraSettings, lora_config
from llmtech.train.sft import SFTSettings, run_sft


def plain_loop(model_id, records, steps, batch, max_len, lr, seed):
    from peft import get_peft_model

    torch.manual_seed(seed)
    model, tok = models.load_lm(model_id)
    model = get_peft_model(model, lora_config(LoraSettings()))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ex = [encode_chat_example(tok, data.to_messages(r), max_len) for r in records]
    tokens, t0, i = 0, time.time(), 0
    for _ in range(steps):
        chunk = [ex[(i + j) % len(ex)] for j in range(batch)]
        i += batch
        L = max(len(e["input_ids"]) for e in chunk)
        ids = torch.full((batch, L), tok.pad_token_id)
        att = torch.zeros((batch, L), dtype=torch.long)
        labels = torch.full((batch, L), -100)
        for k, e in enumerate(chunk):
            n = len(e["input_ids"])
            ids[k, :n] = torch.tensor(e["input_ids"])
            att[k, :n] = 1
            labels[k, :n] = torch.where(torch.tensor(e["target_mask"]) == 1, torch.tensor(e["input_ids"]), -100)
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(att.sum())
    return tokens / (time.time() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--model", default="smollm2-135m")
    a = ap.parse_args()
    records = data.load(TRAIN)[: a.steps * a.batch]
    plain = plain_loop(a.model, records, a.steps, a.batch, a.max_length, 2e-4, 0)
    with tempfile.TemporaryDirectory() as d:
        s = SFTSettings(model=a.model, train_file=TRAIN, eval_file=None, max_train_samples=len(records),
                        output_dir=d, max_steps=a.steps, batch_size=a.batch, max_length=a.max_length,
                        learning_rate=2e-4, save_steps=10**6, save_final=False, logging_steps=10,
                        lr_scheduler="constant")
        ours = run_sft(s)["tokens_per_s"]
    ratio = ours / plain
    print(f"\nplain PEFT+torch loop : {plain:8.1f} non-pad tokens/s")
    print(f"llmtech train sft     : {ours:8.1f} non-pad tokens/s   ratio {ratio:.2f}x  (target >= 0.95x)")
    save("sft_vs_plain_loop", {"plain_tokens_per_s": round(plain, 1), "llmtech_tokens_per_s": ours,
                               "ratio": round(ratio, 3), "target": 0.95, "pass": ratio >= 0.95,
                               "steps": a.steps, "batch": a.batch, "max_length": a.max_length,
                               "model": a.model})


if __name__ == "__main__":
    main()
