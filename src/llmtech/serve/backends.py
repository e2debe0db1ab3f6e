"""Generation and embedding backends: in this process, or any OpenAI-compatible server.

``LocalChat`` runs a transformers model here and streams its tokens (TextIteratorStreamer);
``RemoteChat`` sends the same messages to ``{base_url}/chat/completions`` of vLLM, TGI, a
llama.cpp server or another llmtech, with the official ``openai`` client. For vectors, the rag
``Embedder`` (local) and ``RemoteEmbedder`` share the interface that ``KnowledgeBase`` uses,
so the indexes can be built by a remote embedding server too.

``Gate`` is admission control: at most N generations run, at most M wait; request M+1 gets an
immediate 429 and a request that waited too long gets 503 - the server never piles up work.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .. import models
from ..errors import ConfigError, LlmtechError
from .config import Backend


class Busy(LlmtechError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class BackendError(LlmtechError):
    """The generation or embedding backend failed (remote down, bad answer)."""


class Gate:
    def __init__(self, max_running: int, max_waiting: int, timeout_s: float):
        self._sem = threading.BoundedSemaphore(max_running)
        self._lock = threading.Lock()
        self.max_waiting, self.timeout_s = max_waiting, timeout_s
        self.waiting = 0
        self.running = 0

    def acquire(self) -> None:
        with self._lock:
            if self.waiting >= self.max_waiting:
                raise Busy(429, f"too many requests: {self.running} generating and "
                                f"{self.waiting} queued; retry later")
            self.waiting += 1
        try:
            ok = self._sem.acquire(timeout=self.timeout_s)
        finally:
            with self._lock:
                self.waiting -= 1
        if not ok:
            raise Busy(503, f"the model stayed busy for {self.timeout_s:.0f} s; retry later")
        with self._lock:
            self.running += 1

    def release(self) -> None:
        with self._lock:
            self.running -= 1
        self._sem.release()


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_s: float | None = None   # seconds from the start to the first text piece
    finish_reason: str = "stop"
    extra: dict = field(default_factory=dict)


@dataclass
class GenParams:
    max_tokens: int = 96
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)


class LocalChat:
    """A chat LM in this process; one generation at a time (the Gate sees to that)."""

    def __init__(self, model_id: str, model=None, tokenizer=None):
        # a model folder is listed by its last two path parts: runs/demo/dpo/merged -> dpo/merged
        self.name = "/".join(Path(model_id).parts[-2:]) if Path(model_id).is_dir() else model_id
        if model is None or tokenizer is None:
            model, tokenizer = models.load_lm(model_id)
        self.model, self.tok = model.eval(), tokenizer

    def render(self, messages: list[dict]) -> str:
        return models.render_chat(self.tok, messages, add_generation_prompt=True)

    def stream(self, messages: list[dict], params: GenParams, usage: Usage,
               cancel: threading.Event | None = None) -> Iterator[str]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        cancel = cancel or threading.Event()

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return cancel.is_set()

        ids = self.tok(self.render(messages), add_special_tokens=False,
                       return_tensors="pt")["input_ids"]
        usage.prompt_tokens = int(ids.shape[1])
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True,
                                        timeout=600)
        sample = params.temperature > 0
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                      max_new_tokens=params.max_tokens, do_sample=sample, streamer=streamer,
                      stopping_criteria=StoppingCriteriaList([Cancelled()]),
                      pad_token_id=self.tok.pad_token_id or self.tok.eos_token_id)
        if sample:
            kwargs.update(temperature=params.temperature, top_p=params.top_p)
        out: dict = {}

        def run():
            try:
                with torch.no_grad():
                    out["ids"] = self.model.generate(**kwargs)
            except Exception as e:  # noqa: BLE001 - reported to the reader below
                out["error"] = e
                streamer.end()

        t0 = time.perf_counter()
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        text = ""
        try:
            for piece in streamer:
                if not piece:
                    continue
                if usage.first_token_s is None:
                    usage.first_token_s = time.perf_counter() - t0
                text += piece
                hit = next((s for s in params.stop if s and s in text), None)
                if hit:
                    cancel.set()
                    keep = text[:text.index(hit)]
                    piece = piece[:max(0, len(piece) - (len(text) - len(keep)))]
                    if piece:
                        yield piece
                    break
                yield piece
        finally:
            cancel.set()  # a client that went away stops the generation
            worker.join()
        if "error" in out:
            raise BackendError(f"generation failed: {out['error']}")
        n_new = int(out["ids"].shape[1] - ids.shape[1]) if "ids" in out else 0
        usage.completion_tokens = n_new
        usage.finish_reason = "length" if n_new >= params.max_tokens else "stop"


class RemoteChat:
    """Any OpenAI-compatible chat endpoint, through the official client."""

    def __init__(self, backend: Backend):
        from openai import OpenAI

        if not backend.base_url:
            raise ConfigError("generation.base_url is required when generation.kind=openai")
        self.name = backend.model or "default"
        self.client = OpenAI(base_url=backend.base_url, api_key=backend.api_key,
                             timeout=backend.timeout_s, max_retries=0)

    def stream(self, messages: list[dict], params: GenParams, usage: Usage,
               cancel: threading.Event | None = None) -> Iterator[str]:
        import openai

        t0 = time.perf_counter()
        try:
            resp = self.client.chat.completions.create(
                model=self.name, messages=messages, stream=True, max_tokens=params.max_tokens,
                temperature=params.temperature, top_p=params.top_p,
                stop=params.stop or None, stream_options={"include_usage": True})
            with resp:
                for chunk in resp:
                    if cancel is not None and cancel.is_set():
                        break
                    if chunk.usage:
                        usage.prompt_tokens = chunk.usage.prompt_tokens
                        usage.completion_tokens = chunk.usage.completion_tokens
                    for choice in chunk.choices:
                        if choice.finish_reason:
                            usage.finish_reason = choice.finish_reason
                        if choice.delta and choice.delta.content:
                            if usage.first_token_s is None:
                                usage.first_token_s = time.perf_counter() - t0
                            yield choice.delta.content
        except openai.OpenAIError as e:
            raise BackendError(f"remote model at {self.client.base_url} failed: {e}") from None


class RemoteEmbedder:
    """``Embedder``'s interface over an OpenAI-compatible ``/embeddings`` endpoint."""

    batch_size = 64

    def __init__(self, backend: Backend):
        from openai import OpenAI

        if not backend.base_url:
            raise ConfigError("embedding.base_url is required when embedding.kind=openai")
        self.name = backend.model or "default"
        self.model_id = f"openai:{self.name}"  # vectors depend on the model, not its address
        self.client = OpenAI(base_url=backend.base_url, api_key=backend.api_key,
                             timeout=backend.timeout_s, max_retries=1)
        self.cache = None
        self.stats = {"embedded": 0, "cached": 0}
        self.dim = int(self._embed(["dimension probe"]).shape[1])

    def covers(self, lang: str) -> bool:
        return True

    def _embed(self, texts: list[str]) -> np.ndarray:
        import openai

        try:
            resp = self.client.embeddings.create(model=self.name, input=texts)
        except openai.OpenAIError as e:
            raise BackendError(f"remote embedder at {self.client.base_url} failed: {e}") from None
        v = np.asarray([d.embedding for d in sorted(resp.data, key=lambda d: d.index)],
                       dtype=np.float32)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    def encode(self, texts: Sequence[str], query: bool = False) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, getattr(self, "dim", 0)), np.float32)
        self.stats["embedded"] += len(texts)
        parts = [self._embed(texts[i:i + self.batch_size])
                 for i in range(0, len(texts), self.batch_size)]
        return np.concatenate(parts)

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        return self.encode(queries, query=True)


def make_chat(backend: Backend):
    return LocalChat(backend.model) if backend.kind == "local" else RemoteChat(backend)


def make_embedder(backend: Backend):
    if backend.kind == "local":
        from ..rag.embed import Embedder

        # no on-disk cache: SQLite connections do not cross the request threads
        inner = Embedder(backend.model, cache=None)
    else:
        inner = RemoteEmbedder(backend)
    return BatchingEmbedder(inner)


class BatchingEmbedder:
    """Dynamic batching of query embeddings: concurrent requests share one forward pass.

    A retrieval request spends almost all of its time embedding its one query (about 16 ms
    for MiniLM on this CPU). Sixteen clients asking at once would queue for sixteen forward
    passes; here a worker thread takes every query waiting (up to ``max_batch``) and embeds
    them together, which costs little more than one. Document embedding (indexing) passes
    straight through. Everything else is the wrapped embedder's.

    Customer questions repeat ("how long is the warranty?"), so the last ``cache_size`` query
    vectors are kept (LRU); ``cache_hits`` counts them, so a benchmark can tell cached from
    computed throughput.
    """

    def __init__(self, inner, max_batch: int = 32, cache_size: int = 4096):
        import queue
        from collections import OrderedDict

        self.inner, self.max_batch, self.cache_size = inner, max_batch, cache_size
        self._q: queue.Queue = queue.Queue()
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.batches = 0   # forward passes run, for the benchmark
        self.queries = 0
        self.cache_hits = 0
        threading.Thread(target=self._loop, name="query-batcher", daemon=True).start()

    def __getattr__(self, name):  # model_id, dim, cache, stats, st, covers, ...
        return getattr(self.inner, name)

    def encode(self, texts: Sequence[str], query: bool = False) -> np.ndarray:
        if not query:
            return self.inner.encode(texts)
        return self.encode_queries(texts)

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        from concurrent.futures import Future

        futures = []
        for q in queries:
            f: Future = Future()
            with self._cache_lock:
                hit = self._cache.get(q)
                if hit is not None:
                    self._cache.move_to_end(q)
                    self.cache_hits += 1
            if hit is not None:
                f.set_result(hit)
            else:
                self._q.put((q, f))
            futures.append(f)
        if not futures:
            return self.inner.encode_queries([])
        return np.stack([f.result() for f in futures])

    def _loop(self) -> None:
        import queue

        while True:
            items = [self._q.get()]
            while len(items) < self.max_batch:
                try:
                    items.append(self._q.get_nowait())
                except queue.Empty:
                    break
            try:
                vecs = self.inner.encode_queries([q for q, _ in items])
                with self._cache_lock:
                    for (q, _), v in zip(items, vecs):
                        self._cache[q] = v
                        self._cache.move_to_end(q)
                    while len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
                for (_, f), v in zip(items, vecs):
                    f.set_result(v)
            except Exception as e:  # noqa: BLE001 - every waiting request gets the error
                for _, f in items:
                    f.set_exception(e)
            self.batches += 1
            self.queries += len(items)
