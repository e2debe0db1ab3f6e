"""A persistent knowledge base: documents → chunks → vectors + BM25, updated incrementally.

Folder layout::

    <kb>/kb.json            the KBConfig it was built with
    <kb>/docstore.sqlite    documents and chunks (the source of truth)
    <kb>/embeddings.sqlite  embedding cache keyed by chunk-text hash
    <kb>/vectors/           the vector store (FAISS by default)
    <kb>/bm25/              the BM25 index

How an update stays consistent when it is killed half-way:

1. Read and chunk the documents; compare each document's content hash with the docstore to get
   new / changed / unchanged / deleted documents. Nothing is written yet.
2. Write all docstore changes in ONE SQLite transaction: it lands completely or not at all.
3. ``sync``: make the vector store and BM25 agree with the docstore. Chunk ids contain the chunk's
   content hash (``<doc>#<n>:<hash12>``), so a set difference tells exactly which vectors are
   stale (delete) and which are missing (embed, cached, then add). The store is persisted last.

A kill during 1 or 2 leaves the old docstore; during 3 a docstore the store does not match yet.
Either way the next run (``open`` checks, ``update`` re-plans) ends with every document present
once, and store, BM25 and docstore holding the same chunk ids.

One writer at a time: every writing method holds an exclusive, non-blocking ``flock`` on
``<kb>/write.lock`` (``llmtech.rag.records.WriteLock``); a second writer, in this or another
process, gets ``KBLocked`` naming the holder's pid. Readers are never blocked. A knowledge base
rebuilt by ``llmtech.rag.records.rebuild`` is a symlink to its current generation folder; it is
resolved once on opening, so a reader keeps reading one generation even if a rebuild swaps in
the next one meanwhile.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from ..config import StrictModel
from ..errors import ConfigError, DataError
from ..io import atomic_write_json
from ..models import DEFAULT_EMBEDDER
from .bm25 import BM25Index
from .chunking import ChunkConfig, chunk_text, text_hash
from .loaders import MAX_BYTES, Skipped, scan
from .quality import QualityConfig, filter_chunks
from .retrieve import BM25Retriever, DenseRetriever, FusionSettings, HybridRetriever
from .types import Passage

Mode = Literal["hybrid", "dense", "bm25"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS docs (doc_id TEXT PRIMARY KEY, title TEXT, kind TEXT, hash TEXT,
    n_chars INTEGER, n_chunks INTEGER, updated_at REAL);
CREATE TABLE IF NOT EXISTS chunks (id TEXT PRIMARY KEY, doc_id TEXT, n INTEGER, text TEXT,
    start INTEGER, "end" INTEGER, hash TEXT);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id);
"""


class KBConfig(StrictModel):
    embedder: str = DEFAULT_EMBEDDER
    store: Literal["faiss", "chroma", "pgvector", "elasticsearch"] = "faiss"
    store_options: dict[str, Any] = {}
    chunk: ChunkConfig = ChunkConfig()
    fusion: FusionSettings = FusionSettings()
    batch_size: int = 64
    max_file_bytes: int = MAX_BYTES
    # chunks left out of the index: empty, garbled (mojibake), full of control characters.
    # Duplicates are handled per document (content hash); set quality=None to index everything.
    quality: QualityConfig | None = QualityConfig(
        exact_dup=False, near_dup=False, min_chars=1, skip=["empty", "mojibake", "control_chars"])


@dataclass
class IndexReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    bad_chunks: list[str] = field(default_factory=list)   # "<chunk id>: <issues>" left out
    chunks_total: int = 0
    chunks_added: int = 0
    chunks_removed: int = 0
    embedded: int = 0          # chunk texts run through the embedder
    embed_cached: int = 0      # found in the embedding cache
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["skipped"] = [f"{s['source']}: {s['reason']}" for s in d["skipped"]]
        for key in ("added", "updated", "unchanged", "deleted"):
            d[f"n_{key}"] = len(d[key])
        return d


class KnowledgeBase:
    """``embedder``: an already loaded ``Embedder`` (or anything with its ``encode`` /
    ``encode_queries`` / ``dim``) to share between knowledge bases, as the service does; its
    ``model_id`` must be the one the knowledge base was built with."""

    def __init__(self, path: Path, config: KBConfig, embedder=None):
        # ``link``: the path as given; ``path``: the generation folder it points to (pinned)
        self.link = Path(path)
        self.path = self.link.resolve() if self.link.is_symlink() else self.link
        self.config = config
        self._lock = None
        self._lock_depth = 0
        if embedder is not None and embedder.model_id != config.embedder:
            raise ConfigError(f"{path}: built with embedder {config.embedder}, "
                              f"not {embedder.model_id}")
        try:
            # the service reads from request threads and writes from its parse worker, under
            # its own per-knowledge-base lock
            self.db = sqlite3.connect(path / "docstore.sqlite", check_same_thread=False)
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise DataError(f"{path / 'docstore.sqlite'}: not a readable docstore ({e}); "
                            "restore it from a backup or rebuild with a new --kb") from None
        self._embedder = embedder
        self._own_embedder = embedder is None
        self._store = None
        self._bm25: BM25Index | None = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, path: str | Path, config: KBConfig | None = None,
               embedder=None) -> "KnowledgeBase":
        path = Path(path)
        if (path / "kb.json").exists():
            raise ConfigError(f"{path} already holds a knowledge base; open it instead")
        path.mkdir(parents=True, exist_ok=True)
        config = config or KBConfig()
        atomic_write_json(path / "kb.json", config.model_dump())
        return cls(path, config, embedder)

    @classmethod
    def open(cls, path: str | Path, embedder=None) -> "KnowledgeBase":
        path = Path(path)
        cfg_file = path / "kb.json"
        if not cfg_file.exists():
            raise DataError(f"{path}: no knowledge base here (run `llmtech rag index` first)")
        try:
            config = KBConfig.model_validate(json.loads(cfg_file.read_text(encoding="utf-8")))
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{cfg_file}: not a valid knowledge-base config ({e})") from None
        return cls(path, config, embedder)

    @classmethod
    def build(cls, path: str | Path, docs_dir: str | Path,
              config: KBConfig | None = None) -> "KnowledgeBase":
        """Create the knowledge base (or open the existing one) and bring it up to date."""
        path = Path(path)
        kb = cls.open(path) if (path / "kb.json").exists() else cls.create(path, config)
        kb.last_report = kb.update(docs_dir)
        return kb

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
        if self._own_embedder and self._embedder is not None and self._embedder.cache is not None:
            self._embedder.cache.close()
        self.db.close()

    @contextmanager
    def writing(self):
        """Hold the knowledge base's single-writer lock (re-entrant within this object)."""
        from .records import WriteLock

        if self._lock_depth == 0:
            self._lock = WriteLock(self.path, self.link).acquire()
        self._lock_depth += 1
        try:
            yield self
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0:
                self._lock.release()
                self._lock = None

    # ------------------------------------------------------------------ components
    @property
    def embedder(self):
        if self._embedder is None:
            from .embed import Embedder

            self._embedder = Embedder(self.config.embedder, batch_size=self.config.batch_size,
                                      cache=self.path / "embeddings.sqlite")
        return self._embedder

    @property
    def store(self):
        if self._store is None:
            from .stores import load_store, make_store

            kind, opts = self.config.store, dict(self.config.store_options)
            if kind in ("faiss", "chroma"):
                folder = self.path / "vectors"
                exists = (folder / "store.json").exists() if kind == "faiss" else folder.exists()
                if exists:  # build options (index type, ...) were saved with the store
                    keep = {k: v for k, v in opts.items() if k == "collection"}
                    self._store = load_store(kind, str(folder), **keep)
                else:
                    self._store = make_store(kind, self.embedder.dim, path=str(folder), **opts)
            else:
                self._store = make_store(kind, self.embedder.dim, **opts)
            if self._store.dim != self.embedder.dim:
                raise ConfigError(f"{self.path}: the {kind} store holds {self._store.dim}-d vectors "
                                  f"but embedder {self.config.embedder} makes {self.embedder.dim}-d "
                                  "ones; rebuild the knowledge base or use the original embedder")
        return self._store

    @property
    def bm25(self) -> BM25Index:
        if self._bm25 is None:
            try:
                self._bm25 = BM25Index.load(self.path / "bm25")
            except Exception:  # noqa: BLE001 - missing or half-written: it is rebuilt by sync
                self._bm25 = BM25Index()
        return self._bm25

    # ------------------------------------------------------------------ docstore reads
    def doc_hashes(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT doc_id, hash FROM docs"))

    def chunk_rows(self, ids: Sequence[str] | None = None) -> list[tuple]:
        cols = 'id, doc_id, text, start, "end"'
        if ids is None:
            return self.db.execute(f"SELECT {cols} FROM chunks ORDER BY doc_id, n").fetchall()
        rows = {}
        for i in range(0, len(ids), 500):
            part = list(ids[i:i + 500])
            q = f"SELECT {cols} FROM chunks WHERE id IN ({','.join('?' * len(part))})"
            rows.update((r[0], r) for r in self.db.execute(q, part))
        return [rows[i] for i in ids if i in rows]

    def stats(self) -> dict[str, int]:
        n_docs = self.db.execute("SELECT COUNT(*) FROM docs").fetchone()[0]
        n_chunks = self.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
        return {"documents": n_docs, "chunks": n_chunks, "vectors": len(self.store),
                "bm25_docs": len(self.bm25)}

    # ------------------------------------------------------------------ updating
    def update(self, docs_dir: str | Path, mode: Literal["incremental", "full"] = "incremental",
               use_cache: bool = True) -> IndexReport:
        """Bring the knowledge base in line with ``docs_dir``; ``full`` re-chunks and re-embeds
        everything (``use_cache=False`` also bypasses the embedding cache)."""
        with self.writing():
            return self._update(docs_dir, mode, use_cache)

    def _update(self, docs_dir, mode, use_cache) -> IndexReport:
        t0 = time.perf_counter()
        report = IndexReport()
        docs, report.skipped = scan(docs_dir, self.config.max_file_bytes)
        if not docs:  # a wrong or empty folder must not wipe the knowledge base
            why = "; ".join(f"{s.source}: {s.reason}" for s in report.skipped[:5])
            raise DataError(f"{docs_dir}: no readable documents, nothing changed"
                            + (f" (skipped {len(report.skipped)}: {why})" if why else ""))
        tokenizer = self.embedder.st.tokenizer if self.config.chunk.strategy == "tokens" else None
        old = {} if mode == "full" else self.doc_hashes()
        keeper = keepers(docs, old)
        writes: list[tuple[Any, list]] = []
        for doc in docs:
            h = text_hash(doc.text)
            if keeper[h] != doc.source:
                report.skipped.append(Skipped(doc.source, f"duplicate of {keeper[h]}"))
                continue
            if old.get(doc.source) == h:
                report.unchanged.append(doc.source)
                continue
            (report.updated if doc.source in old else report.added).append(doc.source)
            writes.append((doc, self._chunks_of(doc, tokenizer, report)))
        present = {d.source for d, _ in writes} | set(report.unchanged)
        current = self.doc_hashes()
        report.deleted = sorted(d for d in current if d not in present)
        self._write(writes, report.deleted, wipe=mode == "full")
        if mode == "full":
            self._reset_indexes()
        self.sync(report, use_cache=use_cache)
        report.chunks_total = self.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
        report.seconds = time.perf_counter() - t0
        return report

    def _chunks_of(self, doc, tokenizer, report: IndexReport) -> list:
        """A document's chunks, quality-filtered, with content-hash ids."""
        chunks = chunk_text(doc.source, doc.text, self.config.chunk, tokenizer,
                            meta={"title": doc.title})
        if self.config.quality is not None:
            chunks, quality = filter_chunks(chunks, self.config.quality)
            report.bad_chunks += [f"{cid}: {', '.join(issues)}" for cid, issues
                                  in quality.by_chunk.items() if cid in quality.bad_ids()]
        for c in chunks:
            c.id = f"{c.id}:{c.hash[:12]}"
        return chunks

    def _write(self, writes: list[tuple[Any, list]], deleted: Sequence[str],
               wipe: bool = False, in_transaction=None) -> None:
        """Every docstore change in ONE transaction: replaced and deleted documents.
        ``in_transaction(db)`` runs last inside the same transaction (the record manager
        stores its per-source records and run id there, so they land with the documents)."""
        with self.db:
            if wipe:
                self.db.execute("DELETE FROM chunks")
                self.db.execute("DELETE FROM docs")
            for doc_id in list(deleted) + [d.source for d, _ in writes]:
                self.db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
                self.db.execute("DELETE FROM docs WHERE doc_id = ?", (doc_id,))
            now = time.time()
            for doc, chunks in writes:
                self.db.execute("INSERT INTO docs VALUES (?,?,?,?,?,?,?)",
                                (doc.source, doc.title, doc.kind, text_hash(doc.text),
                                 len(doc.text), len(chunks), now))
                self.db.executemany("INSERT INTO chunks VALUES (?,?,?,?,?,?,?)",
                                    [(c.id, c.doc_id, n, c.text, c.start, c.end, c.hash)
                                     for n, c in enumerate(chunks)])
            if in_transaction is not None:
                in_transaction(self.db)

    # ------------------------------------------------------------------ per-document edits
    def upsert(self, docs: Sequence[Any]) -> IndexReport:
        """Add or replace these documents (``Document``s, ``source`` = document id) and leave
        every other document alone: the service's "parse this document"."""
        with self.writing():
            return self._upsert(docs)

    def _upsert(self, docs: Sequence[Any]) -> IndexReport:
        t0 = time.perf_counter()
        report = IndexReport()
        tokenizer = self.embedder.st.tokenizer if self.config.chunk.strategy == "tokens" else None
        old = self.doc_hashes()
        writes = []
        for doc in docs:
            if not doc.text.strip():
                raise DataError(f"{doc.source}: no text to index")
            (report.updated if doc.source in old else report.added).append(doc.source)
            writes.append((doc, self._chunks_of(doc, tokenizer, report)))
        self._write(writes, [])
        self.sync(report)
        report.chunks_total = self.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
        report.seconds = time.perf_counter() - t0
        return report

    def remove(self, doc_ids: Sequence[str]) -> IndexReport:
        """Delete these documents and their chunks from the docstore and both indexes."""
        with self.writing():
            return self._remove(doc_ids)

    def _remove(self, doc_ids: Sequence[str]) -> IndexReport:
        report = IndexReport(deleted=[d for d in doc_ids if d in self.doc_hashes()])
        self._write([], report.deleted)
        return self.sync(report)

    def add_chunk(self, doc_id: str, text: str) -> str:
        """A hand-written chunk for an existing document; returns its id."""
        with self.writing():
            return self._add_chunk(doc_id, text)

    def _add_chunk(self, doc_id: str, text: str) -> str:
        text = text.strip()
        if not text:
            raise DataError("a chunk needs some text")
        if doc_id not in self.doc_hashes():
            raise DataError(f"{doc_id}: no such document in {self.path}")
        n = self.db.execute("SELECT COALESCE(MAX(n), -1) + 1 FROM chunks WHERE doc_id = ?",
                            (doc_id,)).fetchone()[0]
        h = text_hash(text)
        cid = f"{doc_id}#{n}:{h[:12]}"
        with self.db:
            self.db.execute("INSERT INTO chunks VALUES (?,?,?,?,?,?,?)",
                            (cid, doc_id, n, text, 0, 0, h))
            self.db.execute("UPDATE docs SET n_chunks = n_chunks + 1 WHERE doc_id = ?", (doc_id,))
        self.sync()
        return cid

    def delete_chunks(self, ids: Sequence[str]) -> int:
        """Delete chunks by id; returns how many existed."""
        with self.writing():
            return self._delete_chunks(ids)

    def _delete_chunks(self, ids: Sequence[str]) -> int:
        found = [r[0] for r in self.chunk_rows(list(ids))]
        with self.db:
            for cid in found:
                doc_id = self.db.execute("SELECT doc_id FROM chunks WHERE id = ?",
                                         (cid,)).fetchone()[0]
                self.db.execute("DELETE FROM chunks WHERE id = ?", (cid,))
                self.db.execute("UPDATE docs SET n_chunks = n_chunks - 1 WHERE doc_id = ?",
                                (doc_id,))
        if found:
            self.sync()
        return len(found)

    def _reset_indexes(self) -> None:
        if self.config.store in ("faiss", "chroma"):
            if self._store is not None:
                self._store.close()
            self._store = None
            shutil.rmtree(self.path / "vectors", ignore_errors=True)
        else:
            self.store.delete(self.store.ids())
        self._bm25 = BM25Index()

    def sync(self, report: IndexReport | None = None, use_cache: bool = True) -> IndexReport:
        """Make the vector store and BM25 hold exactly the docstore's chunks."""
        report = report or IndexReport()
        rows = self.chunk_rows()
        want = {r[0]: r for r in rows}
        have = set(self.store.ids())
        stale = sorted(have - set(want))
        missing = [i for i in want if i not in have]
        if stale:
            report.chunks_removed += self.store.delete(stale)
        emb = self.embedder
        cache, emb.cache = emb.cache, (emb.cache if use_cache else None)
        try:
            step = max(1, self.config.batch_size * 8)
            for i in range(0, len(missing), step):  # batched writes
                ids = missing[i:i + step]
                before = dict(emb.stats)
                vecs = emb.encode([want[c][2] for c in ids])
                report.embedded += emb.stats["embedded"] - before["embedded"]
                report.embed_cached += emb.stats["cached"] - before["cached"]
                self.store.add(ids, vecs, [{"doc_id": want[c][1]} for c in ids])
                report.chunks_added += len(ids)
        finally:
            emb.cache = cache
        if stale or missing:
            self.store.persist()
        if set(self.bm25.doc_ids) != set(want) or len(self.bm25.doc_ids) != len(want):
            self._bm25 = BM25Index(**_bm25_params(self.bm25)).build(
                [r[0] for r in rows], [r[2] for r in rows])
            self._save_bm25()
        return report

    def _save_bm25(self) -> None:
        tmp, final, old = self.path / "bm25.tmp", self.path / "bm25", self.path / "bm25.old"
        shutil.rmtree(tmp, ignore_errors=True)
        self._bm25.save(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def consistent(self) -> bool:
        """Docstore, vector store and BM25 hold the same chunk ids (no loss, no duplicates)."""
        want = [r[0] for r in self.db.execute("SELECT id FROM chunks")]
        store_ids = self.store.ids()
        return (set(want) == set(store_ids) == set(self.bm25.doc_ids)
                and len(store_ids) == len(set(store_ids)) == len(want))

    # ------------------------------------------------------------------ searching
    def retriever(self, mode: Mode = "hybrid"):
        if mode == "bm25":
            return BM25Retriever(self.bm25)
        dense = DenseRetriever(self.embedder, self.store)
        if mode == "dense":
            return dense
        if mode == "hybrid":
            return HybridRetriever(dense, BM25Retriever(self.bm25), self.config.fusion)
        raise ConfigError(f"unknown retrieval mode '{mode}' (hybrid, dense, bm25)")

    def search_many(self, queries: Sequence[str], k: int = 5,
                    mode: Mode = "hybrid") -> list[list[Passage]]:
        hits = self.retriever(mode).search_many(list(queries), k)
        rows = {r[0]: r for r in self.chunk_rows(sorted({h.id for hs in hits for h in hs}))}
        titles = dict(self.db.execute("SELECT doc_id, title FROM docs"))
        return [[Passage(h.id, rows[h.id][1], rows[h.id][2], h.score, titles.get(rows[h.id][1], ""),
                         rows[h.id][3], rows[h.id][4]) for h in hs if h.id in rows] for hs in hits]

    def search(self, query: str, k: int = 5, mode: Mode = "hybrid") -> list[Passage]:
        return self.search_many([query], k, mode)[0]


def keepers(docs: Sequence[Any], indexed: dict[str, str]) -> dict[str, str]:
    """Content hash -> the one source that is indexed for it. Identical content under several
    names is indexed once: the copy already in the knowledge base (``indexed``: source -> hash)
    wins, otherwise the first name in sorted order."""
    keeper: dict[str, str] = {}
    for doc in docs:
        h = text_hash(doc.text)
        if h not in keeper or (indexed.get(doc.source) == h and indexed.get(keeper[h]) != h):
            keeper[h] = doc.source
    return keeper


def _bm25_params(index: BM25Index) -> dict[str, Any]:
    return {**index.params, "backend": index.backend}
