"""The FastAPI application: OpenAI-compatible API, RAGFlow-compatible API, web page.

* ``/v1/models``, ``/v1/chat/completions`` (SSE streaming or not), ``/v1/embeddings``: the
  official ``openai`` client works unchanged. Model ``llmtech-kb`` is the knowledge-base
  assistant: it retrieves, answers with ``[n]`` citations and returns the passages in an extra
  ``references`` field; the generation model's own name chats without retrieval.
* ``/api/v1/...``: the RAGFlow HTTP API subset the ``ragflow-sdk`` client uses (datasets,
  documents, parsing, chunks, retrieval, chat assistants, sessions, completions), each answer in
  RAGFlow's ``{"code": 0, "data": ...}`` envelope; errors carry a non-zero ``code`` (the HTTP
  status) and a ``message``.
* ``/ui/``: the web page (chat with citations, datasets with upload and parse progress, settings).

Every ``/v1`` and ``/api/v1`` call needs ``Authorization: Bearer <key>``; the key decides the
tenant, and another tenant's ids answer 404 exactly as unknown ids do.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import anyio
from fastapi import Depends, FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from ..errors import LlmtechError
from .backends import BackendError, Busy, GenParams
from .config import ServeConfig
from .meta import DONE, RUNNING
from .service import Reply, Service

log = logging.getLogger(__name__)
WEB = Path(__file__).parent / "web"


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _ragflow_path(path: str) -> bool:
    return path.startswith("/api/") and "/chats_openai/" not in path


def _error(request: Request, status: int, message: str, headers: dict | None = None):
    if _ragflow_path(request.url.path):
        body: dict[str, Any] = {"code": status, "message": message}
    else:
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
                503: "server_busy"}.get(status, "invalid_request_error")
        body = {"error": {"message": message, "type": kind, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


_END = object()


def _next(gen):
    try:
        return next(gen)
    except StopIteration:
        return _END


class EventStream(StreamingResponse):
    """Server-sent events from a blocking generator, closed for certain when the response ends.

    Each ``next`` runs in the thread pool. However the response ends - finished, the client
    hung up (the send fails or the disconnect cancels the task), an error - ``cancel`` is set
    and the generator is closed, so the model stops generating and its Gate slot is released
    at once instead of whenever the garbage collector gets to it.
    """

    def __init__(self, gen, cancel: threading.Event):
        from starlette.concurrency import run_in_threadpool

        async def body():
            try:
                while (item := await run_in_threadpool(_next, gen)) is not _END:
                    yield item
            finally:
                cancel.set()
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(gen.close)

        super().__init__(body(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def ok(data: Any = None) -> dict[str, Any]:
    return {"code": 0, "data": data} if data is not None else {"code": 0}


def ms(t: float | None) -> int | None:
    return int(t * 1000) if t else None


# ---------------------------------------------------------------------------- request bodies

class Loose(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields we do not use


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.get("text", "") for p in self.content if isinstance(p, dict))
        return self.content or ""


class ChatRequest(Loose):
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    stream_options: dict[str, Any] | None = None
    dataset_ids: list[str] | None = None   # llmtech extra: answer from these datasets


class EmbeddingRequest(Loose):
    model: str = ""
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"


class DatasetBody(Loose):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    avatar: str | None = None
    embedding_model: str | None = None
    permission: str = "me"
    chunk_method: str = "naive"


class DatasetUpdate(Loose):
    name: str | None = Field(None, min_length=1, max_length=128)
    description: str | None = None


class Ids(Loose):
    ids: list[str] | None = None


class DocIds(Loose):
    document_ids: list[str] = Field(min_length=1)


class ChunkBody(Loose):
    content: str = Field(min_length=1)
    important_keywords: list[str] = []
    questions: list[str] = []


class ChunkIds(Loose):
    chunk_ids: list[str] | None = None


class RetrievalBody(Loose):
    question: str = Field(min_length=1)
    dataset_ids: list[str] = Field(min_length=1)
    document_ids: list[str] | None = None
    page: int = Field(1, ge=1)
    page_size: int = Field(30, ge=1, le=1024)
    similarity_threshold: float = 0.2
    vector_similarity_weight: float = Field(0.3, ge=0, le=1)
    top_k: int = Field(1024, ge=1)


class ChatBody(Loose):
    name: str = Field(min_length=1, max_length=128)
    avatar: str | None = ""
    dataset_ids: list[str] = []
    llm: dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None


class ChatUpdate(Loose):
    name: str | None = None
    dataset_ids: list[str] | None = None
    llm: dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None


class SessionBody(Loose):
    name: str = "New session"


class CompletionBody(Loose):
    question: str = ""
    stream: bool = True
    session_id: str | None = None


# ---------------------------------------------------------------------------- the app

def create_app(config: ServeConfig, service: Service | None = None) -> FastAPI:
    svc = service or Service(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        svc.close()

    app = FastAPI(title="llmtech knowledge-base service", version="0.1.0", lifespan=lifespan)
    app.state.service = svc
    lim = config.limits

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return _error(request, e.status, e.message)

    @app.exception_handler(Busy)
    async def _busy(request: Request, e: Busy):
        return _error(request, e.status, str(e), {"Retry-After": "5"})

    @app.exception_handler(BackendError)
    async def _backend(request: Request, e: BackendError):
        return _error(request, 502, str(e))

    @app.exception_handler(LlmtechError)
    async def _bad(request: Request, e: LlmtechError):
        return _error(request, 400, str(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        parts = []
        for err in e.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg')}")
        return _error(request, 422, "invalid request: " + "; ".join(parts))

    def tenant(request: Request) -> str:
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'")
        who = svc.meta.tenant_of(key.strip())
        if who is None:
            raise ApiError(401, "invalid API key")
        return who

    # ------------------------------------------------------------------ health and page
    @app.get("/health")
    def health():
        emb = svc.embedder
        return {"status": "ok", "generation": svc.chat.name, "embedding": emb.model_id,
                "running": svc.gate.running, "queued": svc.gate.waiting,
                "query_embeddings": {"computed": getattr(emb, "queries", None),
                                     "batches": getattr(emb, "batches", None),
                                     "cache_hits": getattr(emb, "cache_hits", None)}}

    @app.get("/")
    def root():
        return RedirectResponse("/ui/")

    app.mount("/ui", StaticFiles(directory=WEB, html=True, check_dir=False), name="ui")

    # ------------------------------------------------------------------ OpenAI-compatible
    @app.get("/v1/models")
    def list_models(who: str = Depends(tenant)):
        now = int(time.time())
        return {"object": "list", "data": [
            {"id": config.assistant_model, "object": "model", "created": now,
             "owned_by": "llmtech"},
            {"id": svc.chat.name, "object": "model", "created": now, "owned_by": "llmtech"}]}

    def own_datasets(who: str, ids: list[str] | None) -> list[str] | None:
        for ds_id in ids or []:
            if svc.meta.dataset(who, ds_id) is None:
                raise ApiError(404, f"dataset {ds_id} not found")
        return None if ids is None else list(ids)

    def references(reply: Reply) -> list[dict[str, Any]]:
        cited = set(reply.answer.citations) if reply.answer else set()
        return [{"n": n, "id": p.id, "document_id": p.doc_id,
                 "document_name": p.title or p.doc_id,
                 "dataset_id": p.meta.get("dataset_id"), "content": p.text,
                 # the hybrid retriever's fused score: it orders passages, it is not a 0..1
                 # similarity (POST /api/v1/retrieval gives RAGFlow-style similarities)
                 "score": round(float(p.score), 6), "cited": n in cited}
                for n, p in enumerate(reply.passages, 1)]

    def openai_chat(body: ChatRequest, who: str, ds_ids: list[str] | None,
                    retrieval: bool, model_name: str, system: str | None = None):
        max_tokens = min(body.max_completion_tokens or body.max_tokens
                         or config.default_max_tokens, lim.max_new_tokens)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        params = GenParams(max_tokens, body.temperature, body.top_p, stops)
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages if m.role != "tool"]
        cid, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())
        reply, cancel = Reply(), threading.Event()
        stream = svc.answer_stream(msgs, ds_ids, params, reply, retrieval, system,
                                   cancel=cancel)

        def usage() -> dict[str, int]:
            u = reply.usage
            return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                    "total_tokens": u.prompt_tokens + u.completion_tokens}

        if not body.stream:
            for _ in stream:
                pass
            return {"id": cid, "object": "chat.completion", "created": created,
                    "model": model_name,
                    "choices": [{"index": 0, "finish_reason": reply.usage.finish_reason,
                                 "message": {"role": "assistant", "content": reply.text.strip()}}],
                    "usage": usage(), "references": references(reply) if retrieval else []}
        first = next(stream)  # waits at the Gate: a busy server answers 429/503 here

        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created,
                   "model": model_name,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        def events():
            try:
                yield chunk({"role": "assistant", "content": first})
                for piece in stream:
                    yield chunk({"content": piece})
                yield chunk({}, reply.usage.finish_reason,
                            references=references(reply) if retrieval else [])
                if (body.stream_options or {}).get("include_usage"):
                    obj = {"id": cid, "object": "chat.completion.chunk", "created": created,
                           "model": model_name, "choices": [], "usage": usage()}
                    yield f"data: {json.dumps(obj)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                stream.close()

        return EventStream(events(), cancel)

    @app.post("/v1/chat/completions")
    def chat_completions(body: ChatRequest, who: str = Depends(tenant)):
        if body.model == config.assistant_model:
            return openai_chat(body, who, own_datasets(who, body.dataset_ids), True, body.model)
        if body.model == svc.chat.name:
            return openai_chat(body, who, None, False, body.model)
        raise ApiError(404, f"model '{body.model}' not found; GET /v1/models lists "
                            f"{config.assistant_model} and {svc.chat.name}")

    @app.post("/v1/embeddings")
    def embeddings(body: EmbeddingRequest, who: str = Depends(tenant)):
        texts = [body.input] if isinstance(body.input, str) else body.input
        if len(texts) > lim.max_embedding_inputs:
            raise ApiError(413, f"input: {len(texts)} texts, at most "
                                f"{lim.max_embedding_inputs} per request")
        if any(not isinstance(t, str) or not t for t in texts):
            raise ApiError(422, "input: every item must be a non-empty string")
        vecs = svc.embedder.encode(texts)
        if body.encoding_format == "base64":
            import base64

            data = [base64.b64encode(v.astype("float32").tobytes()).decode() for v in vecs]
        else:
            data = [v.tolist() for v in vecs]
        n_tokens = sum(len(t.split()) for t in texts)
        return {"object": "list", "model": body.model or svc.embedder.model_id,
                "data": [{"object": "embedding", "index": i, "embedding": e}
                         for i, e in enumerate(data)],
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    # ------------------------------------------------------------------ RAGFlow: datasets
    def dataset_json(d: dict[str, Any]) -> dict[str, Any]:
        docs = svc.meta.documents(d["tenant"], d["id"])
        return {"id": d["id"], "name": d["name"], "avatar": "", "tenant_id": d["tenant"],
                "description": d["description"] or "", "embedding_model": d["embedding_model"],
                "permission": d["permission"], "chunk_method": d["chunk_method"],
                "document_count": len(docs),
                "chunk_count": sum(x["chunk_count"] or 0 for x in docs),
                "parser_config": {"chunk_token_num": config.kb.chunk.size}, "pagerank": 0,
                "create_time": ms(d["created"]), "update_time": ms(d["updated"])}

    def get_dataset(who: str, ds_id: str) -> dict[str, Any]:
        d = svc.meta.dataset(who, ds_id)
        if d is None:
            raise ApiError(404, f"dataset {ds_id} not found")
        return d

    def page_of(items: list, page: int, page_size: int) -> list:
        return items[(page - 1) * page_size: page * page_size]

    def pick(items: list[dict], id: str | None, name: str | None,
             what: str | None = None) -> list[dict]:
        """The list filters RAGFlow's list endpoints share; an ``id`` that matches nothing is
        a 404 when ``what`` names the kind of thing (as RAGFlow does for datasets and chats)."""
        if id:
            items = [x for x in items if x["id"] == id]
            if not items and what:
                raise ApiError(404, f"{what} {id} not found")
        if name:
            items = [x for x in items if x["name"] == name]
        return items

    @app.post("/api/v1/datasets")
    def create_dataset(body: DatasetBody, who: str = Depends(tenant)):
        if svc.meta.dataset_by_name(who, body.name):
            raise ApiError(409, f"dataset name '{body.name}' already exists")
        if body.embedding_model and body.embedding_model.split("@")[0] not in (
                svc.embedder.model_id, config.embedding.model):
            raise ApiError(400, f"embedding_model '{body.embedding_model}' is not served here; "
                                f"this server embeds with '{svc.embedder.model_id}'")
        d = svc.meta.create_dataset(who, body.name, body.description or "",
                                    svc.embedder.model_id, body.chunk_method, body.permission)
        return ok(dataset_json(d))

    @app.get("/api/v1/datasets")
    def list_datasets(who: str = Depends(tenant), page: int = 1, page_size: int = 30,
                      desc: bool = True, id: str | None = None, name: str | None = None):
        items = pick(svc.meta.datasets(who, desc), id, name, "dataset")
        return ok([dataset_json(d) for d in page_of(items, page, page_size)])

    @app.put("/api/v1/datasets/{ds_id}")
    def update_dataset(ds_id: str, body: DatasetUpdate, who: str = Depends(tenant)):
        get_dataset(who, ds_id)
        fields = {k: v for k, v in {"name": body.name, "description": body.description}.items()
                  if v is not None}
        if body.name and (other := svc.meta.dataset_by_name(who, body.name)) \
                and other["id"] != ds_id:
            raise ApiError(409, f"dataset name '{body.name}' already exists")
        if fields:
            svc.meta.update_dataset(who, ds_id, **fields)
        return ok(dataset_json(get_dataset(who, ds_id)))

    @app.delete("/api/v1/datasets")
    def delete_datasets(body: Ids | None = None, who: str = Depends(tenant)):
        ids = body.ids if body and body.ids is not None else []
        for ds_id in ids:
            get_dataset(who, ds_id)
        for ds_id in ids:
            svc.meta.delete_dataset(who, ds_id)
            svc.drop_kb(ds_id)
        return ok()

    # ------------------------------------------------------------------ RAGFlow: documents
    def document_json(d: dict[str, Any]) -> dict[str, Any]:
        return {"id": d["id"], "name": d["name"], "dataset_id": d["dataset_id"],
                "chunk_method": "naive", "type": d["type"], "size": d["size"],
                "token_count": d["token_count"], "chunk_count": d["chunk_count"],
                "progress": d["progress"], "progress_msg": d["progress_msg"], "run": d["run"],
                "status": "1", "location": d["name"], "source_type": "local",
                "created_by": d["tenant"], "create_time": ms(d["created"]),
                "process_begin_at": d["process_begin_at"],
                "process_duration": d["process_duration"] or 0.0}

    def get_document(who: str, ds_id: str, doc_id: str) -> dict[str, Any]:
        d = svc.meta.document(who, ds_id, doc_id)
        if d is None:
            raise ApiError(404, f"document {doc_id} not found in dataset {ds_id}")
        return d

    @app.post("/api/v1/datasets/{ds_id}/documents")
    async def upload(ds_id: str, file: list[UploadFile] = File(...),
                     who: str = Depends(tenant)):
        get_dataset(who, ds_id)
        blobs = []
        for f in file:  # check every file before storing any
            name = f.filename or ""
            suffix = Path(name.replace("\\", "/")).suffix.lower()
            if suffix not in lim.upload_types:
                raise ApiError(415, f"{name or '(no name)'}: file type '{suffix or '(none)'}' "
                                    f"is not supported ({', '.join(lim.upload_types)})")
            data = await f.read(lim.max_upload_bytes + 1)
            if len(data) > lim.max_upload_bytes:
                raise ApiError(413, f"{name}: larger than the upload limit of "
                                    f"{lim.max_upload_bytes} bytes")
            if not data:
                raise ApiError(400, f"{name}: the file is empty")
            blobs.append((name, data))
        docs = [svc.save_upload(who, ds_id, name, data) for name, data in blobs]
        return ok([document_json(d) for d in docs])

    @app.get("/api/v1/datasets/{ds_id}/documents")
    def list_documents(ds_id: str, who: str = Depends(tenant), page: int = 1,
                       page_size: int = 30, desc: bool = True, id: str | None = None,
                       name: str | None = None, keywords: str | None = None):
        get_dataset(who, ds_id)
        items = pick(svc.meta.documents(who, ds_id, desc), id, name)
        if keywords:
            items = [d for d in items if keywords.lower() in d["name"].lower()]
        return ok({"docs": [document_json(d) for d in page_of(items, page, page_size)],
                   "total": len(items)})

    @app.get("/api/v1/datasets/{ds_id}/documents/{doc_id}")
    def download(ds_id: str, doc_id: str, who: str = Depends(tenant)):
        from fastapi.responses import FileResponse

        d = get_document(who, ds_id, doc_id)
        return FileResponse(svc.root / d["path"], filename=d["name"])

    @app.delete("/api/v1/datasets/{ds_id}/documents")
    def delete_documents(ds_id: str, body: Ids | None = None, who: str = Depends(tenant)):
        get_dataset(who, ds_id)
        ids = body.ids if body and body.ids is not None else []
        docs = [get_document(who, ds_id, i) for i in ids]
        svc.delete_documents(ds_id, docs)
        return ok()

    @app.post("/api/v1/datasets/{ds_id}/chunks")
    def parse(ds_id: str, body: DocIds, who: str = Depends(tenant)):
        get_dataset(who, ds_id)
        docs = [get_document(who, ds_id, i) for i in body.document_ids]
        svc.start_parse([d["id"] for d in docs])
        return ok()

    @app.delete("/api/v1/datasets/{ds_id}/chunks")
    def stop_parsing(ds_id: str, body: DocIds, who: str = Depends(tenant)):
        get_dataset(who, ds_id)
        docs = [get_document(who, ds_id, i) for i in body.document_ids]
        running = [d["id"] for d in docs if d["run"] == RUNNING]
        if not running:
            raise ApiError(400, "none of these documents is being parsed")
        svc.stop_parse(running)
        return ok()

    # ------------------------------------------------------------------ RAGFlow: chunks
    def chunk_json(row: tuple, ds_id: str, doc: dict[str, Any], **scores) -> dict[str, Any]:
        return {"id": row[0], "content": row[2], "document_id": row[1], "dataset_id": ds_id,
                "document_name": doc["name"], "docnm_kwd": doc["name"],
                "important_keywords": [], "questions": [], "available": True,
                "positions": [[row[3], row[4]]], **scores}

    @app.get("/api/v1/datasets/{ds_id}/documents/{doc_id}/chunks")
    def list_chunks(ds_id: str, doc_id: str, who: str = Depends(tenant), page: int = 1,
                    page_size: int = 30, keywords: str = "", id: str = ""):
        get_dataset(who, ds_id)
        doc = get_document(who, ds_id, doc_id)
        kb, lock = svc.kb(ds_id)
        with lock.read():
            rows = kb.db.execute('SELECT id, doc_id, text, start, "end" FROM chunks '
                                 "WHERE doc_id = ? ORDER BY n", (doc_id,)).fetchall()
        if id:
            rows = [r for r in rows if r[0] == id]
        if keywords:
            rows = [r for r in rows if keywords.lower() in r[2].lower()]
        return ok({"chunks": [chunk_json(r, ds_id, doc) for r in page_of(rows, page, page_size)],
                   "doc": document_json(doc), "total": len(rows)})

    @app.post("/api/v1/datasets/{ds_id}/documents/{doc_id}/chunks")
    def add_chunk(ds_id: str, doc_id: str, body: ChunkBody, who: str = Depends(tenant)):
        get_dataset(who, ds_id)
        doc = get_document(who, ds_id, doc_id)
        if doc["run"] != DONE:
            raise ApiError(400, f"document {doc_id} is not parsed yet (state {doc['run']})")
        kb, lock = svc.kb(ds_id)
        with lock.write():
            cid = kb.add_chunk(doc_id, body.content)
            row = kb.chunk_rows([cid])[0]
            n = kb.db.execute("SELECT COUNT(*) FROM chunks WHERE doc_id = ?",
                              (doc_id,)).fetchone()[0]
        svc.meta.set_document(doc_id, chunk_count=n)
        return ok({"chunk": chunk_json(row, ds_id, doc,
                                       important_keywords=body.important_keywords,
                                       questions=body.questions)})

    @app.delete("/api/v1/datasets/{ds_id}/documents/{doc_id}/chunks")
    def delete_chunks(ds_id: str, doc_id: str, body: ChunkIds | None = None,
                      who: str = Depends(tenant)):
        get_dataset(who, ds_id)
        get_document(who, ds_id, doc_id)
        kb, lock = svc.kb(ds_id)
        with lock.write():
            have = [r[0] for r in kb.db.execute("SELECT id FROM chunks WHERE doc_id = ?",
                                                (doc_id,))]
            ids = have if not body or body.chunk_ids is None else body.chunk_ids
            missing = [i for i in ids if i not in have]
            if missing:
                raise ApiError(404, f"chunks not found in document {doc_id}: {missing[:3]}")
            kb.delete_chunks(ids)
            n = len(have) - len(ids)
        svc.meta.set_document(doc_id, chunk_count=n)
        return ok()

    @app.get("/api/v1/chunks/{ds_id}/{chunk_id:path}")
    def get_chunk(ds_id: str, chunk_id: str, who: str = Depends(tenant)):
        """One chunk by id (the web page shows a cited chunk with it)."""
        get_dataset(who, ds_id)
        kb, lock = svc.kb(ds_id)
        with lock.read():
            rows = kb.chunk_rows([chunk_id])
        if not rows:
            raise ApiError(404, f"chunk {chunk_id} not found")
        doc = get_document(who, ds_id, rows[0][1])
        return ok(chunk_json(rows[0], ds_id, doc))

    @app.post("/api/v1/retrieval")
    def retrieval(body: RetrievalBody, who: str = Depends(tenant)):
        ds_ids = own_datasets(who, body.dataset_ids)
        hits = svc.retrieve(ds_ids, body.question, k=min(body.top_k, body.page * body.page_size),
                            vector_weight=body.vector_similarity_weight,
                            threshold=body.similarity_threshold, doc_ids=body.document_ids)
        docs: dict[str, dict] = {}
        chunks = []
        for h in page_of(hits, body.page, body.page_size):
            p = h["passage"]
            doc = docs.setdefault(p.doc_id, svc.meta.document(who, h["dataset_id"], p.doc_id)
                                  or {"name": p.title, "id": p.doc_id})
            chunks.append({"id": p.id, "content": p.text, "document_id": p.doc_id,
                           "dataset_id": h["dataset_id"], "document_name": doc["name"],
                           "docnm_kwd": doc["name"], "important_keywords": [],
                           "questions": [], "available": True, "positions": [[p.start, p.end]],
                           "similarity": round(h["similarity"], 6),
                           "vector_similarity": round(h["vector_similarity"], 6),
                           "term_similarity": round(h["term_similarity"], 6)})
        aggs: dict[str, dict] = {}
        for c in chunks:
            a = aggs.setdefault(c["document_id"], {"doc_id": c["document_id"],
                                                   "doc_name": c["document_name"], "count": 0})
            a["count"] += 1
        return ok({"chunks": chunks, "doc_aggs": list(aggs.values()), "total": len(hits)})

    # ------------------------------------------------------------------ RAGFlow: chats
    default_llm = {"model_name": svc.chat.name, "temperature": 0.1, "top_p": 0.3,
                   "presence_penalty": 0.4, "frequency_penalty": 0.7,
                   "max_tokens": config.default_max_tokens}
    default_prompt = {"similarity_threshold": 0.2, "keywords_similarity_weight": 0.7,
                      "top_n": config.top_k, "top_k": 1024, "rerank_model": "",
                      "empty_response": "", "opener": "你好！我是知识库助手，有什么可以帮你？",
                      "show_quote": True, "prompt": "",
                      "variables": [{"key": "knowledge", "optional": True}]}

    def chat_json(c: dict[str, Any]) -> dict[str, Any]:
        return {"id": c["id"], "name": c["name"], "avatar": "", "dataset_ids": c["dataset_ids"],
                "llm": c["llm"], "prompt": c["prompt"], "create_time": ms(c["created"])}

    def get_chat(who: str, chat_id: str) -> dict[str, Any]:
        c = svc.meta.chat(who, chat_id)
        if c is None:
            raise ApiError(404, f"chat assistant {chat_id} not found")
        return c

    @app.post("/api/v1/chats")
    def create_chat(body: ChatBody, who: str = Depends(tenant)):
        own_datasets(who, body.dataset_ids)
        if any(c["name"] == body.name for c in svc.meta.chats(who)):
            raise ApiError(409, f"chat assistant name '{body.name}' already exists")
        llm = {**default_llm, **{k: v for k, v in (body.llm or {}).items() if v is not None}}
        llm["model_name"] = svc.chat.name
        prompt = {**default_prompt,
                  **{k: v for k, v in (body.prompt or {}).items() if v is not None}}
        return ok(chat_json(svc.meta.create_chat(who, body.name, body.dataset_ids, llm, prompt)))

    @app.get("/api/v1/chats")
    def list_chats(who: str = Depends(tenant), page: int = 1, page_size: int = 30,
                   desc: bool = True, id: str | None = None, name: str | None = None):
        items = pick(svc.meta.chats(who, desc), id, name, "chat assistant")
        return ok([chat_json(c) for c in page_of(items, page, page_size)])

    @app.put("/api/v1/chats/{chat_id}")
    def update_chat(chat_id: str, body: ChatUpdate, who: str = Depends(tenant)):
        c = get_chat(who, chat_id)
        fields: dict[str, Any] = {}
        if body.name:
            fields["name"] = body.name
        if body.dataset_ids is not None:
            fields["dataset_ids"] = own_datasets(who, body.dataset_ids)
        if body.llm:
            fields["llm"] = {**c["llm"], **body.llm}
        if body.prompt:
            fields["prompt"] = {**c["prompt"], **body.prompt}
        if fields:
            svc.meta.update_chat(who, chat_id, **fields)
        return ok()

    @app.delete("/api/v1/chats")
    def delete_chats(body: Ids | None = None, who: str = Depends(tenant)):
        ids = body.ids if body and body.ids is not None else []
        for chat_id in ids:
            get_chat(who, chat_id)
        for chat_id in ids:
            svc.meta.delete_chat(who, chat_id)
        return ok()

    # ------------------------------------------------------------------ RAGFlow: sessions
    def session_json(s: dict[str, Any]) -> dict[str, Any]:
        return {"id": s["id"], "chat_id": s["chat_id"], "name": s["name"],
                "messages": s["messages"], "create_time": ms(s["created"]),
                "update_time": ms(s["updated"])}

    def get_session(who: str, chat_id: str, sid: str) -> dict[str, Any]:
        s = svc.meta.session(who, chat_id, sid)
        if s is None:
            raise ApiError(404, f"session {sid} not found in chat {chat_id}")
        return s

    @app.post("/api/v1/chats/{chat_id}/sessions")
    def create_session(chat_id: str, body: SessionBody | None = None,
                       who: str = Depends(tenant)):
        c = get_chat(who, chat_id)
        opener = c["prompt"].get("opener") or default_prompt["opener"]
        s = svc.meta.create_session(who, chat_id, (body or SessionBody()).name,
                                    [{"role": "assistant", "content": opener}])
        return ok(session_json(s))

    @app.get("/api/v1/chats/{chat_id}/sessions")
    def list_sessions(chat_id: str, who: str = Depends(tenant), page: int = 1,
                      page_size: int = 30, desc: bool = True, id: str | None = None,
                      name: str | None = None):
        get_chat(who, chat_id)
        items = pick(svc.meta.sessions(who, chat_id, desc), id, name)
        return ok([session_json(s) for s in page_of(items, page, page_size)])

    @app.put("/api/v1/chats/{chat_id}/sessions/{sid}")
    def update_session(chat_id: str, sid: str, body: SessionBody, who: str = Depends(tenant)):
        get_session(who, chat_id, sid)
        svc.meta.update_session(who, sid, name=body.name)
        return ok()

    @app.delete("/api/v1/chats/{chat_id}/sessions")
    def delete_sessions(chat_id: str, body: Ids | None = None, who: str = Depends(tenant)):
        get_chat(who, chat_id)
        ids = body.ids if body and body.ids is not None else \
            [s["id"] for s in svc.meta.sessions(who, chat_id)]
        for sid in ids:
            get_session(who, chat_id, sid)
        for sid in ids:
            svc.meta.delete_session(who, sid)
        return ok()

    # ------------------------------------------------------------------ RAGFlow: completions
    def ragflow_reference(reply: Reply, who: str) -> dict[str, Any]:
        refs = references(reply)
        names: dict[str, str] = {}
        for r in refs:
            doc = svc.meta.document(who, r["dataset_id"] or "", r["document_id"])
            r["document_name"] = names.setdefault(r["document_id"],
                                                  doc["name"] if doc else r["document_name"])
        aggs: dict[str, dict] = {}
        for r in refs:
            a = aggs.setdefault(r["document_id"], {"doc_id": r["document_id"],
                                                   "doc_name": r["document_name"], "count": 0})
            a["count"] += 1
        return {"chunks": refs, "doc_aggs": list(aggs.values()), "total": len(refs)}

    @app.post("/api/v1/chats/{chat_id}/completions")
    def ragflow_completion(chat_id: str, body: CompletionBody, who: str = Depends(tenant)):
        c = get_chat(who, chat_id)
        if not body.question.strip():
            raise ApiError(422, "question: must not be empty")
        if body.session_id:
            s = get_session(who, chat_id, body.session_id)
        else:
            s = svc.meta.create_session(who, chat_id, body.question[:30], [])
        history = [m for m in s["messages"] if m["role"] in ("user", "assistant")]
        if history and history[0]["role"] == "assistant":  # the opener is not a real turn
            history = history[1:]
        msgs = history + [{"role": "user", "content": body.question}]
        params = GenParams(min(int(c["llm"].get("max_tokens") or config.default_max_tokens),
                               lim.max_new_tokens), 0.0)
        reply, cancel = Reply(), threading.Event()
        stream = svc.answer_stream(msgs, c["dataset_ids"], params, reply,
                                   system=c["prompt"].get("system") or None,
                                   top_k=int(c["prompt"].get("top_n") or config.top_k),
                                   cancel=cancel)
        msg_id = uuid.uuid4().hex

        def save() -> None:
            svc.meta.update_session(who, s["id"], messages=s["messages"] + [
                {"role": "user", "content": body.question},
                {"role": "assistant", "content": reply.text.strip(),
                 "reference": ragflow_reference(reply, who)["chunks"]}])

        def data(answer: str, final: bool = False) -> dict[str, Any]:
            d = {"answer": answer, "id": msg_id, "session_id": s["id"],
                 "reference": ragflow_reference(reply, who) if final else {}}
            return {"code": 0, "message": "", "data": d}

        if not body.stream:
            for _ in stream:
                pass
            save()
            return data(reply.text.strip(), final=True)
        first = next(stream)

        def events():
            try:
                yield f"data:{json.dumps(data(first), ensure_ascii=False)}\n\n"
                for _ in stream:
                    yield f"data:{json.dumps(data(reply.text), ensure_ascii=False)}\n\n"
                save()
                yield f"data:{json.dumps(data(reply.text.strip(), True), ensure_ascii=False)}\n\n"
                yield f"data:{json.dumps({'code': 0, 'message': '', 'data': True})}\n\n"
            finally:
                stream.close()

        return EventStream(events(), cancel)

    @app.post("/api/v1/chats_openai/{chat_id}/chat/completions")
    def ragflow_openai(chat_id: str, body: ChatRequest, who: str = Depends(tenant)):
        """RAGFlow's OpenAI-style path: the openai client with
        base_url=<server>/api/v1/chats_openai/<chat_id> talks to this assistant."""
        c = get_chat(who, chat_id)
        return openai_chat(body, who, c["dataset_ids"], True, body.model)

    return app
