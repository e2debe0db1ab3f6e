"""Chroma: an embedded vector database (SQLite + an HNSW index) with metadata filters.

Chroma can embed text itself, but its default embedding function downloads an ONNX model (it
fails offline), so this store always passes embeddings and sets ``embedding_function=None``.
The collection uses the inner-product space, where Chroma's distance is ``1 - ip``; scores are
converted back to ``ip`` so that, as in every store, a larger score is better.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ...errors import ConfigError
from .base import Hit, VectorStore


def _client(path: str | os.PathLike | None):
    import chromadb
    from chromadb.config import Settings

    settings = Settings(anonymized_telemetry=False)
    if path is None:  # in memory; note: every EphemeralClient in a process shares one database
        return chromadb.EphemeralClient(settings=settings)
    Path(path).mkdir(parents=True, exist_ok=True)
    return chromadb.PersistentClient(path=str(path), settings=settings)


def _scalar_metadata(meta: dict[str, Any] | None) -> dict[str, Any] | None:
    """Chroma metadata values must be str/int/float/bool: JSON-encode others, drop None.
    An empty dict becomes None (Chroma rejects empty metadata)."""
    if not meta:
        return None
    out = {k: v if isinstance(v, (str, int, float, bool)) else json.dumps(v, ensure_ascii=False)
           for k, v in meta.items() if v is not None}
    return out or None


class ChromaStore(VectorStore):
    kind = "chroma"

    def __init__(self, dim: int, path: str | os.PathLike | None = None,
                 collection: str = "llmtech", ef_search: int = 100, ef_construction: int = 100,
                 max_neighbors: int = 16):
        super().__init__(dim)
        self.path = Path(path) if path is not None else None
        from chromadb.errors import ChromaError

        self._client = _client(path)
        try:
            self._col = self._client.get_or_create_collection(
                collection,
                configuration={"hnsw": {"space": "ip", "ef_search": ef_search,
                                        "ef_construction": ef_construction,
                                        "max_neighbors": max_neighbors}},
                metadata={"dim": self.dim},  # our own record, checked when reopened
                embedding_function=None)
        except ChromaError as e:  # e.g. a collection name Chroma does not accept
            raise ConfigError(f"Chroma collection '{collection}': {e}") from None
        stored = (self._col.metadata or {}).get("dim")
        if stored is not None and int(stored) != self.dim:
            raise ConfigError(f"Chroma collection '{collection}' at {path or '(memory)'} holds "
                              f"{stored}-dimensional vectors, not {self.dim}")

    @classmethod
    def load(cls, path: str | os.PathLike, collection: str = "llmtech") -> "ChromaStore":
        """Reopen a persisted collection, reading its dimension from the collection."""
        try:
            col = _client(path).get_collection(collection)
        except Exception:  # noqa: BLE001 - chroma raises NotFoundError / ValueError by version
            raise ConfigError(f"{path}: no Chroma collection named '{collection}'") from None
        dim = (col.metadata or {}).get("dim")
        if dim is None:
            raise ConfigError(f"{path}: Chroma collection '{collection}' records no dimension "
                              "(it was not written by llmtech)")
        return cls(int(dim), path=path, collection=collection)

    # ------------------------------------------------------------------ writes
    def _batches(self, n: int):
        step = self._client.get_max_batch_size()
        return [slice(i, i + step) for i in range(0, n, step)]

    def _write(self, method, ids, vectors, metadatas) -> None:
        v = self._check(ids, vectors)
        metas = [_scalar_metadata(m) for m in (metadatas or [None] * len(ids))]
        for s in self._batches(len(ids)):
            method(ids=list(ids[s]), embeddings=v[s],
                   metadatas=metas[s] if any(metas[s]) else None)

    def add(self, ids: Sequence[str], vectors: np.ndarray,
            metadatas: Sequence[dict[str, Any]] | None = None) -> None:
        self._check(ids, vectors)
        # Chroma silently ignores an id that already exists: check first
        taken = self._existing(ids)
        if taken:
            raise ValueError(f"{len(taken)} id(s) already stored, e.g. {taken[0]!r}; use upsert")
        self._write(self._col.add, ids, vectors, metadatas)

    def upsert(self, ids: Sequence[str], vectors: np.ndarray,
               metadatas: Sequence[dict[str, Any]] | None = None) -> None:
        # delete first, so an upsert without metadata also drops the old metadata
        self._check(ids, vectors)
        self.delete(ids)
        self._write(self._col.add, ids, vectors, metadatas)

    def delete(self, ids: Sequence[str]) -> int:
        found = self._existing(ids)
        if found:
            self._col.delete(ids=found)
        return len(found)

    def _existing(self, ids: Sequence[str]) -> list[str]:
        ids = list(dict.fromkeys(ids))
        found: list[str] = []
        for s in self._batches(len(ids)):
            found += self._col.get(ids=ids[s], include=[])["ids"]
        return found

    # ------------------------------------------------------------------ reads
    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        q = np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)
        if len(q) == 0 or k <= 0:
            return [[] for _ in range(len(q))]
        # one call for the batch; Chroma returns fewer than k rows when it holds fewer
        res = self._col.query(query_embeddings=q, n_results=k, include=["distances"])
        return [[Hit(i, 1.0 - float(d)) for i, d in zip(row_ids, row_d)]  # ip = 1 - distance
                for row_ids, row_d in zip(res["ids"], res["distances"])]

    def ids(self) -> list[str]:
        return self._col.get(include=[])["ids"]

    def __len__(self) -> int:
        return self._col.count()

    def metadata(self, id: str) -> dict[str, Any]:
        got = self._col.get(ids=[id], include=["metadatas"])
        return dict((got["metadatas"] or [None])[0] or {})

    # ------------------------------------------------------------------ persistence
    def persist(self) -> None:
        """A PersistentClient writes every change to disk as it happens: nothing to do."""

    def close(self) -> None:
        close = getattr(self._client, "close", None)
        if close is not None:
            close()

    def storage_bytes(self) -> int:
        if self.path is None:
            return 0
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
