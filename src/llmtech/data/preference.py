"""Preference pairs (DPO / reward model) and unpaired labels (KTO): loading with a problem report.

Accepted layouts, one per file (a record in another layout is a problem, never silently used):

* ``{"prompt", "chosen", "rejected"}`` — strings or message lists (TRL's layout);
* LLaMA-Factory's ``{"conversations": [...], "chosen": {"from", "value"}, "rejected": {...}}``;
* KTO: ``{"prompt", "completion", "label"}`` or LLaMA-Factory's ``{"messages": [...], "label"}``.

Every row comes back in one canonical, conversational form that TRL's trainers take as-is::

    {"prompt": [{"role": "user", "content": ...}], "chosen": [{"role": "assistant", ...}],
     "rejected": [...], "where": "file.jsonl:12", "meta": {"lang": ..., ...}}

Bad records (missing or empty fields, chosen == rejected, exact duplicates, a second layout in
the same file) are listed in ``problems`` with their ``file:line``; ``on_bad="error"`` raises on
the first one instead of skipping it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import DataError
from .formats import detect_format, normalise, read_records, split_records

OnBad = Literal["skip", "error"]
TRL_PAIR_KEYS = ("prompt", "chosen", "rejected")
TRL_KTO_KEYS = ("prompt", "completion", "label")


@dataclass
class Problem:
    where: str
    code: str  # missing_fields | wrong_format | mixed_formats | invalid | tie | duplicate
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class PreferenceData:
    """Rows that passed validation, and every record that did not (with the reason)."""

    source: str
    kind: Literal["pairs", "unpaired"]
    rows: list[dict]
    problems: list[Problem] = field(default_factory=list)
    n_read: int = 0

    def summary(self) -> dict:
        reasons: dict[str, int] = {}
        for p in self.problems:
            reasons[p.code] = reasons.get(p.code, 0) + 1
        return {"source": self.source, "read": self.n_read, "kept": len(self.rows),
                "skipped": len(self.problems), "skipped_by_reason": reasons}


def as_messages(value, role: str, system: str | None = None) -> list[dict]:
    """A prompt/response given as a string or message list -> a message list."""
    msgs = [{"role": role, "content": value}] if isinstance(value, str) else list(value)
    if system and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def text_of(messages: list[dict]) -> str:
    """The text of a response given as messages (their contents joined)."""
    return "\n".join(m["content"] for m in messages)


def prompt_text(messages: list[dict]) -> str:
    """The last user turn of a prompt (what the question was)."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else text_of(messages)


def _canonical_pair(rec: dict, where: str, system: str | None) -> dict:
    prompt = as_messages(rec["prompt"], "user", rec.get("system") or system)
    if prompt[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt must end with a user turn")
    chosen, rejected = as_messages(rec["chosen"], "assistant"), as_messages(rec["rejected"], "assistant")
    for key, msgs in (("chosen", chosen), ("rejected", rejected)):
        if any(m["role"] != "assistant" for m in msgs):
            raise DataError(f"{where}: '{key}' must hold assistant turns only")
        if not text_of(msgs).strip():
            raise DataError(f"{where}: field '{key}' is empty")
    if not any(m["content"].strip() for m in prompt if m["role"] == "user"):
        raise DataError(f"{where}: field 'prompt' is empty")
    meta = {k: v for k, v in rec.items() if k not in (*TRL_PAIR_KEYS, "system", "messages")}
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "where": where, "meta": meta}


def _canonical_unpaired(rec: dict, where: str, system: str | None) -> dict:
    prompt = as_messages(rec["prompt"], "user", rec.get("system") or system)
    completion = as_messages(rec["completion"], "assistant")
    if not any(m["content"].strip() for m in prompt if m["role"] == "user"):
        raise DataError(f"{where}: field 'prompt' is empty")
    if not text_of(completion).strip():
        raise DataError(f"{where}: field 'completion' is empty")
    meta = {k: v for k, v in rec.items() if k not in (*TRL_KTO_KEYS, "system", "messages")}
    return {"prompt": prompt, "completion": completion, "label": bool(rec["label"]),
            "where": where, "meta": meta}


def _load(source, kind: str, on_bad: OnBad, system: str | None, split: str,
          limit: int | None) -> PreferenceData:
    if on_bad not in ("skip", "error"):
        raise DataError(f"on_bad must be 'skip' or 'error', got {on_bad!r}")
    records = read_records(source, split=split)
    if not records:
        raise DataError(f"{source}: dataset is empty (no records)")
    if limit:
        records = records[:limit]
    want = "preference" if kind == "pairs" else "kto"
    out = PreferenceData(str(source), kind, [], [], len(records))
    seen: dict[tuple, str] = {}
    layout = None  # the first record's key set decides the file's layout

    def bad(where: str, code: str, reason: str) -> None:
        if on_bad == "error":
            raise DataError(f"{where}: {reason}")
        out.problems.append(Problem(where, code, reason))

    for where, rec in records:
        try:
            fmt = detect_format(rec)
        except DataError as e:
            bad(where, "missing_fields", str(e))
            continue
        shape = (fmt, "prompt" in rec)
        if fmt != want and not (kind == "unpaired" and fmt == "preference"):
            bad(where, "wrong_format", f"wrong format: a {fmt} record where {want} records were expected")
            continue
        if layout is None:
            layout = shape
        elif shape != layout:
            bad(where, "mixed_formats", f"mixed formats: this record is {shape[0]} with{'' if shape[1] else 'out'} "
                       f"'prompt', unlike the first record of the file")
            continue
        try:
            rec = normalise(where, rec, fmt)
            if fmt == "preference":
                pair = _canonical_pair(rec, where, system)
                rows = [pair] if kind == "pairs" else pairs_to_unpaired([pair])
            else:
                rows = [_canonical_unpaired(rec, where, system)]
        except DataError as e:
            bad(where, "invalid", str(e).removeprefix(f"{where}: "))
            continue
        if fmt == "preference" and text_of(pair["chosen"]).strip() == text_of(pair["rejected"]).strip():
            bad(where, "tie", "tie: chosen and rejected are identical")
            continue
        for row in rows:
            key = (repr(row["prompt"]), *(repr(row.get(k)) for k in ("chosen", "rejected", "completion", "label")))
            if key in seen:
                bad(where, "duplicate", f"duplicate of {seen[key]}")
                continue
            seen[key] = where
            out.rows.append(row)
    if not out.rows:
        first = f"; first problem: {out.problems[0]}" if out.problems else ""
        raise DataError(f"{source}: no usable {'preference pairs' if kind == 'pairs' else 'KTO rows'}"
                        f" ({len(out.problems)} skipped){first}")
    return out


def load_pairs(source: str | Path, on_bad: OnBad = "skip", system: str | None = None,
               split: str = "train", limit: int | None = None) -> PreferenceData:
    """Preference pairs in canonical form, plus the problems found (file:line + reason)."""
    return _load(source, "pairs", on_bad, system, split, limit)


def load_unpaired(source: str | Path, on_bad: OnBad = "skip", system: str | None = None,
                  split: str = "train", limit: int | None = None) -> PreferenceData:
    """KTO rows (prompt, completion, label). A file of pairs is converted: chosen -> desirable
    (label true), rejected -> undesirable (label false)."""
    return _load(source, "unpaired", on_bad, system, split, limit)


def pairs_to_unpaired(rows: list[dict]) -> list[dict]:
    """Canonical pairs -> KTO rows: each pair gives one desirable and one undesirable example."""
    return [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen", "where": r["where"],
             "meta": r.get("meta", {})} for r in rows for k in ("chosen", "rejected")]


def trl_rows(rows: list[dict]) -> list[dict]:
    """The columns TRL's trainers read (conversational prompt/chosen/rejected or prompt/completion/label)."""
    keys = TRL_KTO_KEYS if rows and "completion" in rows[0] else TRL_PAIR_KEYS
    return [{k: r[k] for k in keys} for r in rows]


def split_pairs(rows: list[dict], eval_fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Held-out split that keeps every prompt on one side (no prompt in both train and eval)."""
    by_prompt: dict[str, list[dict]] = {}
    for r in rows:
        by_prompt.setdefault(repr(r["prompt"]), []).append(r)
    groups = list(by_prompt.values())
    train_g, eval_g = split_records(groups, eval_fraction, seed)
    return [r for g in train_g for r in g], [r for g in eval_g for r in g]


def length_stats(rows: list[dict]) -> dict:
    """Length bias of a pair set: how often the chosen answer is the longer one, and by how much."""
    if not rows:
        return {"pairs": 0}
    lc = [len(text_of(r["chosen"])) for r in rows]
    lr = [len(text_of(r["rejected"])) for r in rows]
    longer = sum(a > b for a, b in zip(lc, lr))
    return {"pairs": len(rows), "chosen_longer_share": longer / len(rows),
            "mean_chars_chosen": sum(lc) / len(rows), "mean_chars_rejected": sum(lr) / len(rows),
            "mean_length_ratio": sum(a / max(b, 1) for a, b in zip(lc, lr)) / len(rows)}
