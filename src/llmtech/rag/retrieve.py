"""Retrievers: dense (embedder + vector store), BM25, and the hybrid of the two.

Every retriever answers ``search_many(queries, k) -> list[list[Hit]]``.

The default hybrid fuses z-score-normalised scores with equal weights (tuned on SciFact-train,
see ``bench/rag_beir.py``), but first asks whether the embedder was trained on the query's
language: all-MiniLM-L6-v2 is English-only, and on Chinese questions its ranking is close to
noise (CMRC2018: nDCG@10 0.24 against BM25's 0.99). Fusing noise in drags a strong BM25 down
(plain RRF k=60: 0.61), so for a language the embedder does not cover the dense weight is
``uncovered_dense_weight`` (0 by default: BM25 alone).
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

from ..config import StrictModel
from ..data.clean import script_counts
from . import fusion
from .bm25 import BM25Index
from .embed import Embedder
from .stores.base import Hit, VectorStore


def query_languages(text: str, min_share: float = 0.2) -> set[str]:
    """Languages making up at least ``min_share`` of a query's words (a Chinese character
    counts as one word): "NBA 总决赛在哪里举行" -> {"zh"}; "S1 robot vacuum 保修" -> {"en", "zh"}."""
    c = script_counts(text)
    total = sum(c.values())
    if total == 0:
        return set()
    names = {"han": "zh", "latin": "en", "kana": "other", "other": "other"}
    return {names[key] for key, n in c.items() if n / total >= min_share}


class DenseRetriever:
    """Query embedding + vector search. With ``group_of`` (store id -> document id) the store
    holds several passages per document and a document scores as its best passage ("MaxP",
    Dai & Callan 2019): long documents are no longer cut at the embedder's 256 word pieces."""

    def __init__(self, embedder: Embedder, store: VectorStore,
                 group_of: dict[str, str] | None = None, oversample: int = 4):
        if store.dim != embedder.dim:
            from ..errors import ConfigError

            raise ConfigError(f"the {store.kind} store holds {store.dim}-dimensional vectors but "
                              f"embedder {embedder.model_id} makes {embedder.dim}-dimensional ones")
        self.embedder, self.store = embedder, store
        self.group_of, self.oversample = group_of, oversample

    def search_many(self, queries: Sequence[str], k: int = 10,
                    vectors: np.ndarray | None = None) -> list[list[Hit]]:
        if not queries:
            return []
        q = self.embedder.encode_queries(queries) if vectors is None else vectors
        if self.group_of is None:
            return self.store.search(q, k)
        out = []
        for hits in self.store.search(q, k * self.oversample):
            best: dict[str, Hit] = {}
            for h in hits:  # best first, so the first passage seen is the document's best
                best.setdefault(self.group_of[h.id], Hit(self.group_of[h.id], h.score))
            out.append(list(best.values())[:k])
        return out


class BM25Retriever:
    def __init__(self, index: BM25Index):
        self.index = index

    def search_many(self, queries: Sequence[str], k: int = 10) -> list[list[Hit]]:
        return self.index.search_many(queries, k)


class FusionSettings(StrictModel):
    method: Literal["zscore", "minmax", "rrf"] = "zscore"
    dense_weight: float = 0.5          # BM25 gets 1 - dense_weight
    rrf_k: float = 60.0
    depth: int = 100                   # candidates taken from each retriever
    language_guard: bool = True        # drop the dense list for languages the embedder lacks
    uncovered_dense_weight: float = 0.0


class HybridRetriever:
    def __init__(self, dense: DenseRetriever, bm25: BM25Retriever,
                 settings: FusionSettings | None = None):
        self.dense, self.bm25 = dense, bm25
        self.settings = settings or FusionSettings()

    def dense_weight_for(self, query: str) -> float:
        s = self.settings
        if s.language_guard and not all(self.dense.embedder.covers(lang)
                                         for lang in query_languages(query)):
            return s.uncovered_dense_weight
        return s.dense_weight

    def fuse(self, bm25_hits: list[Hit], dense_hits: list[Hit], dense_weight: float,
             k: int) -> list[Hit]:
        s = self.settings
        weights = [1.0 - dense_weight, dense_weight]
        if s.method == "rrf":
            return fusion.rrf([bm25_hits, dense_hits], k=s.rrf_k, weights=weights, top=k)
        return fusion.weighted([bm25_hits, dense_hits], weights, norm=s.method, top=k)

    def search_many(self, queries: Sequence[str], k: int = 10) -> list[list[Hit]]:
        depth = max(k, self.settings.depth)
        sparse = self.bm25.search_many(queries, depth)
        dense = self.dense.search_many(queries, depth)
        return [self.fuse(b, d, self.dense_weight_for(q), k)
                for q, b, d in zip(queries, sparse, dense)]
