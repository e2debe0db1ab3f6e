"""One interface for every vector store.

Vectors are float32 rows, L2-normalised by the embedder, so inner product = cosine similarity
and a larger score is better in every backend. Ids are strings chosen by the caller (chunk ids).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ...errors import ConfigError


@dataclass(frozen=True)
class Hit:
    id: str
    score: float


class VectorStore(ABC):
    """add / upsert / delete by id / search / persist / load."""

    kind: str = ""

    def __init__(self, dim: int):
        self.dim = int(dim)

    # -- writes
    @abstractmethod
    def add(self, ids: Sequence[str], vectors: np.ndarray,
            metadatas: Sequence[dict[str, Any]] | None = None) -> None:
        """Insert new ids; an id that is already stored is an error (use ``upsert``)."""

    @abstractmethod
    def upsert(self, ids: Sequence[str], vectors: np.ndarray,
               metadatas: Sequence[dict[str, Any]] | None = None) -> None:
        """Insert or replace."""

    @abstractmethod
    def delete(self, ids: Sequence[str]) -> int:
        """Remove ids (unknown ids are ignored); returns how many were removed."""

    # -- reads
    @abstractmethod
    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-k per query row, best first."""

    @abstractmethod
    def ids(self) -> list[str]:
        ...

    def __len__(self) -> int:
        return len(self.ids())

    # -- persistence
    def persist(self) -> None:
        """Make every write so far durable (no-op for server-backed stores)."""

    def close(self) -> None:
        pass

    # -- helpers shared by the backends
    def _check(self, ids: Sequence[str], vectors: np.ndarray) -> np.ndarray:
        v = np.asarray(vectors, dtype=np.float32)
        if v.ndim == 1:
            v = v[None, :]
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise ConfigError(f"{self.kind} store holds {self.dim}-dimensional vectors, got shape "
                              f"{tuple(v.shape)}: the embedder does not match this store")
        if len(ids) != v.shape[0]:
            raise ValueError(f"{len(ids)} ids for {v.shape[0]} vectors")
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate ids in one write")
        return np.ascontiguousarray(v)
