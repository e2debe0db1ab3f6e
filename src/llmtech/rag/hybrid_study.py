"""A hybrid-retrieval study done the honest way: tune on dev queries, report on held-out ones.

The steps, each a small function:

1. ``subsample`` — a deterministic subset of a BEIR dataset (queries first, then every relevant
   document of those queries plus random distractors), so a quick run stays quick without
   making the task easier than "find the relevant documents among n_docs".
2. ``split_queries`` — a seeded, order-independent split of the query ids into dev / held-out.
3. ``candidates`` — BM25 and dense top-``depth`` lists, computed ONCE per query. Every fusion
   setting afterwards only re-combines these cached lists, so a sweep of dozens of settings
   costs milliseconds.
4. ``sweep`` — every setting (RRF for each k; weighted fusion for each normalisation and dense
   weight) scored on dev AND held-out; ``select`` picks the best setting by its *dev* score
   only (ties: the first in sweep order), and its held-out score is what gets reported.

A setting is written as a ``Setting``: method ``bm25`` / ``dense`` (single retrievers),
``rrf`` (param = k) or ``minmax`` / ``zscore`` (param = dense weight; BM25 gets 1 - w).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..errors import ConfigError
from . import fusion
from .beir import BeirData
from .metrics import evaluate_run
from .stores.base import Hit

log = logging.getLogger(__name__)

NORMS = ("minmax", "zscore")
Lists = dict[str, dict[str, list[Hit]]]   # retriever name -> query id -> ranked hits


@dataclass(frozen=True)
class Setting:
    method: str              # bm25 | dense | rrf | minmax | zscore
    param: float | None = None

    @property
    def label(self) -> str:
        if self.method == "rrf":
            return f"rrf k={self.param:g}"
        if self.method in NORMS:
            return f"{self.method} w_dense={self.param:.1f}"
        return self.method


def check_sweep(rrf_ks: Sequence[float], weights: Sequence[float], norms: Sequence[str]) -> None:
    """Reject sweeps that cannot be run, naming the config key."""
    if not rrf_ks:
        raise ConfigError("rrf_ks: the RRF sweep is empty (give at least one k, e.g. [60])")
    if any(k < 0 for k in rrf_ks):
        raise ConfigError(f"rrf_ks: k must be >= 0, got {list(rrf_ks)}")
    if not weights:
        raise ConfigError("weights: the weight sweep is empty (e.g. [0.0, 0.1, ..., 1.0])")
    if any(not 0.0 <= w <= 1.0 for w in weights):
        raise ConfigError(f"weights: dense weights must lie in [0, 1], got {list(weights)}")
    if not norms:
        raise ConfigError(f"norms: the normalisation list is empty (choose from {list(NORMS)})")
    bad = [n for n in norms if n not in NORMS]
    if bad:
        raise ConfigError(f"norms: unknown normalisation {bad[0]!r} (choose from {list(NORMS)})")


def settings_grid(rrf_ks: Sequence[float], weights: Sequence[float],
                  norms: Sequence[str]) -> list[Setting]:
    check_sweep(rrf_ks, weights, norms)
    return ([Setting("rrf", float(k)) for k in rrf_ks]
            + [Setting(n, round(float(w), 6)) for n in norms for w in weights])


# --------------------------------------------------------------------------- data

def subsample(data: BeirData, n_queries: int | None, n_docs: int | None, seed: int = 0) -> BeirData:
    """Deterministic subset: ``n_queries`` judged queries (None = all) and a corpus of every
    document relevant to them plus random distractors up to ``n_docs`` (None = the whole corpus).
    Queries whose relevant documents are missing from the corpus are dropped first."""
    rng = random.Random(seed)
    qids = sorted(q for q, rels in data.qrels.items()
                  if any(r > 0 and d in data.corpus for d, r in rels.items()))
    if not qids:
        raise ConfigError(f"{data.name}: no query has a relevant document in the corpus")
    if n_queries is not None and n_queries < len(qids):
        qids = sorted(rng.sample(qids, n_queries))
    qrels = {q: {d: r for d, r in data.qrels[q].items() if d in data.corpus} for q in qids}
    if n_docs is None or n_docs >= len(data.corpus):
        corpus = dict(data.corpus)
    else:
        needed = sorted({d for rels in qrels.values() for d in rels})
        rest = sorted(set(data.corpus) - set(needed))
        extra = rng.sample(rest, max(0, min(len(rest), n_docs - len(needed))))
        keep = set(needed) | set(extra)
        corpus = {d: v for d, v in data.corpus.items() if d in keep}
    return BeirData(data.name, corpus, {q: data.queries[q] for q in qids}, qrels, data.split)


def split_queries(qids: Iterable[str], seed: int = 0, dev_share: float = 0.5) -> tuple[list[str], list[str]]:
    """Seeded dev / held-out split. Input order does not matter (ids are sorted first);
    the two halves are disjoint and together cover every id."""
    ids = sorted(set(qids))
    if len(ids) < 2:
        raise ConfigError(f"need at least 2 queries to split into dev and held-out, got {len(ids)}")
    random.Random(seed).shuffle(ids)
    n_dev = min(len(ids) - 1, max(1, round(len(ids) * dev_share)))
    return sorted(ids[:n_dev]), sorted(ids[n_dev:])


# --------------------------------------------------------------------------- candidates

def candidates(data: BeirData, embedder, depth: int = 100) -> Lists:
    """BM25 and dense top-``depth`` lists for every query, computed once.

    Dense search is exact (normalised vectors, inner product over the whole corpus)."""
    from .bm25 import BM25Index

    ids = list(data.corpus)
    texts = [data.doc_text(i) for i in ids]
    qids = list(data.queries)
    qtexts = [data.queries[q] for q in qids]
    bm25 = BM25Index().build(ids, texts).search_many(qtexts, depth)
    doc_vecs = embedder.encode(texts)
    q_vecs = embedder.encode_queries(qtexts)
    sims = q_vecs @ doc_vecs.T
    k = min(depth, len(ids))
    dense = []
    for row in sims:
        top = np.argpartition(-row, k - 1)[:k]
        top = top[np.lexsort((top, -row[top]))]  # best first, ties by position
        dense.append([Hit(ids[i], float(row[i])) for i in top])
    return {"bm25": dict(zip(qids, bm25)), "dense": dict(zip(qids, dense))}


def fuse(lists: Lists, setting: Setting, qids: Sequence[str], top: int = 100) -> dict[str, list[str]]:
    """The run (query id -> ranked doc ids) of one setting over the cached lists."""
    run = {}
    for q in qids:
        b, d = lists["bm25"].get(q, []), lists["dense"].get(q, [])
        if setting.method == "bm25":
            hits = b[:top]
        elif setting.method == "dense":
            hits = d[:top]
        elif setting.method == "rrf":
            hits = fusion.rrf([b, d], k=setting.param, top=top)
        elif setting.method in NORMS:
            w = setting.param
            hits = fusion.weighted([b, d], [1.0 - w, w], norm=setting.method, top=top)
        else:
            raise ConfigError(f"unknown fusion method {setting.method!r}")
        run[q] = [h.id for h in hits]
    return run


def score(run: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]],
          qids: Sequence[str]) -> dict[str, float]:
    """nDCG@10, recall@10, recall@100 and MRR@10 over ``qids`` only."""
    s = evaluate_run(run, {q: qrels[q] for q in qids}, ks=(10, 100))
    return {k: s.get(k, 0.0) for k in ("ndcg@10", "recall@10", "recall@100", "mrr@10")}


# --------------------------------------------------------------------------- sweep + selection

def sweep(lists: Lists, qrels, dev: Sequence[str], held: Sequence[str],
          grid: Sequence[Setting], metric: str = "ndcg@10") -> list[dict]:
    """One row per setting (single retrievers first): dev and held-out scores."""
    rows = []
    for s in [Setting("bm25"), Setting("dense"), *grid]:
        d = score(fuse(lists, s, dev), qrels, dev)
        h = score(fuse(lists, s, held), qrels, held)
        rows.append({"setting": s, "label": s.label, "method": s.method, "param": s.param,
                     "dev": d[metric], **{f"held_{k}": v for k, v in h.items()}})
    return rows


def select(rows: Sequence[dict], methods: Iterable[str]) -> dict:
    """The row with the best DEV score among ``methods`` (first wins a tie). Held-out scores are
    never read here: they are only reported for the chosen row."""
    methods = set(methods)
    pool = [r for r in rows if r["method"] in methods]
    if not pool:
        raise ConfigError(f"no swept setting uses {sorted(methods)}")
    best = pool[0]
    for r in pool[1:]:
        if r["dev"] > best["dev"]:
            best = r
    return best
