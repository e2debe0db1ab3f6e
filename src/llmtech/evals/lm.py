"""Language-model measurements: response-only loss, perplexity, batched greedy generation."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from ..models import render_chat


def encode_chat_example(tokenizer, messages: list[dict], max_length: int = 512) -> dict:
    """Token ids of a chat whose LAST message is the target, and a mask of the target tokens.

    The prompt is rendered with the generation prompt, so the target tokens are exactly what
    the model must generate (including the end-of-turn/EOS token the template appends).
    """
    prompt_text = render_chat(tokenizer, messages[:-1], add_generation_prompt=True)
    full_text = render_chat(tokenizer, messages)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("chat template does not render the prompt as a prefix of the full chat")
    mask = [0] * len(prompt_ids) + [1] * (len(full_ids) - len(prompt_ids))
    return {"input_ids": full_ids[:max_length], "target_mask": mask[:max_length]}


def pad_examples(chunk: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad ``encode_chat_example`` outputs into ``(input_ids, attention_mask, target_mask)``."""
    L = max(len(e["input_ids"]) for e in chunk)
    ids = torch.full((len(chunk), L), pad_id, dtype=torch.long)
    att = torch.zeros((len(chunk), L), dtype=torch.long)
    tgt = torch.zeros((len(chunk), L), dtype=torch.bool)
    for j, e in enumerate(chunk):
        n = len(e["input_ids"])
        ids[j, :n] = torch.tensor(e["input_ids"])
        att[j, :n] = 1
        tgt[j, :n] = torch.tensor(e["target_mask"], dtype=torch.bool)
    return ids, att, tgt


@torch.no_grad()
def sequence_logprobs(model, tokenizer, examples: list[dict], batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the sum of log p(token) over its target tokens, and how many there are.

    ``examples`` come from ``encode_chat_example`` (input_ids + target_mask). Right padding, so
    every example is scored exactly as it would be on its own.
    """
    model.eval()
    sums, counts = [], []
    pad = tokenizer.pad_token_id
    for i in range(0, len(examples), batch_size):
        ids, att, tgt = pad_examples(examples[i:i + batch_size], pad)
        dev = model.device
        logits = model(input_ids=ids.to(dev), attention_mask=att.to(dev)).logits.float().cpu()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tok_logp = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        m = tgt[:, 1:]
        sums.append((tok_logp * m).sum(-1).double())
        counts.append(m.sum(-1))
    return torch.cat(sums), torch.cat(counts)


def masked_nll(model, tokenizer, batch_examples: list[dict], batch_size: int = 8) -> tuple[float, int]:
    """Sum of negative log-likelihood over target tokens, and the number of target tokens."""
    sums, counts = sequence_logprobs(model, tokenizer, batch_examples, batch_size)
    return float(-sums.sum()), int(counts.sum())


def response_logprobs(model, tokenizer, conversations: Iterable[list[dict]], max_length: int = 512,
                      batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(last message | the messages before it), summed over its tokens, per conversation;
    and the token counts. This is the quantity DPO's implicit reward is built from."""
    ex = [encode_chat_example(tokenizer, c, max_length) for c in conversations]
    return sequence_logprobs(model, tokenizer, ex, batch_size)


def response_loss(model, tokenizer, conversations: Iterable[list[dict]], max_length: int = 512,
                  batch_size: int = 8) -> float:
    """Mean per-token loss of the final assistant message given the conversation before it."""
    ex = [encode_chat_example(tokenizer, c, max_length) for c in conversations]
    total, count = masked_nll(model, tokenizer, ex, batch_size)
    return total / max(count, 1)


def token_windows(tokenizer, texts: Iterable[str], window: int = 256,
                  max_tokens: int | None = None) -> list[list[int]]:
    """Tokenize each text and cut it into non-overlapping windows of at most ``window`` tokens."""
    out: list[list[int]] = []
    budget = max_tokens if max_tokens is not None else math.inf
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        for i in range(0, len(ids), window):
            w = ids[i:i + window][: int(min(window, budget))]
            if len(w) >= 2:
                out.append(w)
                budget -= len(w)
            if budget < 2:
                return out
    return out


def perplexity(model, tokenizer, texts: Iterable[str], window: int = 256,
               max_tokens: int | None = None, batch_size: int = 8) -> float:
    """Perplexity ``exp(mean next-token NLL)`` over fixed token windows of ``texts``."""
    windows = token_windows(tokenizer, texts, window, max_tokens)
    if not windows:
        raise ValueError("perplexity needs at least one text with 2 or more tokens")
    ex = [{"input_ids": w, "target_mask": [1] * len(w)} for w in windows]
    total, count = masked_nll(model, tokenizer, ex, batch_size)
    return math.exp(total / max(count, 1))


@torch.no_grad()
def generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 64,
             batch_size: int = 8) -> list[str]:
    """Greedy replies to each conversation (prompt = all messages, generation prompt added)."""
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outs: list[str] = []
    try:
        for i in range(0, len(conversations), batch_size):
            texts = [render_chat(tokenizer, c, add_generation_prompt=True)
                     for c in conversations[i:i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            for row in gen[:, enc["input_ids"].shape[1]:]:
                outs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side = old_side
    return outs


@torch.no_grad()
def logits_per_text(model, tokenizer, texts: Iterable[str], max_length: int = 256) -> list[torch.Tensor]:
    """Logits (on the CPU, float32) of each text run on its own, without padding — for checking
    that two models (say an adapter model and its merged copy) compute the same function."""
    model.eval()
    out = []
    for t in texts:
        ids = tokenizer(t, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :max_length]
        out.append(model(input_ids=ids.to(model.device)).logits[0].float().cpu())
    return out


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest absolute difference between two lists of same-shaped tensors."""
    if len(a) != len(b):
        raise ValueError(f"different numbers of tensors: {len(a)} vs {len(b)}")
    return max((float((x - y).abs().max()) for x, y in zip(a, b)), default=0.0)
