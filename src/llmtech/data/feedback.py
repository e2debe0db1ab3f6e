"""User feedback on a deployed assistant -> preference pairs for the next alignment round.

Two JSON Lines files make up the loop:

* the **message log** the service writes, one record per answer it gave::

      {"message_id": "m0001", "question": "...", "prompt": [{"role": "user", ...}, ...],
       "answer": "...", "strategy": "rag", ...}

  ``prompt`` is the exact chat the model saw (system turn, worked examples, retrieved context),
  so a pair built from it trains the model on the situation it was really in;
* the **feedback log**, one record per rating::

      {"message_id": "m0001", "rating": "down", "correction": "The answer is 7 days."}

``load_feedback`` validates every feedback record against the message log and keeps the good
ones; each bad one is listed with its ``file:line`` and a reason code:

==================== ===============================================================
``missing_message_id`` no ``message_id`` (or not a string)
``unknown_message_id`` the id is not in the message log
``duplicate``          a second rating for a message already rated in this file
``missing_rating``     no ``rating``
``invalid_rating``     ``rating`` is not ``up`` / ``down``
``correction_on_up``   a thumbs-up that carries a correction (contradictory)
``invalid_correction`` ``correction`` is not a non-empty string
``same_as_answer``     the correction repeats the model's answer (nothing to learn)
==================== ===============================================================

A :class:`~llmtech.errors.DataError` is raised only when the file cannot be read (missing,
empty, not UTF-8, a malformed JSON line) or when no record survives. ``to_pairs`` turns the
thumbs-down records that carry a correction into preference pairs (chosen = the correction,
rejected = the model's answer) in the layout ``llmtech.data.preference.load_pairs`` reads.

``simulate_feedback`` stands in for users where there are none (a course lab): thumbs-up when
the answer contains the gold answer, otherwise thumbs-down with a correction written from the
gold answer in a fixed template. Records it writes say ``"simulated": true``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from ..errors import DataError
from ..io import atomic_write_jsonl, existing_file
from .formats import read_records

RATINGS = ("up", "down")
MESSAGE_FIELDS = ("message_id", "question", "prompt", "answer", "strategy")
REASONS = ("missing_message_id", "unknown_message_id", "duplicate", "missing_rating",
           "invalid_rating", "correction_on_up", "invalid_correction", "same_as_answer")

# The fixed correction template of simulated feedback, per question language.
CORRECTION_TEMPLATE = {"zh": "您好，答案是：{gold}。", "en": "Hello, the answer is: {gold}."}


@dataclass
class Rejected:
    where: str   # file:line
    code: str    # one of REASONS
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class FeedbackData:
    """Feedback records that passed validation, and every one that did not (with the reason)."""

    source: str
    records: list[dict]
    rejected: list[Rejected] = field(default_factory=list)
    n_read: int = 0

    def by_reason(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rejected:
            out[r.code] = out.get(r.code, 0) + 1
        return out

    def summary(self) -> dict:
        up = sum(r["rating"] == "up" for r in self.records)
        return {"source": self.source, "read": self.n_read, "kept": len(self.records),
                "rejected": len(self.rejected), "up": up, "down": len(self.records) - up,
                "rejected_by_reason": self.by_reason()}


# --------------------------------------------------------------------------- reading

def _utf8_only(path: Path) -> None:
    """Feedback and message logs are written by the service as UTF-8; anything else (a GBK
    export re-saved by hand, say) is refused with the line where decoding fails."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x} at offset "
                        f"{e.start}); feedback logs must be UTF-8 — re-save the file as UTF-8") from None


def _records(source: str | Path, what: str) -> list[tuple[str, dict]]:
    path = existing_file(source, what)
    _utf8_only(path)
    return read_records(path)


def load_messages(source: str | Path) -> dict[str, dict]:
    """The message log as ``{message_id: record}``. It is the service's own output, so any
    malformed record is an error (naming file:line), not a skip."""
    out: dict[str, dict] = {}
    for where, rec in _records(source, "message log"):
        missing = [k for k in MESSAGE_FIELDS if k not in rec]
        if missing:
            raise DataError(f"{where}: message record without field(s) {missing}")
        prompt = rec["prompt"]
        if not (isinstance(prompt, list) and prompt and all(
                isinstance(m, dict) and {"role", "content"} <= set(m) for m in prompt)
                and prompt[-1]["role"] == "user"):
            raise DataError(f"{where}: 'prompt' must be the chat the model saw: a list of "
                            "{role, content} messages ending with the user turn")
        mid = str(rec["message_id"])
        if mid in out:
            raise DataError(f"{where}: message_id {mid!r} appears twice in the message log")
        out[mid] = {**rec, "message_id": mid, "where": where}
    return out


def _as_index(messages: Mapping[str, dict] | Sequence[dict]) -> Mapping[str, dict]:
    if isinstance(messages, Mapping):
        return messages
    return {str(m["message_id"]): m for m in messages}


def _norm(text: str) -> str:
    return re.sub(r"\s+", "", text).lower()


def validate_feedback(records: Iterable[tuple[str, dict]],
                      messages: Mapping[str, dict] | Sequence[dict]) -> tuple[list[dict], list[Rejected]]:
    """Check ``(where, record)`` pairs against the message log (see module docstring)."""
    index = _as_index(messages)
    kept: list[dict] = []
    rejected: list[Rejected] = []
    seen: dict[str, str] = {}
    for where, rec in records:
        def bad(code: str, reason: str) -> None:
            rejected.append(Rejected(where, code, reason))

        mid = rec.get("message_id")
        if not isinstance(mid, (str, int)) or isinstance(mid, bool) or str(mid).strip() == "":
            bad("missing_message_id", "missing field 'message_id'")
            continue
        mid = str(mid)
        if mid not in index:
            bad("unknown_message_id", f"unknown message_id {mid!r} (not in the message log)")
            continue
        rating = rec.get("rating")
        if rating is None:
            bad("missing_rating", "missing field 'rating' (up or down)")
            continue
        if not isinstance(rating, str) or rating.strip().lower() not in RATINGS:
            bad("invalid_rating", f"rating must be 'up' or 'down', got {rating!r}")
            continue
        rating = rating.strip().lower()
        correction = rec.get("correction")
        if correction is not None and rating == "up":
            bad("correction_on_up", "a thumbs-up must not carry a correction")
            continue
        if correction is not None and (not isinstance(correction, str) or not correction.strip()):
            bad("invalid_correction", f"correction must be a non-empty string, got {correction!r}")
            continue
        if correction is not None and _norm(correction) == _norm(str(index[mid]["answer"])):
            bad("same_as_answer", "the correction repeats the model's answer")
            continue
        if mid in seen:
            bad("duplicate", f"message {mid!r} was already rated at {seen[mid]}")
            continue
        seen[mid] = where
        kept.append({**rec, "message_id": mid, "rating": rating,
                     "correction": correction.strip() if correction else None, "where": where})
    return kept, rejected


def load_feedback(source: str | Path, messages: Mapping[str, dict] | Sequence[dict]) -> FeedbackData:
    """Read and validate a feedback file against the message log (``{id: record}`` or a list)."""
    records = _records(source, "feedback file")
    kept, rejected = validate_feedback(records, messages)
    data = FeedbackData(str(source), kept, rejected, len(records))
    if not kept:
        first = f"; first: {rejected[0]}" if rejected else ""
        raise DataError(f"{source}: no valid feedback records ({len(rejected)} rejected{first})")
    return data


# --------------------------------------------------------------------------- pairs

def to_pairs(feedback: FeedbackData | Sequence[dict],
             messages: Mapping[str, dict] | Sequence[dict]) -> list[dict]:
    """Preference pairs from thumbs-down records with a correction: ``prompt`` = the exact chat
    the model saw, ``chosen`` = the correction, ``rejected`` = the model's answer. A thumbs-up,
    a thumbs-down without a correction, or an empty answer gives no pair (there is nothing to
    compare; the preference format needs two non-empty answers)."""
    index = _as_index(messages)
    rows = feedback.records if isinstance(feedback, FeedbackData) else feedback
    pairs = []
    for fb in rows:
        if fb["rating"] != "down" or not fb.get("correction"):
            continue
        msg = index[fb["message_id"]]
        if not str(msg["answer"]).strip():
            continue
        pairs.append({"prompt": [dict(role=m["role"], content=m["content"]) for m in msg["prompt"]],
                      "chosen": fb["correction"], "rejected": msg["answer"],
                      "message_id": fb["message_id"], "strategy": msg.get("strategy"),
                      "lang": msg.get("lang"), "source": "feedback"})
    return pairs


def write_pairs(path: str | Path, pairs: Sequence[dict]) -> Path:
    """Write pairs as JSON Lines (atomically); ``load_pairs`` reads the file back."""
    if not pairs:
        raise DataError(f"{path}: no preference pairs to write (no thumbs-down with a correction)")
    return atomic_write_jsonl(path, pairs)


# --------------------------------------------------------------------------- simulated users

def contains_gold(answer: str, gold: str) -> bool:
    """The short gold answer appears in the answer (whitespace and case ignored)."""
    return bool(gold) and _norm(gold) in _norm(answer)


def simulate_feedback(messages: Sequence[dict], gold: Mapping[str, str],
                      judge: Callable[[str, str], bool] = contains_gold,
                      template: Mapping[str, str] = CORRECTION_TEMPLATE) -> list[dict]:
    """Simulated users: thumbs-up when ``judge(answer, gold)`` holds, else thumbs-down with a
    correction from ``template[lang]``. ``gold`` maps message id -> gold short answer; a
    message with no gold answer gets no feedback. Every record is marked ``simulated``."""
    out = []
    for m in messages:
        ref = gold.get(m["message_id"], "")
        if not ref:
            continue
        if judge(m["answer"], ref):
            out.append({"message_id": m["message_id"], "rating": "up", "simulated": True})
        else:
            lang = m.get("lang") if m.get("lang") in template else "en"
            out.append({"message_id": m["message_id"], "rating": "down",
                        "correction": template[lang].format(gold=ref), "simulated": True})
    return out
