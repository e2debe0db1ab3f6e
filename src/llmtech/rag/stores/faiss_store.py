"""FAISS: an embedded vector index (the default store).

Three index types, all with inner-product scores on L2-normalised vectors (= cosine):

* ``flat`` — exact search over every vector (``IndexFlatIP``); the reference the others are
  measured against.
* ``hnsw`` — a navigable small-world graph (``IndexHNSWFlat``): fast and accurate, but FAISS
  cannot remove nodes from the graph, so deletes become *tombstones* that are filtered out at
  search time and trigger a rebuild once they exceed ``REBUILD_TOMBSTONES`` of the index.
* ``ivf`` — an inverted file (``IndexIVFFlat``): k-means cells, a query scans only the
  ``nprobe`` nearest cells. It needs training data, so vectors wait in an exact flat index until
  ``ivf_train_min`` of them have arrived; until then (and whenever the probed cells hold fewer
  than k vectors) search is exact.

FAISS works with int64 ids; the store maps the caller's string ids to int64 ids and keeps that
mapping plus per-id metadata in a JSON sidecar. ``persist()`` writes ``index-<generation>.faiss``
and then ``store.json`` (which names the index file) — each by temp file + rename, so a crash
leaves the previous generation loadable.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np

from ...errors import ConfigError, DataError
from ...io import atomic_write_bytes, atomic_write_json
from .base import Hit, VectorStore

INDEX_TYPES = ("flat", "hnsw", "ivf")
SIDECAR = "store.json"
REBUILD_TOMBSTONES = 0.20  # HNSW: rebuild the graph when this share of its nodes is deleted


def ivf_nlist(n: int) -> int:
    """Number of IVF cells for ``n`` vectors: about 4·sqrt(n), but at least 39 training vectors
    per cell (FAISS's own minimum for a meaningful k-means) and between 1 and 65,536."""
    return int(max(1, min(4 * math.sqrt(n), n // 39, 65536)))


@contextmanager
def _few_threads(n_queries: int, small: int = 16):
    """Search a handful of queries on one thread. FAISS's OpenMP threads otherwise spin next to
    PyTorch's (query embedding) and the two fight for the cores: measured on 2 cores, one
    thread cut a single query's embedding p95 from 22 ms to 10 ms and the search from 7.8 to
    0.6 ms (bench/hybrid_latency.py). Big batches still use every thread."""
    if n_queries >= small:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


class FaissStore(VectorStore):
    kind = "faiss"

    def __init__(self, dim: int, index: str = "flat", path: str | os.PathLike | None = None,
                 hnsw_m: int = 32, ef_search: int = 64, ef_construction: int = 80,
                 nlist: int | None = None, nprobe: int = 8, ivf_train_min: int = 1000):
        super().__init__(dim)
        if index not in INDEX_TYPES:
            raise ConfigError(f"faiss index '{index}' is unknown; choose one of {list(INDEX_TYPES)}")
        self.index_type = index
        self.path = Path(path) if path is not None else None
        if self.path is not None and (self.path / SIDECAR).exists():
            raise ConfigError(f"{self.path} already holds a FAISS store; reopen it with "
                              "FaissStore.load(path) (or choose an empty folder)")
        self.hnsw_m, self.ef_search, self.ef_construction = hnsw_m, ef_search, ef_construction
        self.nlist, self.nprobe, self.ivf_train_min = nlist, nprobe, ivf_train_min
        self._key: dict[str, int] = {}       # string id -> int64 id in FAISS
        self._id: dict[int, str] = {}        # int64 id -> string id
        self._meta: dict[str, dict[str, Any]] = {}
        self._tombstones: set[int] = set()   # HNSW only: deleted but still in the graph
        self._next = 0                       # next free int64 id
        self._generation = 0                 # bumped by every persist()
        self.ivf_trained = False
        self._index = self._new_index()

    # ------------------------------------------------------------------ index construction
    def _new_index(self) -> faiss.Index:
        if self.index_type == "hnsw":
            graph = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            graph.hnsw.efConstruction = self.ef_construction
            return faiss.IndexIDMap2(graph)
        # flat, and IVF before it is trained: exact inner-product search
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    def _train_ivf(self) -> None:
        """Replace the exact staging index by a trained IVF index holding the same vectors."""
        keys = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        vectors = self._index.index.reconstruct_n(0, self._index.ntotal)
        nlist = self.nlist or ivf_nlist(len(keys))
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist,
                                 faiss.METRIC_INNER_PRODUCT)
        ivf.train(vectors)  # k-means: one centroid per cell
        ivf.add_with_ids(vectors, keys)
        self._index, self.ivf_trained = ivf, True

    def _rebuild_hnsw(self) -> None:
        """Build a fresh graph from the live vectors (drops the tombstones)."""
        keys = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        vectors = self._index.index.reconstruct_n(0, self._index.ntotal)
        live = np.array([k not in self._tombstones for k in keys], dtype=bool)
        self._index = self._new_index()
        if live.any():
            self._index.add_with_ids(vectors[live], keys[live])
        self._tombstones.clear()

    # ------------------------------------------------------------------ writes
    def add(self, ids: Sequence[str], vectors: np.ndarray,
            metadatas: Sequence[dict[str, Any]] | None = None) -> None:
        v = self._check(ids, vectors)
        taken = [i for i in ids if i in self._key]
        if taken:
            raise ValueError(f"{len(taken)} id(s) already stored, e.g. {taken[0]!r}; use upsert")
        keys = np.arange(self._next, self._next + len(ids), dtype=np.int64)
        self._next += len(ids)
        for sid, key, meta in zip(ids, keys.tolist(), metadatas or [None] * len(ids)):
            self._key[sid], self._id[key] = key, sid
            if meta:
                self._meta[sid] = dict(meta)
        if len(ids):
            self._index.add_with_ids(v, keys)
        if (self.index_type == "ivf" and not self.ivf_trained
                and self._index.ntotal >= max(self.ivf_train_min, self.nlist or 0)):
            self._train_ivf()  # k-means needs at least one vector per cell

    def upsert(self, ids: Sequence[str], vectors: np.ndarray,
               metadatas: Sequence[dict[str, Any]] | None = None) -> None:
        v = self._check(ids, vectors)  # check before deleting anything
        self.delete(ids)
        self.add(ids, v, metadatas)

    def delete(self, ids: Sequence[str]) -> int:
        keys = [self._key.pop(i) for i in dict.fromkeys(ids) if i in self._key]
        for key in keys:
            self._meta.pop(self._id.pop(key), None)
        if not keys:
            return 0
        if self.index_type == "hnsw":
            self._tombstones.update(keys)
            if len(self._tombstones) > REBUILD_TOMBSTONES * self._index.ntotal:
                self._rebuild_hnsw()
        else:
            self._index.remove_ids(np.array(keys, dtype=np.int64))
        return len(keys)

    # ------------------------------------------------------------------ reads
    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32).reshape(-1, self.dim))
        if len(q) == 0 or k <= 0 or not self._key:
            return [[] for _ in range(len(q))]
        # HNSW: ask for extra neighbours so that k remain after dropping tombstones
        kk = min(self._index.ntotal, k + len(self._tombstones))
        params = None  # per-call search settings (the index itself is left unchanged)
        if self.index_type == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, kk))
        elif self.ivf_trained:
            params = faiss.SearchParametersIVF(nprobe=self.nprobe)
        with _few_threads(len(q)):
            scores, keys = self._index.search(q, kk, params=params)  # one call for the batch
            if self.ivf_trained:
                short = np.flatnonzero((keys[:, : min(k, len(self._key))] < 0).any(axis=1))
                if len(short):  # probed cells held fewer than k vectors: scan every cell
                    params = faiss.SearchParametersIVF(nprobe=self._index.nlist)
                    scores[short], keys[short] = self._index.search(q[short], kk, params=params)
        out = []
        for row_scores, row_keys in zip(scores, keys):
            hits = [Hit(self._id[key], float(s)) for s, key in zip(row_scores, row_keys.tolist())
                    if key >= 0 and key not in self._tombstones]
            out.append(hits[:k])
        return out

    def ids(self) -> list[str]:
        return list(self._key)

    def __len__(self) -> int:
        return len(self._key)

    def metadata(self, id: str) -> dict[str, Any]:
        return dict(self._meta.get(id, {}))

    # ------------------------------------------------------------------ persistence
    def settings(self) -> dict[str, Any]:
        return {"dim": self.dim, "index": self.index_type, "hnsw_m": self.hnsw_m,
                "ef_search": self.ef_search, "ef_construction": self.ef_construction,
                "nlist": self.nlist, "nprobe": self.nprobe, "ivf_train_min": self.ivf_train_min}

    def persist(self) -> None:
        if self.path is None:
            raise ConfigError("this FAISS store has no path; create it with path=FOLDER to persist")
        self._generation += 1
        index_file = f"index-{self._generation:06d}.faiss"
        atomic_write_bytes(self.path / index_file, faiss.serialize_index(self._index).tobytes())
        atomic_write_json(self.path / SIDECAR, {
            "format": "llmtech-faiss-1", **self.settings(), "index_file": index_file,
            "generation": self._generation, "ivf_trained": self.ivf_trained, "next_id": self._next,
            "ids": [[sid, key] for sid, key in self._key.items()],
            "tombstones": sorted(self._tombstones), "metadata": self._meta,
        }, indent=None)
        for old in self.path.glob("index-*.faiss"):  # the sidecar now names the new file
            if old.name != index_file:
                old.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FaissStore":
        """Reopen a store written by ``persist()``; searches give the same results as before."""
        path = Path(path)
        sidecar = path / SIDECAR
        if not sidecar.exists():
            raise DataError(f"{path}: no FAISS store here ({SIDECAR} not found)")
        try:
            side = json.loads(sidecar.read_text(encoding="utf-8"))
            settings = {k: side[k] for k in ("dim", "index", "hnsw_m", "ef_search",
                                             "ef_construction", "nlist", "nprobe", "ivf_train_min")}
        except (json.JSONDecodeError, KeyError) as e:
            raise DataError(f"{sidecar}: not a valid FAISS store sidecar ({e})") from None
        store = cls(**settings)  # path is set below: the constructor refuses existing stores
        store.path, store._generation = path, side["generation"]
        index_path = path / side["index_file"]
        if not index_path.exists():
            raise DataError(f"{sidecar} names {index_path.name}, which is missing")
        store._index = faiss.deserialize_index(np.fromfile(index_path, dtype=np.uint8))
        store.ivf_trained = side["ivf_trained"]
        store._key = {sid: int(key) for sid, key in side["ids"]}
        store._id = {key: sid for sid, key in store._key.items()}
        store._meta, store._next = side["metadata"], side["next_id"]
        store._tombstones = set(side["tombstones"])
        if store._index.ntotal != len(store._key) + len(store._tombstones):
            raise DataError(f"{path}: the index holds {store._index.ntotal} vectors but "
                            f"{SIDECAR} lists {len(store._key)} ids; the store is damaged")
        return store

    def storage_bytes(self) -> int:
        """Bytes on disk of the last ``persist()``."""
        if self.path is None or not self.path.exists():
            return 0
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())
