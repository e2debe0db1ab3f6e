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
               max_tokens: int | None = None, batch_size: int = 8,
               stride: int | None = None) -> float:
    """Perplexity ``exp(mean next-token NLL)`` over token windows of ``texts``.

    ``stride=None`` (or ``stride == window``): fixed, non-overlapping windows. A smaller
    ``stride`` slides the window (see ``sliding_windows``), so every scored token has at least
    ``window - stride`` tokens of context.
    """
    return perplexity_stats(model, tokenizer, texts, window, stride, max_tokens, batch_size)["ppl"]


def sliding_windows(tokenizer, texts: Iterable[str], window: int = 256, stride: int | None = None,
                    max_tokens: int | None = None) -> list[dict]:
    """Examples (``input_ids`` + ``target_mask``) for strided perplexity, text by text.

    Windows start every ``stride`` tokens and hold up to ``window`` tokens; each window scores
    only the tokens no earlier window has scored, so every token after a text's first is scored
    exactly once, with the longest context the window allows. ``stride == window`` gives the
    same windows (and the same scored tokens) as ``token_windows``. ``max_tokens`` caps the
    number of tokens read, as in ``token_windows``.
    """
    stride = window if stride is None else stride
    if window < 2 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 2 and 1 <= stride <= window (got window={window}, stride={stride})")
    out: list[dict] = []
    budget = max_tokens if max_tokens is not None else math.inf
    for t in texts:
        if budget < 2:
            break
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        ids = ids[: int(min(len(ids), budget))]
        if len(ids) < 2:
            continue
        budget -= len(ids)
        scored_to = 1  # token 0 of a text has no context: never scored
        for begin in range(0, len(ids), stride):
            end = min(begin + window, len(ids))
            first = max(scored_to, begin + 1)  # a window's first token has no context inside it
            if end > first:
                mask = [0] * (first - begin) + [1] * (end - first)
                out.append({"input_ids": ids[begin:end], "target_mask": mask})
                scored_to = end
            if end == len(ids):
                break
    return out


def perplexity_stats(model, tokenizer, texts: Iterable[str], window: int = 256,
                     stride: int | None = None, max_tokens: int | None = None,
                     batch_size: int = 8) -> dict:
    """``{"ppl", "nll_per_token", "tokens" (scored), "windows", "window", "stride"}`` of ``texts``."""
    stride = window if stride is None else stride
    if stride == window:  # the fixed windows every other lab scores (``token_windows``)
        ex = [{"input_ids": w, "target_mask": [1] * len(w)}
              for w in token_windows(tokenizer, texts, window, max_tokens)]
    else:
        ex = sliding_windows(tokenizer, texts, window, stride, max_tokens)
    if not ex:
        raise ValueError("perplexity needs at least one text with 2 or more tokens")
    total, count = masked_nll(model, tokenizer, ex, batch_size)
    nll = total / max(count, 1)
    return {"ppl": math.exp(nll), "nll_per_token": nll, "tokens": count, "windows": len(ex),
            "window": window, "stride": stride}


@torch.no_grad()
def generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 64,
             batch_size: int = 8, num_return_sequences: int = 1, **generate_kwargs) -> list[str]:
    """Replies to each conversation (prompt = all messages, generation prompt added); greedy
    unless ``generate_kwargs`` ask for sampling (``do_sample=True, temperature=...``). With
    ``num_return_sequences=n`` the n replies of each conversation come one after another."""
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outs: list[str] = []
    kw = {"do_sample": False, **generate_kwargs}
    try:
        for i in range(0, len(conversations), batch_size):
            texts = [render_chat(tokenizer, c, add_generation_prompt=True)
                     for c in conversations[i:i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens,
                                 num_return_sequences=num_return_sequences,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, **kw)
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


def read_texts(path, field: str = "text") -> list[str]:
    """Texts to score: a ``.txt``/``.md`` file is one text; ``.jsonl``/``.json``/``.csv``/
    ``.parquet`` give one text per record, from ``field`` (errors name the file and line)."""
    from pathlib import Path

    from ..data import read_records
    from ..errors import DataError
    from ..io import read_text

    p = Path(path)
    if p.suffix.lower() in (".txt", ".md", ".text"):
        text = read_text(p)
        if not text.strip():
            raise DataError(f"{p}: file is empty")
        return [text]
    texts = []
    for where, rec in read_records(p):
        value = rec.get(field)
        if not isinstance(value, str):
            have = ", ".join(list(rec)[:8])
            raise DataError(f"{where}: no text field '{field}' (fields: {have}); pick one with --field")
        if value.strip():
            texts.append(value)
    if not texts:
        raise DataError(f"{p}: no non-empty '{field}' texts")
    return texts


def perplexity_file(path, model_id: str | None = None, window: int = 256, stride: int | None = None,
                    field: str = "text", max_tokens: int | None = None) -> dict:
    """Perplexity of a text file's contents under a model (what ``llmtech eval ppl`` prints)."""
    from .. import models
    from ..errors import ConfigError, DataError

    if window < 2 or (stride is not None and not 1 <= stride <= window):
        raise ConfigError(f"need --window >= 2 and 1 <= --stride <= --window (got {window}, {stride})")
    texts = read_texts(path, field)
    model_id = model_id or models.DEFAULT_LM
    model, tok = models.load_lm(model_id)
    try:
        stats = perplexity_stats(model, tok, texts, window, stride, max_tokens)
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None
    return {"data": str(path), "model": model_id, "texts": len(texts), **stats}
