"""Hybrid fusion of ranked lists (BM25 + dense, or any number of retrievers).

- ``rrf``: reciprocal rank fusion, score(d) = Σ_i w_i / (k + rank_i(d)) (Cormack et al., 2009;
  k = 60 in the paper). Uses ranks only, so it ignores how confident each retriever is.
- ``weighted``: Σ_i w_i · norm_i(score_i(d)) with min-max or z-score normalisation per list; a
  document missing from a list gets that list's lowest normalised value.

Both return one fused list of ``Hit`` best first. Weights of 0 drop a list entirely, which is how
the language guard below protects a strong retriever from a weak one.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Literal, Sequence

import numpy as np

from .stores.base import Hit

Norm = Literal["minmax", "zscore"]


def rrf(lists: Sequence[Sequence[Hit]], k: float = 60.0,
        weights: Sequence[float] | None = None, top: int | None = None) -> list[Hit]:
    weights = weights or [1.0] * len(lists)
    fused: dict[str, float] = defaultdict(float)
    for hits, w in zip(lists, weights):
        if w == 0:
            continue
        for rank, h in enumerate(hits, 1):
            fused[h.id] += w / (k + rank)
    return _ranked(fused, top)


def normalise(scores: np.ndarray, norm: Norm) -> np.ndarray:
    if len(scores) == 0:
        return scores
    if norm == "minmax":
        lo, hi = scores.min(), scores.max()
        return (scores - lo) / (hi - lo) if hi > lo else np.ones_like(scores)
    if norm == "zscore":
        sd = scores.std()
        # one hit (or all tied): nothing to standardise; 1 keeps them above absent documents
        return (scores - scores.mean()) / sd if sd > 0 else np.ones_like(scores)
    raise ValueError(f"norm must be 'minmax' or 'zscore', got {norm!r}")


def weighted(lists: Sequence[Sequence[Hit]], weights: Sequence[float], norm: Norm = "minmax",
             top: int | None = None) -> list[Hit]:
    if len(weights) != len(lists):
        raise ValueError(f"{len(weights)} weights for {len(lists)} lists")
    normed = []
    for hits in lists:
        raw = np.array([h.score for h in hits], dtype=np.float64)
        s = normalise(raw, norm)
        degenerate = len(raw) < 2 or raw.max() == raw.min()
        floor = 0.0 if degenerate else float(s.min())  # a degenerate list's hits stay above it
        normed.append(({h.id: float(v) for h, v in zip(hits, s)}, floor))
    # candidates come only from lists that count (weight 0 = the list is ignored)
    ids = {d for (scores, _), w in zip(normed, weights) if w for d in scores}
    fused = {d: sum(w * scores.get(d, floor) for (scores, floor), w in zip(normed, weights) if w)
             for d in ids}
    return _ranked(fused, top)


def _ranked(scores: dict[str, float], top: int | None) -> list[Hit]:
    out = sorted((Hit(d, s) for d, s in scores.items()), key=lambda h: (-h.score, h.id))
    return out[:top] if top else out
