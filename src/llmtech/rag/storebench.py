"""Compare vector stores on the same vectors: build time, latency, recall@k, memory, disk.

Used by lab L6.01 and the store tests. The texts are real (the support knowledge base or BEIR
SciFact) and embedded by a real model, because approximate indexes behave very differently on
random vectors than on real embeddings.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..data.formats import read_records
from ..evals.speed import release_memory, rss_bytes
from ..io import read_text
from .stores.base import VectorStore

log = logging.getLogger(__name__)

_SENTENCE_END = re.compile(r"(?<=[.!?。！？；;])\s*")


# --------------------------------------------------------------------------- texts

def _unique(texts) -> list[str]:
    return list(dict.fromkeys(t.strip() for t in texts if t and t.strip()))


def kb_passages(kb_dir: str | Path, min_chars: int = 8) -> list[str]:
    """Passages of several sizes from Markdown files: each line, each sentence, and windows of
    2 and 3 consecutive lines (as multi-granularity chunking would index them)."""
    out = []
    for f in sorted(Path(kb_dir).glob("*.md")):
        lines = [ln.strip().lstrip("#-* ").strip() for ln in read_text(f).splitlines()]
        lines = [ln for ln in lines if len(ln) >= min_chars]
        out += lines
        out += [s for ln in lines for s in _SENTENCE_END.split(ln) if len(s.strip()) >= min_chars]
        out += [" ".join(lines[i:i + w]) for w in (2, 3) for i in range(len(lines) - w + 1)]
    return _unique(out)


def support_passages(support_dir: str | Path) -> list[str]:
    """~2,100 passages from ``data/support``: KB passages, SFT instructions and answers,
    preference answers. Held-out questions (``support_queries``) are not among them."""
    d = Path(support_dir)
    texts = kb_passages(d / "kb")
    texts += [r[k] for _, r in read_records(d / "sft_train.jsonl") for k in ("instruction", "output")]
    texts += [r[k] for _, r in read_records(d / "preference.jsonl") for k in ("chosen", "rejected")]
    queries = set(support_queries(d))
    return [t for t in _unique(texts) if t not in queries]


def support_queries(support_dir: str | Path) -> list[str]:
    """Held-out questions: the SFT test instructions and the eval QA questions (~170)."""
    d = Path(support_dir)
    return _unique([r["instruction"] for _, r in read_records(d / "sft_test.jsonl")]
                   + [r["question"] for _, r in read_records(d / "eval_qa.jsonl")])


def beir_texts(folder: str | Path, n_queries: int = 200) -> tuple[list[str], list[str]]:
    """(passages, queries) of a BEIR dataset folder: ``title + text`` of every corpus document
    and the first ``n_queries`` queries."""
    d = Path(folder)
    docs = [f"{r.get('title', '')}. {r['text']}".strip(". ") for _, r in
            read_records(d / "corpus.jsonl")]
    queries = [r["text"] for _, r in read_records(d / "queries.jsonl")][:n_queries]
    return _unique(docs), _unique(queries)


@lru_cache(maxsize=2)
def _embedder(model_id: str):
    from ..models import load_embedder

    return load_embedder(model_id)


def embed(texts: Sequence[str], model_id: str = "minilm-l6", batch_size: int = 64,
          progress: bool = False) -> np.ndarray:
    """L2-normalised float32 embeddings (rows) of ``texts``."""
    model = _embedder(model_id)
    vectors = model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=progress)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def unique_vectors(vectors: np.ndarray, max_cosine: float = 0.999) -> np.ndarray:
    """Indices of the rows to keep so that no two kept rows are (almost) the same vector.

    An English-only embedder such as MiniLM maps some short Chinese texts to the same vector;
    such ties make "the exact nearest neighbour" ambiguous, so benchmarks drop the later copies.
    """
    keep = []
    for start in range(0, len(vectors), 1024):
        sims = vectors[start:start + 1024] @ vectors.T
        for r, row in enumerate(sims):
            j = start + r
            if not (row[:j] > max_cosine).any():
                keep.append(j)
    return np.array(keep, dtype=np.int64)


def embed_passages(passages: Sequence[str], n: int | None = None, seed: int = 0,
                   model_id: str = "minilm-l6", progress: bool = False
                   ) -> tuple[list[str], np.ndarray]:
    """Embed up to ``n`` passages (a seeded random sample; all when ``n`` is None) and drop
    near-duplicate vectors. Returns ``(texts, vectors)`` in the same order."""
    texts = list(passages)
    if n is not None and n < len(texts):
        extra = min(len(texts), int(n * 1.05) + 10)  # a few spare ones replace dropped copies
        picked = np.random.default_rng(seed).choice(len(texts), extra, replace=False)
        texts = [texts[i] for i in sorted(picked)]
    vectors = embed(texts, model_id, progress=progress)
    keep = unique_vectors(vectors)[:n]
    return [texts[i] for i in keep], vectors[keep]


def preload_clients() -> None:
    """Import the store client libraries now, so memory measured later is data + index only."""
    import importlib

    for module in ("faiss", "chromadb", "psycopg", "pgvector.psycopg", "elasticsearch"):
        importlib.import_module(module)


# --------------------------------------------------------------------------- ground truth

def exact_top_k(corpus: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row indices of the k best corpus vectors per query by inner product (brute force)."""
    scores = queries @ corpus.T
    top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
    order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, axis=1)


def recall_at_k(found: Sequence[Sequence[str]], truth: Sequence[Sequence[str]], k: int) -> float:
    """Mean share of the true top-k that the store returned in its top-k."""
    per_query = [len(set(f[:k]) & set(t[:k])) / len(t[:k]) for f, t in zip(found, truth) if t]
    return float(np.mean(per_query)) if per_query else 0.0


# --------------------------------------------------------------------------- measuring

@dataclass
class StoreResult:
    store: str
    n_vectors: int
    build_s: float       # create + add all vectors (in batches) + persist
    p50_ms: float        # single-query latency, median
    p95_ms: float        # single-query latency, 95th percentile
    recall_at_k: float   # share of the exact top-k found
    rss_mb: float        # growth of this process's memory while building (client side only)
    disk_bytes: int      # bytes of the persisted store (table + index for a server)

    def row(self) -> dict:
        return asdict(self)


def bench_store(name: str, make: Callable[[], VectorStore], ids: Sequence[str],
                vectors: np.ndarray, queries: np.ndarray, truth: Sequence[Sequence[str]],
                k: int = 10, batch_size: int = 1000, warmup: int = 5) -> tuple[StoreResult, VectorStore]:
    """Build a store from scratch with ``make()``, then time ``k``-NN queries one at a time.

    Returns the result and the (still open) store; the caller closes it.
    """
    release_memory()
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    store = make()
    for i in range(0, len(ids), batch_size):
        store.add(ids[i:i + batch_size], vectors[i:i + batch_size])
    store.persist()
    build_s = time.perf_counter() - t0
    release_memory()  # count what the store keeps, not temporaries freed after building
    rss_mb = (rss_bytes() - rss0) / 2**20

    for q in queries[:warmup]:  # first calls pay for lazy set-up, caches, prepared statements
        store.search(q[None, :], k)
    found, times = [], []
    for q in queries:
        t = time.perf_counter()
        hits = store.search(q[None, :], k)[0]
        times.append(time.perf_counter() - t)
        found.append([h.id for h in hits])
    ms = np.array(times) * 1000
    size = getattr(store, "storage_bytes", lambda: 0)()
    result = StoreResult(store=name, n_vectors=len(store), build_s=build_s,
                         p50_ms=float(np.percentile(ms, 50)), p95_ms=float(np.percentile(ms, 95)),
                         recall_at_k=recall_at_k(found, truth, k), rss_mb=rss_mb,
                         disk_bytes=int(size))
    log.info("%s: %s", name, result)
    return result, store
