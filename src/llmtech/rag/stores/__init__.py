"""Vector stores behind one interface: FAISS (default), Chroma, pgvector, Elasticsearch.

    store = make_store("faiss", 384, index="hnsw", path="kb/index")
    store.add(ids, vectors); store.persist()
    store = load_store("faiss", "kb/index")
    hits = store.search(query_vectors, k=10)      # [[Hit(id, score), ...], ...]

Each backend imports its client library (chromadb, psycopg, elasticsearch) only when a store of
that kind is created.
"""

from __future__ import annotations

from typing import Any

from ...errors import ConfigError
from .base import Hit, VectorStore
from .chroma_store import ChromaStore
from .es_store import ElasticsearchStore, es_reachable
from .faiss_store import FaissStore
from .pgvector_store import PgvectorStore, local_postgres

KINDS = ("faiss", "chroma", "pgvector", "elasticsearch")

__all__ = ["Hit", "VectorStore", "KINDS", "make_store", "load_store", "FaissStore",
           "ChromaStore", "PgvectorStore", "ElasticsearchStore", "es_reachable", "local_postgres"]


def _class(kind: str) -> type[VectorStore]:
    classes = {"faiss": FaissStore, "chroma": ChromaStore, "pgvector": PgvectorStore,
               "elasticsearch": ElasticsearchStore}
    if kind not in classes:
        raise ConfigError(f"unknown vector store '{kind}'; valid kinds: {', '.join(KINDS)}")
    return classes[kind]


def make_store(kind: str, dim: int, **options: Any) -> VectorStore:
    """A new (empty or existing, for server stores) store of ``kind`` for ``dim``-d vectors.

    Options are the backend's constructor arguments, e.g. ``index="hnsw"``, ``path=...``
    (faiss/chroma), ``url=..., table=...`` (pgvector), ``url=..., index=...`` (elasticsearch).
    """
    return _class(kind)(dim, **options)


def load_store(kind: str, where: str | None = None, **options: Any) -> VectorStore:
    """Reopen a persisted store; the dimension is read from what was stored.

    ``where`` is the folder (faiss, chroma) or the server URL (pgvector, elasticsearch); other
    options: ``collection`` (chroma), ``table`` (pgvector), ``index`` (elasticsearch).
    """
    cls = _class(kind)
    if where is not None:
        options["path" if kind in ("faiss", "chroma") else "url"] = where
    return cls.load(**options)
