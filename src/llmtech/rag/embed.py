"""Text → vectors with sentence-transformers, batched and cached by content hash.

``Embedder("minilm-l6")`` loads the bundled all-MiniLM-L6-v2; any id that ``llmtech.models``
resolves works too (``hf:BAAI/bge-small-en-v1.5``, ``ms:BAAI/bge-small-zh-v1.5``, a local folder).
Vectors come back L2-normalised float32, so inner product = cosine similarity.

The cache is a SQLite file keyed by sha256(model id, prefix, text): re-indexing a knowledge base
only embeds the chunks whose text changed. ``quantize="int8"`` applies PyTorch dynamic int8
quantisation to the encoder's Linear layers, a faster CPU path whose retrieval cost the
benchmark reports.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import models

log = logging.getLogger(__name__)

# What each registered embedder was trained on. None = unknown (assume every language).
EMBEDDER_LANGUAGES: dict[str, frozenset[str] | None] = {
    "minilm-l6": frozenset({"en"}),
    "hf:sentence-transformers/all-MiniLM-L6-v2": frozenset({"en"}),
    "bge-small-zh": frozenset({"zh", "en"}),
    "ms:BAAI/bge-small-zh-v1.5": frozenset({"zh", "en"}),
}

# Instruction prefixes some embedders expect on queries (BGE: see its model card).
QUERY_PREFIX: dict[str, str] = {
    "bge-small-zh": "为这个句子生成表示以用于检索相关文章：",
    "ms:BAAI/bge-small-zh-v1.5": "为这个句子生成表示以用于检索相关文章：",
}


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """A persistent {hash: vector} map in SQLite (safe to kill at any point)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # usable from worker threads (retrieval with a deadline, request threads); one lock
        # keeps reads and write transactions from interleaving on the shared connection
        # timeout: other processes (parallel test workers, a second lab) may hold the write lock
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=60)
        self._lock = threading.RLock()
        self._db.execute("CREATE TABLE IF NOT EXISTS vec (key TEXT PRIMARY KEY, v BLOB)")

    def get_many(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        with self._lock:
            for i in range(0, len(keys), 500):
                part = list(keys[i:i + 500])
                q = f"SELECT key, v FROM vec WHERE key IN ({','.join('?' * len(part))})"
                for key, blob in self._db.execute(q, part):
                    found[key] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put_many(self, items: dict[str, np.ndarray]) -> None:
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO vec VALUES (?, ?)",
                                 [(k, np.asarray(v, np.float32).tobytes()) for k, v in items.items()])

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM vec").fetchone()[0]

    def close(self) -> None:
        self._db.close()


class Embedder:
    def __init__(self, model: str = models.DEFAULT_EMBEDDER, batch_size: int = 64,
                 cache: str | Path | None = None, quantize: str | None = None,
                 max_seq_length: int | None = None, device: str = "cpu",
                 query_prefix: str | None = None):
        self.model_id = model
        self.st = models.load_embedder(model, device=device)
        if max_seq_length:
            self.st.max_seq_length = max_seq_length
        self.quantize = quantize
        if quantize == "int8":
            import torch

            self.st = torch.ao.quantization.quantize_dynamic(self.st, {torch.nn.Linear},
                                                             dtype=torch.qint8)
        elif quantize not in (None, "", "none"):
            raise ValueError(f"quantize must be 'int8' or none, got {quantize!r}")
        self.batch_size = batch_size
        self.dim = int(self.st.get_embedding_dimension())
        self.languages = EMBEDDER_LANGUAGES.get(model)
        self.query_prefix = QUERY_PREFIX.get(model, "") if query_prefix is None else query_prefix
        self.cache = EmbeddingCache(cache) if cache else None
        self.stats = {"embedded": 0, "cached": 0}

    def covers(self, lang: str) -> bool:
        """Was this embedder trained on ``lang``? (unknown embedders are assumed to be)"""
        return self.languages is None or lang in self.languages

    def _key(self, text: str, prefix: str) -> str:
        return content_hash(f"{self.model_id}\0{self.quantize or ''}\0{prefix}\0{text}")

    def _encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        v = self.st.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(v, dtype=np.float32)

    def encode(self, texts: Sequence[str], query: bool = False) -> np.ndarray:
        """(len(texts), dim) float32, normalised. Queries get the model's query prefix."""
        prefix = self.query_prefix if query else ""
        texts = [prefix + t for t in texts]
        if self.cache is None:
            self.stats["embedded"] += len(texts)
            return self._encode(texts)
        keys = [self._key(t, prefix) for t in texts]
        found = self.cache.get_many(list(dict.fromkeys(keys)))
        todo = list(dict.fromkeys(t for t, k in zip(texts, keys) if k not in found))
        if todo:
            new = self._encode(todo)
            fresh = {self._key(t, prefix): v for t, v in zip(todo, new)}
            self.cache.put_many(fresh)
            found.update(fresh)
        self.stats["embedded"] += len(todo)
        self.stats["cached"] += len(texts) - len(todo)
        out = np.stack([found[k] for k in keys]) if keys else np.zeros((0, self.dim), np.float32)
        return out.astype(np.float32, copy=False)

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        return self.encode(queries, query=True)
