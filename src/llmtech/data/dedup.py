"""Deduplication of instruction data: exact (hash of normalised text) and near (MinHash LSH).

- ``exact_dedup``: two records are duplicates when their *canonical* text is identical:
  NFKC, case-folded, with all whitespace and punctuation removed, so ``"Hello, world!"`` and
  ``"hello world"`` collide. The canonical text is hashed with SHA-1.
- ``near_dedup``: each record becomes a set of character n-grams (shingles) of its canonical
  text, so Chinese works without a word segmenter. ``datasketch`` MinHash signatures
  (``num_perm`` permutations, fixed seed -> deterministic) go into an LSH index that proposes
  candidates whose Jaccard similarity is likely above ``threshold - 0.15`` (LSH banding alone
  misses pairs just above its threshold); each candidate is then confirmed with the exact
  Jaccard of the two shingle sets, so only pairs at or above ``threshold`` are removed.

Both keep the first occurrence and return the removed records as ``(index, duplicate_of)``
pairs, indices into the list passed in. ``clean_and_dedup`` chains ``clean_records`` and both
dedup passes (what ``llmtech data clean`` runs).
"""

from __future__ import annotations

import hashlib
import logging
import unicodedata
from typing import Literal

from pydantic import Field

from ..config import StrictModel
from ..errors import DataError
from .clean import CleanConfig, clean_records, prompt_text, record_text

log = logging.getLogger(__name__)


def canonical_text(text: str) -> str:
    """NFKC + casefold, whitespace and punctuation removed: the form dedup compares."""
    t = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in t if not ch.isspace() and not unicodedata.category(ch).startswith("P"))


def _key_text(rec: dict, on: str) -> str:
    return prompt_text(rec) if on == "prompt" else record_text(rec)


def shingles(text: str, ngram: int = 3) -> set[str]:
    """Character n-grams of the canonical text (the whole text when it is shorter than n)."""
    t = canonical_text(text)
    if len(t) <= ngram:
        return {t} if t else set()
    return {t[i:i + ngram] for i in range(len(t) - ngram + 1)}


def jaccard(a: str, b: str, ngram: int = 3) -> float:
    """Exact Jaccard similarity of two texts' shingle sets."""
    sa, sb = shingles(a, ngram), shingles(b, ngram)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


CANDIDATE_MARGIN = 0.15


def exact_dedup(records: list[dict], on: str = "all") -> tuple[list[dict], list[tuple[int, int]]]:
    """Drop records whose canonical text was seen before; returns ``(kept, [(index, first)])``."""
    seen: dict[str, int] = {}
    kept, removed = [], []
    for i, rec in enumerate(records):
        h = hashlib.sha1(canonical_text(_key_text(rec, on)).encode("utf-8")).hexdigest()
        if h in seen:
            removed.append((i, seen[h]))
            continue
        seen[h] = i
        kept.append(rec)
    return kept, removed


def near_dedup(records: list[dict], threshold: float = 0.8, num_perm: int = 128, ngram: int = 3,
               seed: int = 1, on: str = "all") -> tuple[list[dict], list[tuple[int, int]]]:
    """Drop records whose shingle Jaccard with an earlier kept record is >= ``threshold``.

    Returns ``(kept, [(index, duplicate_of)])``; ``duplicate_of`` is the earliest kept record
    that matches. Deterministic for a given ``seed``.
    """
    from datasketch import MinHash, MinHashLSH  # imported here: it takes ~0.4 s

    if not 0.0 < threshold <= 1.0:
        raise DataError(f"near-dup threshold must be in (0, 1], got {threshold}")
    # LSH banding misses some pairs just above its threshold, so candidates are collected at a
    # lower threshold and every candidate is confirmed with the exact Jaccard below.
    lsh = MinHashLSH(threshold=max(0.05, threshold - CANDIDATE_MARGIN), num_perm=num_perm)
    kept_sets: dict[int, set[str]] = {}
    kept, removed = [], []
    for i, rec in enumerate(records):
        sh = shingles(_key_text(rec, on), ngram)
        if not sh:
            kept.append(rec)
            continue
        m = MinHash(num_perm=num_perm, seed=seed)
        m.update_batch([s.encode("utf-8") for s in sorted(sh)])
        match = None
        for j in sorted(lsh.query(m)):
            other = kept_sets[j]
            if len(sh & other) / len(sh | other) >= threshold:
                match = j
                break
        if match is not None:
            removed.append((i, match))
            continue
        lsh.insert(i, m)
        kept_sets[i] = sh
        kept.append(rec)
    return kept, removed


class DedupConfig(StrictModel):
    """Settings of the dedup passes (also keys of ``llmtech data clean``)."""

    dedup_exact: bool = True
    dedup_near: bool = True
    near_threshold: float = Field(0.8, gt=0, le=1)  # Jaccard similarity of character n-gram sets
    num_perm: int = Field(128, ge=16)               # MinHash permutations
    ngram: int = Field(3, ge=1)                     # shingle size in characters
    minhash_seed: int = 1
    dedup_on: Literal["all", "prompt"] = "all"   # compare whole records or only the prompts


class CleanDedupConfig(CleanConfig, DedupConfig):
    """Everything ``llmtech data clean`` does: cleaning rules, then exact and near dedup."""


def dedup_records(records: list[dict], cfg: DedupConfig | None = None
                  ) -> tuple[list[dict], list[tuple[int, int]], list[tuple[int, int]]]:
    """Exact then near dedup; returns ``(kept, exact_pairs, near_pairs)``, indices into ``records``."""
    cfg = cfg or DedupConfig()
    idx = list(range(len(records)))
    exact_pairs: list[tuple[int, int]] = []
    near_pairs: list[tuple[int, int]] = []
    if cfg.dedup_exact:
        _, exact_pairs = exact_dedup(records, cfg.dedup_on)
        gone = {i for i, _ in exact_pairs}
        idx = [i for i in idx if i not in gone]
    if cfg.dedup_near:
        _, pairs = near_dedup([records[i] for i in idx], cfg.near_threshold, cfg.num_perm,
                              cfg.ngram, cfg.minhash_seed, cfg.dedup_on)
        near_pairs = [(idx[a], idx[b]) for a, b in pairs]
        gone = {i for i, _ in near_pairs}
        idx = [i for i in idx if i not in gone]
    return [records[i] for i in idx], exact_pairs, near_pairs


def clean_and_dedup(records: list[dict], cfg: CleanDedupConfig | None = None,
                    trace: list | None = None) -> tuple[list[dict], dict[str, int]]:
    """``clean_records`` then ``dedup_records``; returns ``(kept, report)``.

    The report has every cleaning rule's count plus ``removed_exact_dup``,
    ``removed_near_dup`` and ``records_out``. Pass a list as ``trace`` to receive
    ``(index, rule, duplicate_of)`` for every removed record (indices into ``records``;
    ``duplicate_of`` is None for cleaning rules).
    """
    cfg = cfg or CleanDedupConfig()
    clean_trace: list = []
    cleaned, report = clean_records(records, cfg, trace=clean_trace)
    dropped = {i for i, _ in clean_trace}
    orig = [i for i in range(len(records)) if i not in dropped]  # original index of cleaned[k]
    kept, exact_pairs, near_pairs = dedup_records(cleaned, cfg)
    report["removed_exact_dup"] = len(exact_pairs)
    report["removed_near_dup"] = len(near_pairs)
    report["records_out"] = len(kept)
    if trace is not None:
        trace += [(i, rule, None) for i, rule in clean_trace]
        trace += [(orig[a], "removed_exact_dup", orig[b]) for a, b in exact_pairs]
        trace += [(orig[a], "removed_near_dup", orig[b]) for a, b in near_pairs]
        trace.sort()
    log.info("clean + dedup: %d -> %d records", len(records), len(kept))
    return kept, report
