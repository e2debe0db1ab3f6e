"""Elasticsearch: kNN search on a ``dense_vector`` field, next to ES's full-text search.

The index maps ``embedding`` as ``dense_vector`` (``index: true``, HNSW inside Lucene) with
``similarity: dot_product`` (our vectors are unit length); ES reports ``(1 + ip) / 2`` as the
score, converted back to ``ip`` here. Writes go through the bulk helpers and wait for a refresh,
so a search right after a write sees it.

Give the URL of your cluster (``http://user:pass@host:9200``); the client's major version should
match the server's (the elasticsearch 9 client talks to ES 9; pin ``elasticsearch<9`` for ES 8).

Tested here only without a server (no Elasticsearch runs on the course machine): the unreachable
URL error is covered by tests; the requests themselves follow the client's documented API but
have not been run against a live cluster in this project's tests.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ...errors import ConfigError
from .base import Hit, VectorStore
from .pgvector_store import mask_url


def _client(url: str, timeout: float):
    from elasticsearch import Elasticsearch

    return Elasticsearch(url, request_timeout=timeout, max_retries=0, retry_on_timeout=False)


def es_reachable(url: str | None, timeout: float = 2.0) -> bool:
    """True when an Elasticsearch server answers at ``url`` within ``timeout`` seconds."""
    if not url:
        return False
    try:
        return bool(_client(url, timeout).ping())
    except Exception:  # noqa: BLE001 - a malformed URL is as unreachable as a closed port
        return False


class ElasticsearchStore(VectorStore):
    kind = "elasticsearch"

    def __init__(self, dim: int, url: str, index: str = "llmtech", timeout: float = 10.0,
                 similarity: str = "dot_product", drop_existing: bool = False):
        super().__init__(dim)
        from elastic_transport import TransportError
        from elasticsearch import ApiError

        if similarity not in ("dot_product", "cosine"):
            raise ConfigError("elasticsearch similarity must be 'dot_product' or 'cosine'")
        self.url, self.index = url, index
        try:
            self._es = _client(url, timeout)
            self._es.info()  # fails fast (no retries) when nothing answers
            if drop_existing:  # start from an empty index (benchmarks, rebuilds)
                self.drop()
            self._ensure_index(similarity)
        except (TransportError, ApiError, ValueError) as e:
            raise ConfigError(f"cannot use Elasticsearch at {mask_url(url)}: "
                              f"{type(e).__name__}: {e}") from None

    def _ensure_index(self, similarity: str) -> None:
        if self._es.indices.exists(index=self.index):
            stored = self._stored_dim(self._es, self.index)
            if stored != self.dim:
                raise ConfigError(f"Elasticsearch index '{self.index}' at {mask_url(self.url)} "
                                  f"holds {stored}-dimensional vectors, not {self.dim}")
            return
        self._es.indices.create(index=self.index, mappings={"properties": {
            "embedding": {"type": "dense_vector", "dims": self.dim, "index": True,
                          "similarity": similarity},
            "metadata": {"type": "object", "enabled": False},  # kept in _source, not indexed
        }})

    @staticmethod
    def _stored_dim(es, index: str) -> int | None:
        mapping = es.indices.get_mapping(index=index)
        props = next(iter(mapping.values()))["mappings"].get("properties", {})
        return props.get("embedding", {}).get("dims")

    @classmethod
    def load(cls, url: str, index: str = "llmtech", **options) -> "ElasticsearchStore":
        """Reopen an existing index, reading its dimension from the mapping."""
        if not es_reachable(url):
            raise ConfigError(f"no Elasticsearch server answers at {mask_url(url)}")
        from elasticsearch import ApiError

        try:
            dim = cls._stored_dim(_client(url, options.get("timeout", 10.0)), index)
        except ApiError:  # e.g. the index does not exist
            dim = None
        if dim is None:
            raise ConfigError(f"Elasticsearch at {mask_url(url)} has no index '{index}' with an "
                              "'embedding' vector field")
        return cls(dim, url, index=index, **options)

    # ------------------------------------------------------------------ writes
    def _bulk(self, actions: list[dict]) -> int:
        """Run bulk actions; returns how many succeeded. 404 (delete of an unknown id) is not an
        error; anything else is raised."""
        from elasticsearch import helpers

        ok, errors = helpers.bulk(self._es, actions, raise_on_error=False, refresh="wait_for")
        real = [e for e in errors if next(iter(e.values())).get("status") != 404]
        if real:
            raise RuntimeError(f"Elasticsearch bulk write failed for {len(real)} item(s): {real[0]}")
        return ok

    def _docs(self, op: str, ids, vectors, metadatas) -> list[dict]:
        v = self._check(ids, vectors)
        metas = metadatas or [None] * len(ids)
        return [{"_op_type": op, "_index": self.index, "_id": i,
                 "_source": {"embedding": vec.tolist(), "metadata": m or {}}}
                for i, vec, m in zip(ids, v, metas)]

    def add(self, ids: Sequence[str], vectors: np.ndarray,
            metadatas: Sequence[dict[str, Any]] | None = None) -> None:
        actions = self._docs("create", ids, vectors, metadatas)
        taken = self._existing(ids)  # check first, so a clash adds nothing
        if taken:
            raise ValueError(f"{len(taken)} id(s) already stored, e.g. {taken[0]!r}; use upsert")
        self._bulk(actions)

    def upsert(self, ids: Sequence[str], vectors: np.ndarray,
               metadatas: Sequence[dict[str, Any]] | None = None) -> None:
        self._bulk(self._docs("index", ids, vectors, metadatas))  # "index" replaces the doc

    def delete(self, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        return self._bulk([{"_op_type": "delete", "_index": self.index, "_id": i}
                           for i in dict.fromkeys(ids)])

    def _existing(self, ids: Sequence[str]) -> list[str]:
        if not ids:
            return []
        got = self._es.mget(index=self.index, ids=list(ids), source=False)
        return [d["_id"] for d in got["docs"] if d.get("found")]

    # ------------------------------------------------------------------ reads
    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        q = np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)
        if len(q) == 0 or k <= 0:
            return [[] for _ in range(len(q))]
        searches: list[dict] = []
        for row in q:  # one msearch request for the whole batch
            searches += [{"index": self.index},
                         {"knn": {"field": "embedding", "query_vector": row.tolist(), "k": k,
                                  "num_candidates": max(100, k * 10)},
                          "size": k, "_source": False}]
        res = self._es.msearch(searches=searches)
        return [[Hit(h["_id"], 2.0 * h["_score"] - 1.0)  # ES score = (1 + ip) / 2
                 for h in r["hits"]["hits"]] for r in res["responses"]]

    def ids(self) -> list[str]:
        from elasticsearch import helpers

        query = {"query": {"match_all": {}}, "_source": False}
        return [h["_id"] for h in helpers.scan(self._es, index=self.index, query=query)]

    def __len__(self) -> int:
        return int(self._es.count(index=self.index)["count"])

    # ------------------------------------------------------------------ persistence
    def persist(self) -> None:
        """Flush the index to disk (ES also does this on its own)."""
        self._es.indices.flush(index=self.index)

    def close(self) -> None:
        self._es.close()

    def drop(self) -> None:
        self._es.indices.delete(index=self.index, ignore_unavailable=True)

    def storage_bytes(self) -> int:
        stats = self._es.indices.stats(index=self.index, metric="store")
        return int(stats["_all"]["primaries"]["store"]["size_in_bytes"])
