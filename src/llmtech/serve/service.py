"""The service's working parts, without HTTP: tenants' datasets and their indexes, the parse
worker, retrieval across datasets and the knowledge-base assistant.

Storage under ``data_dir``::

    meta.sqlite                      keys, datasets, documents, chats, sessions (meta.py)
    datasets/<dataset id>/files/     uploads, saved as <document id><suffix> - the client's file
                                     name is only metadata, so it cannot point outside this folder
    datasets/<dataset id>/kb/        a llmtech.rag KnowledgeBase (docstore, FAISS, BM25)
    assistant_kb/                    the shared knowledge base of the OpenAI-style assistant

Parsing runs in a background thread. A document's state goes UNSTART -> RUNNING (progress
0..1 with a message) -> DONE, FAIL (with the reason) or CANCEL. Documents still RUNNING when the
server stopped are queued again at start, and indexing a document twice gives the same chunks,
so a kill during parsing loses nothing.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError, LlmtechError
from ..rag.generate import REFUSAL, Answer, build_prompt, finish_answer, question_lang
from ..rag.kb import KnowledgeBase
from ..rag.loaders import load_file
from ..rag.types import Passage
from .backends import Gate, GenParams, Usage, make_chat, make_embedder
from .config import ServeConfig
from .meta import CANCEL, DONE, FAIL, RUNNING, Meta

log = logging.getLogger(__name__)


class RWLock:
    """Many readers (searches) or one writer (indexing) at a time. Searches only read the
    FAISS and BM25 indexes and the docstore, so they may run side by side; adding or removing
    chunks must not overlap with any of them."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False

    @contextlib.contextmanager
    def read(self):
        with self._cond:
            while self._writing:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self):
        with self._cond:
            while self._writing or self._readers:
                self._cond.wait()
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


@dataclass
class Reply:
    """What the assistant streamed, filled in as it goes."""

    text: str = ""
    passages: list[Passage] = field(default_factory=list)
    answer: Answer | None = None
    usage: Usage = field(default_factory=Usage)
    seconds: float = 0.0


class Service:
    def __init__(self, config: ServeConfig, chat=None, embedder=None):
        self.config = config
        self.root = Path(config.data_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.meta = Meta(self.root / "meta.sqlite")
        for key, tenant in config.api_keys.items():
            self.meta.add_key(tenant, key)
        self.chat = chat if chat is not None else make_chat(config.generation)
        self.embedder = embedder if embedder is not None else make_embedder(config.embedding)
        lim = config.limits
        self.gate = Gate(lim.max_concurrent_generations, lim.max_queued_generations,
                         lim.queue_timeout_s)
        self._kbs: dict[str, KnowledgeBase] = {}
        self._locks: dict[str, RWLock] = {}
        self._kbs_lock = threading.Lock()
        self.assistant_kb = self._open_assistant_kb()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._workers = [threading.Thread(target=self._work, name=f"parse-{i}", daemon=True)
                         for i in range(max(1, config.parse_workers))]
        for w in self._workers:
            w.start()
        for doc in self.meta.documents_in(RUNNING):  # interrupted by a stop: parse again
            self._queue.put(doc["id"])
        threading.Thread(target=self._warm_up, name="warm-up", daemon=True).start()

    def _warm_up(self) -> None:
        """bm25s compiles its numba kernels at the first search of a process (about 5 s here):
        do it now, in the background, rather than in the first user's request."""
        from ..rag.bm25 import BM25Index

        try:
            BM25Index().build(["w1", "w2"], ["warm up the index", "预热 检索"]).search("warm", 1)
            self.embedder.encode_queries(["warm up"])
        except Exception:  # noqa: BLE001 - only an optimisation
            log.warning("retrieval warm-up failed", exc_info=True)

    def close(self) -> None:
        for _ in self._workers:
            self._queue.put(None)
        for w in self._workers:
            w.join(timeout=30)
        with self._kbs_lock:
            for kb in self._kbs.values():
                kb.close()
            self._kbs.clear()
        if self.assistant_kb is not None:
            self.assistant_kb.close()
        self.meta.close()

    # ------------------------------------------------------------------ knowledge bases
    def _kb_config(self, name: str):
        """The configured KBConfig for one knowledge base. Server stores are shared by every
        dataset, so each dataset gets its own pgvector table / Elasticsearch index."""
        cfg = self.config.kb
        opts = dict(cfg.store_options)
        if cfg.store == "pgvector":
            opts["table"] = f"{opts.get('table', 'llmtech_chunks')}_{name}"
        elif cfg.store == "elasticsearch":
            opts["index"] = f"{opts.get('index', 'llmtech')}-{name}".lower()
        return cfg.model_copy(update={"embedder": self.embedder.model_id, "store_options": opts})

    def _open_assistant_kb(self) -> KnowledgeBase | None:
        if not self.config.kb_docs:
            return None
        path = self.root / "assistant_kb"
        if (path / "kb.json").exists():
            kb = KnowledgeBase.open(path, embedder=self.embedder)
        else:
            kb = KnowledgeBase.create(path, self._kb_config("assistant"), embedder=self.embedder)
        report = kb.update(self.config.kb_docs)
        log.info("assistant knowledge base %s: %d documents, %d chunks (%d new)",
                 self.config.kb_docs, len(report.added) + len(report.updated) +
                 len(report.unchanged), report.chunks_total, report.chunks_added)
        return kb

    def dataset_dir(self, ds_id: str) -> Path:
        return self.root / "datasets" / ds_id

    def kb(self, ds_id: str) -> tuple[KnowledgeBase, RWLock]:
        with self._kbs_lock:
            if ds_id not in self._kbs:
                path = self.dataset_dir(ds_id) / "kb"
                if (path / "kb.json").exists():
                    kb = KnowledgeBase.open(path, embedder=self.embedder)
                else:
                    kb = KnowledgeBase.create(path, self._kb_config(ds_id), embedder=self.embedder)
                self._kbs[ds_id] = kb
                self._locks[ds_id] = RWLock()
            return self._kbs[ds_id], self._locks[ds_id]

    def drop_kb(self, ds_id: str) -> None:
        """Delete a dataset's files and indexes (its vectors too, when they live on a server)."""
        if (self.dataset_dir(ds_id) / "kb" / "kb.json").exists():
            kb, lock = self.kb(ds_id)
            with lock.write():
                if kb.config.store in ("pgvector", "elasticsearch"):
                    kb.store.delete(kb.store.ids())
                with self._kbs_lock:
                    self._kbs.pop(ds_id, None)
                    self._locks.pop(ds_id, None)
                kb.close()
        shutil.rmtree(self.dataset_dir(ds_id), ignore_errors=True)

    # ------------------------------------------------------------------ documents
    def save_upload(self, tenant: str, ds_id: str, name: str, data: bytes) -> dict[str, Any]:
        """Store an upload under a generated name; the client's name is kept as metadata."""
        from .meta import new_id

        display = Path(name.replace("\\", "/")).name or "document"
        suffix = Path(display).suffix.lower()
        doc_id = new_id()
        folder = self.dataset_dir(ds_id) / "files"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{doc_id}{suffix}"
        tmp = path.with_name(path.name + ".part")
        tmp.write_bytes(data)
        tmp.replace(path)
        return self.meta.add_document(tenant, ds_id, doc_id, display, suffix.lstrip("."),
                                      len(data), str(path.relative_to(self.root)))

    def start_parse(self, doc_ids: list[str]) -> None:
        for doc_id in doc_ids:
            self.meta.set_document(doc_id, run=RUNNING, progress=0.0,
                                   progress_msg="queued", process_begin_at=time.time())
            self._queue.put(doc_id)

    def stop_parse(self, doc_ids: list[str]) -> None:
        for doc_id in doc_ids:
            self.meta.set_document(doc_id, run=CANCEL, progress_msg="cancelled")

    def delete_documents(self, ds_id: str, docs: list[dict[str, Any]]) -> None:
        kb, lock = self.kb(ds_id)
        with lock.write():
            kb.remove([d["id"] for d in docs])
        for d in docs:
            self.meta.delete_document(d["id"])
            (self.root / d["path"]).unlink(missing_ok=True)

    def wait_parsed(self, doc_ids: list[str], timeout: float = 300) -> list[dict[str, Any]]:
        end = time.time() + timeout
        while True:
            docs = [self.meta.document_any(d) for d in doc_ids]
            if all(d is None or d["run"] in (DONE, FAIL, CANCEL) for d in docs) or time.time() > end:
                return [d for d in docs if d]
            time.sleep(0.1)

    def _work(self) -> None:
        while True:
            doc_id = self._queue.get()
            if doc_id is None:
                return
            try:
                self._parse(doc_id)
            except Exception as e:  # noqa: BLE001 - one bad document must not stop the worker
                log.exception("parsing %s failed", doc_id)
                self.meta.set_document(doc_id, run=FAIL, progress_msg=f"{type(e).__name__}: {e}")

    def _parse(self, doc_id: str) -> None:
        from ..rag.bm25 import tokenize_many

        doc = self.meta.document_any(doc_id)
        if doc is None or doc["run"] != RUNNING:
            return  # deleted or cancelled while queued
        t0 = time.perf_counter()
        self.meta.set_document(doc_id, progress=0.1, progress_msg="reading the file")
        try:
            loaded = load_file(self.root / doc["path"])
            if not loaded.text.strip():
                raise DataError("no text found in the file")
        except LlmtechError as e:
            msg = str(e).replace(str(self.root / doc["path"]), doc["name"])
            self.meta.set_document(doc_id, run=FAIL, progress=0.0, progress_msg=msg,
                                   process_duration=time.perf_counter() - t0)
            return
        except Exception as e:  # noqa: BLE001 - a corrupt pdf/docx raises library errors
            self.meta.set_document(doc_id, run=FAIL, progress=0.0,
                                   progress_msg=f"cannot read {doc['name']}: {e}",
                                   process_duration=time.perf_counter() - t0)
            return
        loaded.source, loaded.title = doc_id, doc["name"]
        self.meta.set_document(doc_id, progress=0.4, progress_msg="chunking and embedding")
        kb, lock = self.kb(doc["dataset_id"])
        with lock.write():
            kb.upsert([loaded])
            n_chunks = kb.db.execute("SELECT COUNT(*) FROM chunks WHERE doc_id = ?",
                                     (doc_id,)).fetchone()[0]
            now = self.meta.document_any(doc_id)
            if now is None or now["run"] == CANCEL:  # cancelled or deleted meanwhile: undo
                kb.remove([doc_id])
                return
        tokens = len(tokenize_many([loaded.text])[0])
        self.meta.set_document(doc_id, run=DONE, progress=1.0, chunk_count=n_chunks,
                               token_count=tokens,
                               progress_msg=f"{n_chunks} chunks indexed",
                               process_duration=time.perf_counter() - t0)

    # ------------------------------------------------------------------ retrieval
    def retrieve(self, ds_ids: list[str], question: str, k: int = 8,
                 vector_weight: float = 0.3, threshold: float = 0.0,
                 doc_ids: list[str] | None = None) -> list[dict[str, Any]]:
        """RAGFlow-style scoring: similarity = w * cosine + (1 - w) * BM25 / max BM25, over the
        candidates of both retrievers in each dataset; hits below ``threshold`` are dropped.
        Scores are fused on chunk ids; the chunks' text is read only for the ``k`` kept."""
        scored: list[dict[str, Any]] = []
        depth = max(k, 20) if not doc_ids else max(4 * k, 100)
        for ds_id in ds_ids:
            kb, lock = self.kb(ds_id)
            with lock.read():
                if not kb.db.execute("SELECT 1 FROM chunks LIMIT 1").fetchone():
                    continue
                vec = {h.id: h.score for h in kb.retriever("dense").search_many([question], depth)[0]}
                term = {h.id: h.score for h in kb.retriever("bm25").search_many([question], depth)[0]}
            top = max(term.values(), default=0.0) or 1.0
            for cid in set(vec) | set(term):
                if doc_ids and cid.rsplit("#", 1)[0] not in doc_ids:  # ids are "<doc>#<n>:<hash>"
                    continue
                v = max(0.0, vec.get(cid, 0.0))
                t = term.get(cid, 0.0) / top
                sim = vector_weight * v + (1 - vector_weight) * t
                if sim >= threshold:
                    scored.append({"id": cid, "dataset_id": ds_id, "similarity": sim,
                                   "vector_similarity": v, "term_similarity": t})
        scored.sort(key=lambda h: (-h["similarity"], h["id"]))
        out = []
        for ds_id in dict.fromkeys(h["dataset_id"] for h in scored[:k]):
            kb, lock = self.kb(ds_id)
            mine = [h for h in scored[:k] if h["dataset_id"] == ds_id]
            with lock.read():
                rows = {r[0]: r for r in kb.chunk_rows([h["id"] for h in mine])}
            for h in mine:
                if h["id"] in rows:  # gone if a writer removed it in between
                    r = rows[h["id"]]
                    h["passage"] = Passage(r[0], r[1], r[2], h["similarity"], "", r[3], r[4])
                    out.append(h)
        out.sort(key=lambda h: (-h["similarity"], h["id"]))
        return out

    def passages_for(self, question: str, ds_ids: list[str] | None, k: int) -> list[Passage]:
        """The assistant's context: the shared knowledge base (``ds_ids=None``), or the named
        datasets (none named: no context, the assistant refuses)."""
        if ds_ids is None:
            if self.assistant_kb is None:
                return []
            return self.assistant_kb.search(question, k)
        found: list[Passage] = []
        for ds_id in ds_ids:
            kb, lock = self.kb(ds_id)
            with lock.read():
                if kb.db.execute("SELECT 1 FROM chunks LIMIT 1").fetchone():
                    for p in kb.search(question, k):
                        p.meta["dataset_id"] = ds_id
                        found.append(p)
        found.sort(key=lambda p: -p.score)
        return found[:k]

    # ------------------------------------------------------------------ answering
    def answer_stream(self, messages: list[dict], ds_ids: list[str] | None, params: GenParams,
                      reply: Reply, retrieval: bool = True, system: str | None = None,
                      top_k: int | None = None,
                      cancel: threading.Event | None = None) -> Iterator[str]:
        """Stream an answer to the last user message; ``reply`` ends up holding the whole text,
        the passages and the citations. Waits at the Gate (Busy -> 429/503) before anything
        is generated."""
        t0 = time.perf_counter()
        question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        if not isinstance(question, str) or not question.strip():
            raise DataError("messages: the last user message has no text")
        lang = question_lang(question)
        history = [m for m in messages if m["role"] in ("user", "assistant")][:-1][-4:]
        sys_msgs = [m for m in messages if m["role"] == "system"]
        if system:
            sys_msgs = [{"role": "system", "content": system}] + sys_msgs
        answer = Answer(question, "", False, lang=lang if lang in REFUSAL else "en")
        if retrieval:
            answer.passages = reply.passages = self.passages_for(
                question, ds_ids, top_k or self.config.top_k)
            if not reply.passages:  # nothing to ground an answer in: refuse, no model call
                answer.reason, answer.text = "no_passages", REFUSAL[answer.lang]
                reply.text, reply.answer = answer.text, finish_answer(answer)
                reply.seconds = time.perf_counter() - t0
                yield answer.text
                return
            prompt = build_prompt(question, reply.passages, answer.lang,
                                  max_passage_chars=self.config.max_passage_chars)
            final = {"role": "user", "content": prompt}
        else:
            answer.reason = "closed_book"
            final = {"role": "user", "content": question}
        msgs = sys_msgs + history + [final]
        self.gate.acquire()
        try:
            for piece in self.chat.stream(msgs, params, reply.usage, cancel):
                reply.text += piece
                yield piece
        finally:
            self.gate.release()
        answer.text = reply.text.strip()
        answer.prompt_tokens = reply.usage.prompt_tokens
        answer.completion_tokens = reply.usage.completion_tokens
        reply.answer = finish_answer(answer)
        reply.seconds = answer.seconds = time.perf_counter() - t0

    def answer(self, messages: list[dict], ds_ids: list[str] | None, params: GenParams,
               retrieval: bool = True, system: str | None = None) -> Reply:
        reply = Reply()
        for _ in self.answer_stream(messages, ds_ids, params, reply, retrieval, system):
            pass
        return reply

