"""Policy-side helpers for on-policy RL on chat LMs: sampling, log-probs, KL, evaluation.

A *rollout* is a batch of prompts (chat message lists) with one sampled response each::

    prompt_ids    [B, P]  left-padded, so every response starts at column P
    response_ids  [B, R]  what the policy generated, padded on the right
    response_mask [B, R]  1 on the response tokens up to and including the first EOS

Column ``P - 1 + t`` of the concatenated sequence is the position whose next-token
distribution produced response token ``t``; every per-token quantity here (log-probs, values,
KL) is indexed by ``t``. Positions are counted from the first real token
(``position_ids = cumsum(attention_mask) - 1``), the same rule ``generate`` uses with left
padding, so a re-scored rollout gets the log-probs it was sampled with.

``evaluate_policy`` is the one measurement the PPO and GRPO runs and the labs share: mean
reward-model score of the policy's (greedy) replies, KL to the reference, reply length.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import DataError
from ..models import render_chat

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- prompts

def load_prompts(path: str | Path, limit: int | None = None, system: str | None = None) -> list[list[dict]]:
    """Chat prompts (message lists ending with a user turn) from a data file, deduplicated in
    order. Preference and KTO files give their ``prompt``; SFT files (alpaca / sharegpt) give the
    conversation without its last (assistant) message."""
    from ..data.formats import detect_format, load, read_records, to_messages
    from ..data.preference import load_pairs, load_unpaired

    records = read_records(path)
    if not records:
        raise DataError(f"{path}: dataset is empty (no records)")
    where, first = records[0]
    try:
        fmt = detect_format(first)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    if fmt == "preference":
        prompts = [r["prompt"] for r in load_pairs(path, system=system).rows]
    elif fmt == "kto":
        prompts = [r["prompt"] for r in load_unpaired(path, system=system).rows]
    else:
        prompts = []
        for r in load(path, fmt=fmt):
            msgs = to_messages(r, system)
            if msgs[-1]["role"] == "assistant":
                msgs = msgs[:-1]
            if msgs and msgs[-1]["role"] == "user":
                prompts.append(msgs)
    out, seen = [], set()
    for p in prompts:
        key = repr(p)
        if key not in seen:
            seen.add(key)
            out.append([dict(m) for m in p])
        if limit and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{path}: no prompts (no record ends with a user turn)")
    return out


# --------------------------------------------------------------------------- rollouts

@dataclass
class Rollout:
    prompts: list[list[dict]]
    prompt_ids: torch.Tensor      # [B, P] left-padded
    prompt_mask: torch.Tensor     # [B, P]
    response_ids: torch.Tensor    # [B, R]
    response_mask: torch.Tensor   # [B, R] float, 1 up to and including the first EOS
    texts: list[str] = field(default_factory=list)
    ended: torch.Tensor | None = None  # [B] bool: the response ended with EOS (not truncated)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], 1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask.long()], 1)

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1)

    def select(self, idx) -> "Rollout":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Rollout([self.prompts[i] for i in idx.tolist()], self.prompt_ids[idx],
                       self.prompt_mask[idx], self.response_ids[idx], self.response_mask[idx],
                       [self.texts[i] for i in idx.tolist()] if self.texts else [],
                       self.ended[idx] if self.ended is not None else None)


def eos_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a reply: the tokenizer's EOS and the model's generation EOS."""
    ids = [tokenizer.eos_token_id]
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += gen if isinstance(gen, list) else ([gen] if gen is not None else [])
    return sorted({i for i in ids if i is not None})


def response_mask_after_eos(response_ids: torch.Tensor, eos: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask (float) of the tokens up to and including the first EOS of each row; and whether
    the row has an EOS at all (a row without one is a truncated reply: all its tokens count)."""
    is_eos = torch.isin(response_ids, torch.tensor(eos, device=response_ids.device))
    # number of EOS tokens strictly before each position
    before = torch.cumsum(is_eos.long(), 1) - is_eos.long()
    return (before == 0).float(), is_eos.any(1)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


@contextlib.contextmanager
def left_padding(tokenizer):
    old = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = old


@torch.no_grad()
def sample(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 48, greedy: bool = False,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, batch_size: int = 16,
           generator_seed: int | None = None) -> Rollout:
    """Generate one reply per chat prompt (left padding); returns a :class:`Rollout`.

    ``generator_seed`` makes the sampling reproducible without touching the global RNG's
    sequence (it is saved and restored around the call).
    """
    if not prompts:
        raise ValueError("sample() needs at least one prompt")
    was_training = model.training
    model.eval()
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    # An explicit config: the model's own defaults (repetition penalty, top-k...) would make
    # the sampling distribution differ from the one whose log-probs PPO optimises.
    from transformers import GenerationConfig

    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                               **(dict(do_sample=False) if greedy else dict(
                                   do_sample=True, temperature=temperature, top_k=top_k,
                                   top_p=top_p)))
    parts = []
    rng_state = torch.get_rng_state() if generator_seed is not None else None
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    try:
        with left_padding(tokenizer):
            for i in range(0, len(prompts), batch_size):
                chunk = prompts[i:i + batch_size]
                texts = [render_chat(tokenizer, p, add_generation_prompt=True) for p in chunk]
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
                enc = enc.to(model.device)
                gen = model.generate(**enc, generation_config=gen_cfg)
                parts.append((enc["input_ids"].cpu(), enc["attention_mask"].cpu(),
                              gen[:, enc["input_ids"].shape[1]:].cpu()))
    finally:
        if rng_state is not None:
            torch.set_rng_state(rng_state)
        model.train(was_training)
    P = max(p.shape[1] for p, _, _ in parts)
    R = max(r.shape[1] for _, _, r in parts)
    prompt_ids = torch.cat([_pad_left(p, P, pad) for p, _, _ in parts])
    prompt_mask = torch.cat([_pad_left(m, P, 0) for _, m, _ in parts])
    response_ids = torch.cat([_pad_right(r, R, pad) for _, _, r in parts])
    mask, ended = response_mask_after_eos(response_ids, eos)
    response_ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad))
    texts = [tokenizer.decode(row[m.bool()], skip_special_tokens=True).strip()
             for row, m in zip(response_ids, mask)]
    return Rollout(list(prompts), prompt_ids, prompt_mask, response_ids, mask, texts, ended)


def _pad_left(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    if x.shape[1] == width:
        return x
    return torch.cat([torch.full((x.shape[0], width - x.shape[1]), value, dtype=x.dtype), x], 1)


def _pad_right(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    if x.shape[1] == width:
        return x
    return torch.cat([x, torch.full((x.shape[0], width - x.shape[1]), value, dtype=x.dtype)], 1)


# --------------------------------------------------------------------------- log-probs

def forward_response(model, rollout: Rollout, temperature: float = 1.0, hidden: bool = False):
    """Run the model on prompt + response; return the logits that predict each response token
    ``[B, R, V]`` (divided by ``temperature``) and, with ``hidden=True``, the last hidden state
    at the same positions ``[B, R, H]``."""
    ids = rollout.input_ids.to(model.device)
    att = rollout.attention_mask.to(model.device)
    P, R = rollout.prompt_ids.shape[1], rollout.response_ids.shape[1]
    out = model(input_ids=ids, attention_mask=att, position_ids=position_ids(att),
                output_hidden_states=hidden, logits_to_keep=R + 1, use_cache=False)
    logits = out.logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    h = out.hidden_states[-1][:, P - 1:P + R - 1] if hidden else None
    return logits, h


def gather_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[ids] along the last axis."""
    return torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(z) − Σ softmax(z)·z per position."""
    p = torch.softmax(logits, -1)
    return torch.logsumexp(logits, -1) - (p * logits).sum(-1)


@torch.no_grad()
def response_logprobs(model, rollout: Rollout, temperature: float = 1.0,
                      batch_size: int = 16) -> torch.Tensor:
    """Per-token log π(y_t | x, y_<t) of the rollout's responses ``[B, R]`` (0 where masked)."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(rollout.prompts), batch_size):
            part = rollout.select(range(i, min(i + batch_size, len(rollout.prompts))))
            logits, _ = forward_response(model, part, temperature)
            out.append(gather_logprobs(logits, part.response_ids.to(logits.device)).cpu()
                       * part.response_mask)
    finally:
        model.train(was_training)
    return torch.cat(out)


@contextlib.contextmanager
def reference_of(policy, ref=None):
    """The reference model: ``ref`` itself, or the PEFT ``policy`` with its adapter disabled."""
    if ref is not None:
        yield ref
        return
    if not hasattr(policy, "disable_adapter"):
        raise ValueError("ref=None needs a PEFT policy (its adapter disabled is the reference); "
                         "pass the reference model explicitly")
    with policy.disable_adapter():
        yield policy


def sequence_kl(policy, ref, tokenizer, prompts: list[list[dict]] | None = None,
                rollout: Rollout | None = None, max_new_tokens: int = 48, temperature: float = 1.0,
                seed: int = 0) -> dict:
    """KL(π‖π_ref) over whole replies, estimated on replies sampled from the policy:
    mean over sequences of Σ_t (log π(y_t) − log π_ref(y_t)).

    ``ref=None``: the PEFT policy with its adapter disabled. Pass ``rollout`` to score replies
    already sampled (then ``prompts`` is not needed). Returns ``{"kl", "kl_per_token"}``.
    """
    if rollout is None:
        rollout = sample(policy, tokenizer, prompts, max_new_tokens, greedy=False,
                         temperature=temperature, generator_seed=seed)
    lp = response_logprobs(policy, rollout, temperature)
    with reference_of(policy, ref) as r:
        lp_ref = response_logprobs(r, rollout, temperature)
    per_seq = ((lp - lp_ref) * rollout.response_mask).sum(1)
    return {"kl": float(per_seq.mean()),
            "kl_per_token": float(per_seq.sum() / rollout.response_mask.sum().clamp(min=1))}


# --------------------------------------------------------------------------- evaluation

def evaluate_policy(policy, tokenizer, prompts: list[list[dict]], scorer, ref=None,
                    max_new_tokens: int = 48, greedy: bool = True, kl: bool = True,
                    kl_temperature: float = 1.0, seed: int = 0, batch_size: int = 16) -> dict:
    """Score the policy's replies to ``prompts`` with the reward model.

    Returns ``score`` (mean RM score of the replies, greedy by default), ``scores`` (per
    prompt), ``kl`` (sequence KL to the reference on replies *sampled* at ``kl_temperature``
    with a fixed seed: the Monte-Carlo estimate of KL(π‖π_ref), unbiased only on sampled
    replies, which is why greedy replies are not used for it), ``response_len`` (mean tokens),
    ``ended_share`` (share of replies that ended with EOS) and ``responses``.
    """
    ro = sample(policy, tokenizer, prompts, max_new_tokens, greedy=greedy, batch_size=batch_size,
                temperature=kl_temperature, generator_seed=seed)
    scores = scorer.score(prompts, ro.texts)
    out = {"score": float(scores.mean()), "scores": scores.tolist(),
           "response_len": float(ro.lengths.float().mean()),
           "ended_share": float(ro.ended.float().mean()), "responses": ro.texts}
    if kl:
        if ref is None and not hasattr(policy, "disable_adapter"):
            out["kl"] = 0.0  # no adapter, no reference: the policy is its own reference
        else:
            out.update(sequence_kl(policy, ref, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                   temperature=kl_temperature, seed=seed + 1))
    return out


def win_rate(scores_a, scores_b) -> float:
    """Share of prompts where A's score beats B's (ties count half)."""
    a = torch.as_tensor(scores_a, dtype=torch.float64).flatten()
    b = torch.as_tensor(scores_b, dtype=torch.float64).flatten()
    if a.numel() != b.numel():
        raise ValueError(f"{a.numel()} scores vs {b.numel()}")
    if a.numel() == 0:
        return math.nan
    return float(((a > b).double() + 0.5 * (a == b).double()).mean())


def before_after(prompts: list[list[dict]], before: dict | None, after: dict) -> tuple[dict, list[dict]]:
    """Flat result fields and per-prompt samples from two ``evaluate_policy`` results (the SFT
    policy ``before`` training, may be None, and the trained policy ``after``)."""
    fields = {"eval_score_after": after["score"], "eval_kl_after": after.get("kl"),
              "eval_response_len_after": after["response_len"],
              "eval_ended_share_after": after["ended_share"]}
    samples = [{"prompt": p[-1]["content"], "after": a, "score_after": sa}
               for p, a, sa in zip(prompts, after["responses"], after["scores"])]
    if before is not None:
        fields.update(eval_score_before=before["score"], eval_response_len_before=before["response_len"],
                      eval_ended_share_before=before["ended_share"],
                      eval_score_gain=after["score"] - before["score"],
                      eval_win_rate=win_rate(after["scores"], before["scores"]))
        for row, b, sb in zip(samples, before["responses"], before["scores"]):
            row.update(before=b, score_before=sb)
    return fields, samples
