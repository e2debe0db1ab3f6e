"""LangChain (langchain-core LCEL) adapters around the project's RAG pieces.

- ``KBRetriever``: a ``BaseRetriever`` over a ``KnowledgeBase`` (mode, k). Each passage becomes
  a ``Document`` whose metadata holds the chunk ``id``, ``doc_id``, ``score``, ``title`` and
  character offsets; ``document_to_passage`` turns it back.
- ``GeneratorChatModel``: a ``BaseChatModel`` over a ``rag.generate.Generator``: messages are
  rendered with the tokenizer's chat template exactly as ``Generator.chat_text`` does, decoded
  greedily with the generator's ``max_new_tokens``; token counts go to ``usage_metadata`` and
  ``llm_output``; while generating, text deltas go to the callbacks' ``on_llm_new_token`` (a
  transformers streamer in the calling thread).
- ``StepMetrics``: a callback handler that times every run (keyed by run id, grouped by the
  top-level chain run) and sums tokens, so a chain reports per-step latency: retrieve, prompt,
  llm, parse and the whole chain, plus the time to the first streamed token.
- ``build_rag_chain``: question -> retrieve -> prompt (``build_prompt``) -> chat model -> parse
  (``finish_answer``) -> ``Answer``. The prompt text, the gates (no passages, ``min_score``) and
  the answer post-processing are the native ``Generator.answer`` ones, so on the same passages
  the chain and the native pipeline give the model the very same text.

Threads: LCEL runs the branches of ``RunnableParallel`` / ``RunnablePassthrough.assign`` (and
``.batch``) in a thread pool. Two things break there: the knowledge base's SQLite handles may only
be used by the thread that opened them, and on a CPU a second thread running torch makes
OpenMP oversubscribe the cores (libgomp then stops spin-waiting), which slowed greedy decoding
by about 40% on 2 cores while that thread lived. So the chain calls the retriever and the model
from ``RunnableLambda`` steps, in the caller's thread, passing the run config on so callbacks
still see every step.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from typing import Any, Callable, Sequence
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, ChatResult, LLMResult
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import (Runnable, RunnableBranch, RunnableConfig,
                                      RunnableLambda)
from pydantic import ConfigDict, PrivateAttr, model_validator

from .. import models
from ..errors import ConfigError, DataError
from .generate import REFUSAL, Answer, build_prompt, finish_answer, question_lang
from .types import Passage

log = logging.getLogger(__name__)

MODES = ("hybrid", "dense", "bm25")
STEPS = ("retrieve", "prompt", "llm", "parse")   # the chain's named steps, in order


# --------------------------------------------------------------------------- retriever

def passage_to_document(p: Passage) -> Document:
    return Document(page_content=p.text, id=p.id,
                    metadata={"id": p.id, "doc_id": p.doc_id, "score": float(p.score),
                              "title": p.title, "start": p.start, "end": p.end})


def document_to_passage(d: Document) -> Passage:
    m = d.metadata
    return Passage(m.get("id", d.id or ""), m.get("doc_id", ""), d.page_content,
                   float(m.get("score", 0.0)), m.get("title", ""), m.get("start", 0), m.get("end", 0))


class KBRetriever(BaseRetriever):
    """A LangChain retriever over a ``KnowledgeBase``; ``busy_seconds`` sums the time spent in
    ``KnowledgeBase.search`` itself (to tell LangChain's own overhead apart)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    kb: Any
    mode: str = "hybrid"
    k: int = 5
    _busy: float = PrivateAttr(default=0.0)

    @model_validator(mode="after")
    def _check(self) -> "KBRetriever":
        if self.mode not in MODES:
            raise ConfigError(f"retriever mode: unknown '{self.mode}' (choose {', '.join(MODES)})")
        if self.k < 1:
            raise ConfigError(f"retriever k: must be >= 1, got {self.k}")
        return self

    @property
    def busy_seconds(self) -> float:
        return self._busy

    def _get_relevant_documents(self, query: str, *,
                                run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        if not isinstance(query, str) or not query.strip():
            raise DataError(f"retriever: the question is empty ({query!r})")
        t0 = time.perf_counter()
        passages = self.kb.search(query, self.k, self.mode)
        self._busy += time.perf_counter() - t0
        return [passage_to_document(p) for p in passages]


# --------------------------------------------------------------------------- chat model

_ROLES = {"human": "user", "user": "user", "ai": "assistant", "assistant": "assistant",
          "system": "system"}


def to_chat_dicts(messages: Sequence[BaseMessage]) -> list[dict]:
    out = []
    for m in messages:
        role = _ROLES.get(m.type)
        if role is None:
            raise DataError(f"chat model: unsupported message type '{m.type}'")
        out.append({"role": role, "content": m.text if hasattr(m, "text") else str(m.content)})
    return out


class GeneratorChatModel(BaseChatModel):
    """A LangChain chat model over ``rag.generate.Generator`` (greedy, its ``max_new_tokens``).

    ``busy_seconds`` sums the generation time measured inside the model call."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    generator: Any
    token_callbacks: bool = True   # report text deltas to on_llm_new_token while generating
    _busy: float = PrivateAttr(default=0.0)

    @property
    def _llm_type(self) -> str:
        return "llmtech-generator"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_id": self.generator.model_id,
                "max_new_tokens": self.generator.max_new_tokens}

    @property
    def busy_seconds(self) -> float:
        return self._busy

    def render(self, messages: Sequence[BaseMessage]) -> str:
        """The chat text the model reads: the same rendering as ``Generator.chat_text``."""
        return self.generator.render(to_chat_dicts(messages))

    @staticmethod
    def _cut(text: str, stop: list[str] | None) -> str:
        for s in stop or []:
            if s and s in text:
                text = text[:text.index(s)]
        return text

    def greedy(self, chat_text: str, on_text: Callable[[str], None] | None = None
               ) -> tuple[str, int, int, float]:
        """``Generator.generate_texts`` for one chat text (no padding), optionally calling
        ``on_text(delta)`` as the answer grows. Runs ``generate`` in the calling thread: on a
        CPU, a second thread running torch makes OpenMP oversubscribe the cores and (measured
        here, 2 cores) cut greedy decoding from ~22 to ~14 tokens/s.
        Returns (text, prompt tokens, completion tokens, seconds)."""
        gen = self.generator
        streamer = None
        if on_text:
            eos = gen.model.generation_config.eos_token_id or gen.tok.eos_token_id
            streamer = _TextDeltas(gen.tok, set(eos if isinstance(eos, list) else [eos]), on_text)
        return gen.generate_texts([chat_text], streamer=streamer)[0]

    def _combine_llm_outputs(self, llm_outputs: list[dict | None]) -> dict:
        usage = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
        for out in llm_outputs:
            for key, n in ((out or {}).get("token_usage") or {}).items():
                usage[key] = usage.get(key, 0) + n
        return {"token_usage": usage, "model_name": self.generator.model_id}

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager=None, **kwargs: Any) -> ChatResult:
        on_text = None
        if self.token_callbacks and run_manager is not None and run_manager.handlers:
            def on_text(delta: str) -> None:
                run_manager.on_llm_new_token(delta)
        text, n_in, n_out, secs = self.greedy(self.render(messages), on_text)
        self._busy += secs
        usage = {"input_tokens": n_in, "output_tokens": n_out, "total_tokens": n_in + n_out}
        meta = {"model_name": self.generator.model_id, "generate_seconds": secs}
        msg = AIMessage(content=self._cut(text, stop), usage_metadata=usage,
                        response_metadata=meta)
        return ChatResult(generations=[ChatGeneration(message=msg)],
                          llm_output={"token_usage": usage, **meta})


class _TextDeltas:
    """A transformers streamer that turns new tokens into text deltas. Leading/trailing
    whitespace and half-decoded characters are held back, so the deltas add up to the final
    (stripped) answer text."""

    def __init__(self, tok, eos_ids: set[int], on_text: Callable[[str], None]):
        self.tok, self.eos_ids, self.on_text = tok, eos_ids, on_text
        self.ids: list[int] = []
        self.sent, self.prompt_seen, self.done = "", False, False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt itself
            self.prompt_seen = True
            return
        for t in value.reshape(-1).tolist():
            self.done = self.done or t in self.eos_ids
            if not self.done:
                self.ids.append(t)
        now = self.tok.decode(self.ids, skip_special_tokens=True).rstrip("\ufffd").strip()
        if len(now) > len(self.sent) and now.startswith(self.sent):
            delta, self.sent = now[len(self.sent):], now
            self.on_text(delta)

    def end(self) -> None:
        pass


# --------------------------------------------------------------------------- callbacks

class StepMetrics(BaseCallbackHandler):
    """Times every LangChain run by run id and groups them by their top-level chain run.

    Steps: ``retrieve`` (retriever runs), ``llm`` (chat model / LLM runs, with token counts
    and the first streamed token), ``prompt`` / ``parse`` (chain runs with those names) and
    ``chain`` (runs without a parent). Other runs (LCEL glue) are kept with ``step=None``.
    """

    def __init__(self, step_names: Sequence[str] = ("prompt", "parse")):
        self.step_names = set(step_names)
        self.runs: dict[UUID, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self.runs.clear()

    # -- recording
    def _start(self, run_id: UUID, parent: UUID | None, kind: str, name: str | None) -> None:
        if kind == "retriever":
            step = "retrieve"
        elif kind == "llm":
            step = "llm"
        elif parent is None:
            step = "chain"
        else:
            step = name if name in self.step_names else None
        with self._lock:
            root = self.runs[parent]["root"] if parent in self.runs else (parent or run_id)
            self.runs[run_id] = {"run_id": run_id, "parent": parent, "root": root, "kind": kind,
                                 "name": name, "step": step, "start": time.perf_counter(),
                                 "end": None, "first_token": None, "input_tokens": 0,
                                 "output_tokens": 0, "error": None}

    def _end(self, run_id: UUID, error: BaseException | None = None, **fields) -> None:
        with self._lock:
            r = self.runs.get(run_id)
            if r is not None:
                r["end"] = time.perf_counter()
                r["error"] = None if error is None else repr(error)
                r.update(fields)

    def on_chain_start(self, serialized, inputs, *, run_id, parent_run_id=None, **kw):
        name = kw.get("name") or (serialized or {}).get("name")
        self._start(run_id, parent_run_id, "chain", name)

    def on_chain_end(self, outputs, *, run_id, **kw):
        self._end(run_id)

    def on_chain_error(self, error, *, run_id, **kw):
        self._end(run_id, error)

    def on_retriever_start(self, serialized, query, *, run_id, parent_run_id=None, **kw):
        self._start(run_id, parent_run_id, "retriever", kw.get("name"))

    def on_retriever_end(self, documents, *, run_id, **kw):
        self._end(run_id, n_docs=len(documents))

    def on_retriever_error(self, error, *, run_id, **kw):
        self._end(run_id, error)

    def on_chat_model_start(self, serialized, messages, *, run_id, parent_run_id=None, **kw):
        self._start(run_id, parent_run_id, "llm", kw.get("name"))

    def on_llm_start(self, serialized, prompts, *, run_id, parent_run_id=None, **kw):
        self._start(run_id, parent_run_id, "llm", kw.get("name"))

    def on_llm_new_token(self, token, *, run_id, **kw):
        with self._lock:
            r = self.runs.get(run_id)
            if r is not None and r["first_token"] is None and token:
                r["first_token"] = time.perf_counter()

    def on_llm_end(self, response: LLMResult, *, run_id, **kw):
        usage = dict((response.llm_output or {}).get("token_usage") or {})
        if not usage:
            for gens in response.generations:
                for g in gens:
                    u = getattr(getattr(g, "message", None), "usage_metadata", None) or {}
                    for key in ("input_tokens", "output_tokens"):
                        usage[key] = usage.get(key, 0) + u.get(key, 0)
        self._end(run_id, input_tokens=usage.get("input_tokens", 0),
                  output_tokens=usage.get("output_tokens", 0))

    def on_llm_error(self, error, *, run_id, **kw):
        self._end(run_id, error)

    # -- reading
    def per_chain(self) -> list[dict[str, Any]]:
        """One row per finished top-level run (a chain, or a model called alone), in start order: ms per step (summed when a
        step ran several times), ``first_token_ms`` from the chain's start, token counts."""
        with self._lock:
            runs = [dict(r) for r in self.runs.values()]
        rows = []
        for top in sorted((r for r in runs if r["parent"] is None and r["end"] is not None),
                          key=lambda r: r["start"]):
            mine = [r for r in runs if r["root"] == top["run_id"] and r["end"] is not None]
            row: dict[str, Any] = {"run_id": str(top["run_id"]),
                                   "chain_ms": (top["end"] - top["start"]) * 1e3}
            for step in STEPS:
                row[f"{step}_ms"] = sum((r["end"] - r["start"]) * 1e3 for r in mine
                                        if r["step"] == step)
            llm = [r for r in mine if r["step"] == "llm"]
            firsts = [r["first_token"] for r in llm if r["first_token"] is not None]
            row["first_token_ms"] = (min(firsts) - top["start"]) * 1e3 if firsts else None
            row["input_tokens"] = sum(r["input_tokens"] for r in llm)
            row["output_tokens"] = sum(r["output_tokens"] for r in llm)
            row["llm_calls"] = len(llm)
            row["errors"] = sum(r["error"] is not None for r in mine)
            rows.append(row)
        return rows

    def summary(self) -> dict[str, Any]:
        """Mean and median ms per step over the chain runs, the LLM's share of the chain time
        and output tokens per second of LLM time."""
        rows = self.per_chain()
        if not rows:
            return {"n_chains": 0}
        out: dict[str, Any] = {"n_chains": len(rows)}
        for step in ("chain", *STEPS):
            xs = [r[f"{step}_ms"] for r in rows]
            out[f"{step}_ms_mean"] = statistics.fmean(xs)
            out[f"{step}_ms_p50"] = statistics.median(xs)
        total = sum(r["chain_ms"] for r in rows)
        llm_ms = sum(r["llm_ms"] for r in rows)
        out["llm_share"] = llm_ms / total if total else 0.0
        out["tokens_per_s"] = (sum(r["output_tokens"] for r in rows) / (llm_ms / 1e3)
                               if llm_ms else 0.0)
        out["input_tokens"] = sum(r["input_tokens"] for r in rows)
        out["output_tokens"] = sum(r["output_tokens"] for r in rows)
        firsts = [r["first_token_ms"] for r in rows if r["first_token_ms"] is not None]
        out["first_token_ms_mean"] = statistics.fmean(firsts) if firsts else None
        return out


# --------------------------------------------------------------------------- the chain

def read_question(x: Any) -> dict[str, str]:
    """Chain input: a question string or ``{"question": ..., "lang": optional}``."""
    if isinstance(x, dict):
        if "question" not in x:
            raise DataError(f"chain input: needs a 'question' key, got keys {sorted(x)}")
        q, lang = x["question"], x.get("lang")
    else:
        q, lang = x, None
    if not isinstance(q, str) or not q.strip():
        raise DataError(f"chain input: the question is empty ({q!r})")
    lang = lang or question_lang(q)
    return {"question": q, "lang": lang if lang in REFUSAL else "en"}


def build_rag_chain(retriever: BaseRetriever, llm: BaseChatModel, *, system: str | None = None,
                    max_passage_chars: int | None = None, min_score: float | None = None,
                    attribute: bool = False, run_name: str = "rag_chain") -> Runnable:
    """question -> retrieve -> prompt -> chat model -> parse -> ``Answer`` (see module doc).

    The model is skipped (the refusal sentence, 0 tokens) when retrieval returns nothing or,
    with ``min_score``, when the best passage scores below it: the native gates."""

    def gate(state: dict) -> str | None:
        docs = state["docs"]
        if not docs:
            return "no_passages"
        if min_score is not None and max(d.metadata.get("score", 0.0) for d in docs) < min_score:
            return "low_score"
        return None

    def prompt(state: dict) -> list[BaseMessage]:
        passages = [document_to_passage(d) for d in state["docs"]]
        user = build_prompt(state["question"], passages, state["lang"],
                            max_passage_chars=max_passage_chars)
        return ([SystemMessage(system)] if system else []) + [HumanMessage(user)]

    def refuse(state: dict) -> AIMessage:
        return AIMessage(REFUSAL[state["lang"]], response_metadata={"reason": gate(state)})

    def parse(state: dict) -> Answer:
        msg = state["reply"]
        usage = getattr(msg, "usage_metadata", None) or {}
        meta = msg.response_metadata or {}
        a = Answer(state["question"], msg.text, False,
                   passages=[document_to_passage(d) for d in state["docs"]], lang=state["lang"],
                   reason=meta.get("reason", "model"),
                   prompt_tokens=usage.get("input_tokens", 0),
                   completion_tokens=usage.get("output_tokens", 0),
                   seconds=meta.get("generate_seconds", 0.0))
        if a.reason != "model":
            a.refused = True
            return a
        return finish_answer(a, attribute)

    # retriever and model are called in the caller's thread (see "Threads" in the module doc)
    def retrieve(state: dict, config: RunnableConfig) -> dict:
        return {**state, "docs": retriever.invoke(state["question"], config)}

    def respond(state: dict, config: RunnableConfig) -> dict:
        return {**state, "reply": answer.invoke(state, config)}

    answer = RunnableBranch((lambda s: gate(s) is not None, RunnableLambda(refuse, name="refuse")),
                            RunnableLambda(prompt, name="prompt") | llm)
    chain = (RunnableLambda(read_question, name="input")
             | RunnableLambda(retrieve, name="retrieval")
             | RunnableLambda(respond, name="generation")
             | RunnableLambda(parse, name="parse"))
    return chain.with_config(run_name=run_name)
