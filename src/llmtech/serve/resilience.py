"""Hybrid inference that always ends in an answer or an explicit human handoff.

Four pieces, each small enough to read:

- **Routing by retrieval confidence.** ``rag.confidence.ConfidenceScorer`` scores the retrieved
  passages; at or above ``threshold`` the question goes to the RAG chain, below it goes to
  ``below``: ``"handoff"`` (default) or ``"model_only"``. On the customer-service knowledge base
  the default is a handoff: the facts (prices, policies, error codes) belong to a fictional
  company, so a closed-book answer from the model is a guess, and a low-confidence question is
  more often out of scope than answerable. ``"model_only"`` suits general-knowledge assistants.
- **A fallback chain with per-step deadlines.** ``rag`` (the model answers from the passages)
  → ``model_only`` (closed book) → ``canned`` (the best passage quoted verbatim, no model) →
  ``handoff``. A step fails by exception, by timeout, or by a quality check (empty answer,
  refusal, no passages); the next step then runs. Generation deadlines are real: the
  ``Generator`` passes ``max_time`` to transformers' ``generate``, which stops decoding once it
  is exceeded. Retrieval runs in a worker thread and is abandoned at its deadline (a Python
  thread cannot be killed; the breaker then stops sending calls to the slow store).
- **Circuit breakers** around the vector store and the model: closed → open after
  ``fail_max`` consecutive failures → half-open after ``cooldown_s`` (one trial call) → closed
  on success or open again on failure. While the store breaker is open, retrieval degrades to
  BM25 only (the knowledge base keeps both indexes); while the model breaker is open the model
  steps are skipped at once instead of waiting for their deadlines. The clock is injectable.
  (pybreaker was considered: it reads ``datetime.now`` directly, so its cool-down cannot be
  tested without patching time, and it adds a dependency for ~40 lines of state machine.)
- **Fault injection** (``FaultInjector``): the vector store raises ("store down") or sleeps past
  the retrieval deadline ("store slow"), every model forward pass sleeps so generation overruns
  its deadline ("model timeout") or raises ("model error"), retrieval returns nothing ("empty
  retrieval"). Faults act on the real components (a store proxy, a forward pre-hook), so the
  code paths exercised are the production ones.

Every request gives a ``Response``: request id, path taken (``rag`` / ``bm25_only`` /
``model_only`` / ``canned`` / ``handoff``), the steps tried with their outcome and reason,
latency, final text and cited documents; ``ResilientQA.ask`` logs it as one JSON line.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Sequence

from pydantic import Field

from ..config import StrictModel
from ..rag.generate import Answer, finish_answer, question_lang
from ..rag.types import Passage

log = logging.getLogger(__name__)
request_log = logging.getLogger(__name__ + ".requests")   # one JSON line per request

PATHS = ("rag", "bm25_only", "model_only", "canned", "handoff")
ANSWER_PATHS = PATHS[:-1]
FAULTS = ("store_down", "store_slow", "model_timeout", "model_error", "empty_retrieval")

HANDOFF = {
    "zh": "抱歉，这个问题我暂时无法可靠地回答，已为您转接人工客服，请稍候。",
    "en": "Sorry, I cannot answer this reliably right now. I am transferring you to a human agent.",
}
CANNED = {
    "zh": "以下是知识库中最相关的内容（自动摘录，未经模型整理）：",
    "en": "Here is the most relevant passage from our documentation (quoted, not summarised):",
}


class ResilienceSettings(StrictModel):
    """Routing, deadlines and breaker settings (seconds are wall-clock on the serving machine)."""

    threshold: float = Field(0.44, ge=0.0, le=1.0)   # retrieval confidence needed for RAG
    below: Literal["model_only", "handoff"] = "handoff"
    chain: list[Literal["rag", "model_only", "canned"]] = ["rag", "model_only", "canned"]
    k: int = Field(3, ge=1)                           # passages retrieved and shown to the model
    retrieval_timeout_s: float = Field(2.0, gt=0)
    rag_timeout_s: float = Field(8.0, gt=0)           # generation deadline of the RAG step
    model_timeout_s: float = Field(4.0, gt=0)         # generation deadline of the model-only step
    store_fail_max: int = Field(3, ge=1)
    model_fail_max: int = Field(3, ge=1)
    cooldown_s: float = Field(5.0, ge=0)              # open -> half-open after this long
    canned_chars: int = Field(160, ge=20)             # how much of the best passage to quote


# --------------------------------------------------------------------------- circuit breaker

class BreakerOpen(RuntimeError):
    """A call was refused because its circuit breaker is open."""


class CircuitBreaker:
    """closed → open after ``fail_max`` consecutive failures → half-open once ``cooldown_s`` has
    passed (exactly one trial call is let through) → closed if the trial succeeds, open again
    (with a fresh cool-down) if it fails. ``history`` holds ``(time, state)`` at every change."""

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

    def __init__(self, name: str, fail_max: int = 3, cooldown_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        if fail_max < 1 or cooldown_s < 0:
            raise ValueError("fail_max must be >= 1 and cooldown_s >= 0")
        self.name, self.fail_max, self.cooldown_s, self.clock = name, fail_max, cooldown_s, clock
        self._state, self.failures, self.opened_at = self.CLOSED, 0, 0.0
        self._trial = False
        self.rejected = 0
        self.history: list[tuple[float, str]] = [(clock(), self.CLOSED)]
        self._lock = threading.Lock()

    def _set(self, state: str) -> None:
        if state != self._state:
            log.info("breaker %s: %s -> %s", self.name, self._state, state)
            self._state = state
            self.history.append((self.clock(), state))

    @property
    def state(self) -> str:
        with self._lock:
            if self._state == self.OPEN and self.clock() - self.opened_at >= self.cooldown_s:
                self._set(self.HALF_OPEN)
                self._trial = False
            return self._state

    def allow(self) -> bool:
        """May a call go through now? (In half-open, only the first caller gets the trial.)"""
        state = self.state
        with self._lock:
            if state == self.CLOSED:
                return True
            if state == self.HALF_OPEN and not self._trial:
                self._trial = True
                return True
            self.rejected += 1
            return False

    def success(self) -> None:
        with self._lock:
            self.failures, self._trial = 0, False
            self._set(self.CLOSED)

    def failure(self) -> None:
        with self._lock:
            self.failures += 1
            if self._state == self.HALF_OPEN or self.failures >= self.fail_max:
                self.opened_at, self._trial = self.clock(), False
                self._set(self.OPEN)

    def call(self, fn: Callable, *args, **kwargs):
        """Run ``fn`` through the breaker: ``BreakerOpen`` when refused; failures are recorded
        and re-raised."""
        if not self.allow():
            raise BreakerOpen(f"{self.name} breaker is open")
        try:
            out = fn(*args, **kwargs)
        except Exception:
            self.failure()
            raise
        self.success()
        return out

    @property
    def opened(self) -> bool:
        return any(s == self.OPEN for _, s in self.history)


# --------------------------------------------------------------------------- records

@dataclass
class Step:
    name: str        # retrieve:hybrid | retrieve:bm25 | rag | model_only | canned | handoff
    outcome: str     # ok | error | timeout | rejected | quality | skipped
    reason: str = ""
    seconds: float = 0.0


@dataclass
class Response:
    request_id: str
    question: str
    path: str
    text: str
    citations: list[str]
    latency_s: float
    confidence: float
    steps: list[Step] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    answer: Answer | None = None   # for evaluate_answers; not part of the log record

    @property
    def handled(self) -> bool:
        """Ended in an answer or an explicit handoff, with text the user can read."""
        return self.path in PATHS and bool(self.text.strip())

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("answer")
        d["latency_s"], d["confidence"] = round(self.latency_s, 3), round(self.confidence, 4)
        for s in d["steps"]:
            s["seconds"] = round(s["seconds"], 3)
        return d


# --------------------------------------------------------------------------- the service

class ResilientQA:
    """Routes each question by retrieval confidence and walks the fallback chain.

    ``kb``: a ``rag.kb.KnowledgeBase``; ``generator``: a ``rag.generate.Generator`` (its
    ``max_time`` is set per step); ``scorer``: a ``rag.confidence.ConfidenceScorer`` on ``kb``.
    ``log_file``: an open text file that gets each response as one JSON line.
    """

    def __init__(self, kb, generator, scorer, settings: ResilienceSettings | None = None,
                 clock: Callable[[], float] = time.monotonic, log_file=None):
        self.kb, self.gen, self.scorer = kb, generator, scorer
        self.settings = settings or ResilienceSettings()
        self.clock, self.log_file = clock, log_file
        self.search: Callable[[str, int, str], list[Passage]] = kb.search  # an injection point
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="retrieval")
        self._gen_lock = threading.Lock()
        self.reset_breakers()

    def reset_breakers(self) -> None:
        s = self.settings
        self.store_breaker = CircuitBreaker("vector_store", s.store_fail_max, s.cooldown_s, self.clock)
        self.model_breaker = CircuitBreaker("model", s.model_fail_max, s.cooldown_s, self.clock)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def warmup(self, question: str = "warm-up") -> None:
        """Load what the first request would otherwise pay for (jieba's dictionary, the
        embedder, numba kernels, the model's first forward), without deadlines, so that the
        deadlines measure the service and not its start-up."""
        for mode in ("bm25", "hybrid"):
            self.search(question, self.settings.k, mode)
        self.gen.answer(question, None)

    # -- retrieval: hybrid under the store breaker and a deadline, else BM25 only
    def _with_deadline(self, fn: Callable, *args, timeout: float):
        return self._pool.submit(fn, *args).result(timeout=timeout)

    def retrieve(self, question: str, steps: list[Step]) -> tuple[list[Passage], str]:
        s, br = self.settings, self.store_breaker
        if br.allow():
            t0 = time.perf_counter()
            try:
                ps = self._with_deadline(self.search, question, s.k, "hybrid",
                                         timeout=s.retrieval_timeout_s)
                br.success()
                steps.append(Step("retrieve:hybrid", "ok", f"{len(ps)} passages",
                                  time.perf_counter() - t0))
                return ps, "hybrid"
            except FutureTimeout:
                br.failure()
                steps.append(Step("retrieve:hybrid", "timeout", f"> {s.retrieval_timeout_s}s",
                                  time.perf_counter() - t0))
            except Exception as e:  # noqa: BLE001 - any store failure degrades to BM25
                br.failure()
                steps.append(Step("retrieve:hybrid", "error", _why(e), time.perf_counter() - t0))
        else:
            steps.append(Step("retrieve:hybrid", "rejected", "vector-store breaker open"))
        t0 = time.perf_counter()
        try:
            ps = self._with_deadline(self.search, question, s.k, "bm25",
                                     timeout=s.retrieval_timeout_s)
            steps.append(Step("retrieve:bm25", "ok", f"{len(ps)} passages",
                              time.perf_counter() - t0))
            return ps, "bm25"
        except FutureTimeout:
            steps.append(Step("retrieve:bm25", "timeout", f"> {s.retrieval_timeout_s}s",
                              time.perf_counter() - t0))
        except Exception as e:  # noqa: BLE001
            steps.append(Step("retrieve:bm25", "error", _why(e), time.perf_counter() - t0))
        return [], "none"

    # -- generation under the model breaker and a real deadline
    def _generate(self, name: str, question: str, passages: list[Passage] | None, lang: str,
                  budget: float, steps: list[Step]) -> Answer | None:
        if not self.model_breaker.allow():
            steps.append(Step(name, "rejected", "model breaker open"))
            return None
        t0 = time.perf_counter()
        try:
            with self._gen_lock:
                self.gen.max_time = budget
                try:
                    a = self.gen.answer(question, passages, lang)
                finally:
                    self.gen.max_time = None
        except Exception as e:  # noqa: BLE001 - the model failing is what the chain is for
            self.model_breaker.failure()
            steps.append(Step(name, "error", _why(e), time.perf_counter() - t0))
            return None
        secs = time.perf_counter() - t0
        if secs > budget:  # generate() stopped at max_time: the answer is cut off
            self.model_breaker.failure()
            steps.append(Step(name, "timeout", f"{secs:.2f}s > {budget}s deadline", secs))
            return None
        self.model_breaker.success()
        if not a.text.strip():
            steps.append(Step(name, "quality", "empty answer", secs))
            return None
        if a.refused:
            steps.append(Step(name, "quality", "refusal", secs))
            return None
        steps.append(Step(name, "ok", "", secs))
        return a

    def _canned(self, question: str, passages: list[Passage], lang: str) -> Answer:
        top = passages[0]
        body = " ".join(top.text.split())
        cut = self.settings.canned_chars
        body = body if len(body) <= cut else body[:cut] + "…"
        a = Answer(question, f"{CANNED[lang]}{body} [1]", False, passages=[top], lang=lang,
                   reason="canned")
        return finish_answer(a)

    # -- one request
    def ask(self, question: str, request_id: str | None = None, lang: str | None = None,
            faults: Sequence[str] = ()) -> Response:
        s = self.settings
        t0 = time.perf_counter()
        rid = request_id or uuid.uuid4().hex[:12]
        lang = lang if lang in HANDOFF else question_lang(question)
        steps: list[Step] = []
        passages, mode = self.retrieve(question, steps)
        try:
            conf = self.scorer.score(question, passages).value if passages else 0.0
        except Exception as e:  # noqa: BLE001 - no confidence means no trust in retrieval
            steps.append(Step("confidence", "error", _why(e)))
            conf = 0.0
        confident = bool(passages) and conf >= s.threshold
        if confident:
            plan = list(s.chain)
        else:
            steps.append(Step("route", "skipped", f"confidence {conf:.3f} < {s.threshold:.3f}"
                              if passages else "no passages"))
            plan = ["model_only"] if s.below == "model_only" else []
        answer, path = None, "handoff"
        for name in plan:
            if name == "rag":
                answer = self._generate("rag", question, passages, lang, s.rag_timeout_s, steps)
                path = "rag" if mode == "hybrid" else "bm25_only"
            elif name == "model_only":
                answer = self._generate("model_only", question, None, lang, s.model_timeout_s,
                                        steps)
                path = "model_only"
            elif name == "canned":
                answer = self._canned(question, passages, lang)
                steps.append(Step("canned", "ok", passages[0].doc_id))
                path = "canned"
            if answer is not None:
                break
        if answer is None:
            path = "handoff"
            answer = Answer(question, HANDOFF[lang], True, lang=lang, reason="handoff")
            steps.append(Step("handoff", "ok", "no step gave a usable answer"))
        r = Response(rid, question, path, answer.text, list(answer.cited_doc_ids),
                     time.perf_counter() - t0, conf, steps, list(faults), answer)
        self._log(r)
        return r

    def _log(self, r: Response) -> None:
        line = json.dumps(r.as_dict(), ensure_ascii=False)
        request_log.info("%s", line)
        if self.log_file is not None:
            self.log_file.write(line + "\n")
            self.log_file.flush()


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:200]


# --------------------------------------------------------------------------- fault injection

class InjectedFault(RuntimeError):
    """Raised by an injected fault (never by a real component)."""


class _FaultyStore:
    """A proxy in front of the real vector store that fails when told to."""

    def __init__(self, real, injector: "FaultInjector"):
        self._real, self._inj = real, injector

    def search(self, queries, k):
        if "store_down" in self._inj.active:
            raise InjectedFault("vector store down (connection refused)")
        if "store_slow" in self._inj.active:
            time.sleep(self._inj.store_delay_s)
        return self._real.search(queries, k)

    def __len__(self):
        return len(self._real)

    def __getattr__(self, name):
        return getattr(self._real, name)


class FaultInjector:
    """Wraps a ``ResilientQA``'s components so faults can be switched on per request.

    ``with injector.faults("store_down", "model_timeout"): service.ask(...)``. ``remove()``
    restores the real components."""

    def __init__(self, service: ResilientQA, store_delay_s: float | None = None,
                 model_delay_s: float = 0.5):
        self.service, self.active = service, set()
        # by default the slow store overruns the retrieval deadline by a clear margin
        self.store_delay_s = store_delay_s or 2.0 * service.settings.retrieval_timeout_s
        self.model_delay_s = model_delay_s
        kb = service.kb
        self._real_store = kb.store
        kb._store = _FaultyStore(self._real_store, self)  # the store object kb.search uses
        self._real_search = service.search

        def search(question, k, mode):
            if "empty_retrieval" in self.active:
                return []
            return self._real_search(question, k, mode)

        service.search = search

        def pre_hook(module, args, kwargs):
            if "model_error" in self.active:
                raise InjectedFault("model server error (CUDA error: device-side assert)")
            if "model_timeout" in self.active:
                time.sleep(self.model_delay_s)

        self._hook = service.gen.model.register_forward_pre_hook(pre_hook, with_kwargs=True)

    @contextmanager
    def faults(self, *names: str):
        unknown = [n for n in names if n not in FAULTS]
        if unknown:
            raise ValueError(f"unknown fault(s) {unknown}; known: {', '.join(FAULTS)}")
        before = set(self.active)
        self.active |= set(names)
        try:
            yield self
        finally:
            self.active = before

    def remove(self) -> None:
        self.service.kb._store = self._real_store
        self.service.search = self._real_search
        self._hook.remove()


# --------------------------------------------------------------------------- scenarios

SCENARIOS = ("none", "store_down", "store_slow", "model_timeout", "model_error",
             "empty_retrieval", "flapping_store", "mix")


def scenario_plan(name: str, n: int, seed: int = 0) -> list[list[str]]:
    """The faults active for each of ``n`` requests of a scenario.

    ``flapping_store``: the store is down for the first 60 % of requests, then back (the
    breaker opens, probes in half-open, closes). ``mix``: each request draws one of
    no fault / each single fault / store down + model timeout, seeded."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    if name == "none":
        return [[] for _ in range(n)]
    if name == "flapping_store":
        down = max(1, round(0.6 * n))
        return [["store_down"] if i < down else [] for i in range(n)]
    if name == "mix":
        rng = random.Random(seed)
        menu = [[]] + [[f] for f in FAULTS] + [["store_down", "model_timeout"]]
        return [list(rng.choice(menu)) for _ in range(n)]
    return [[name] for _ in range(n)]


def run_scenario(service: ResilientQA, injector: FaultInjector, name: str,
                 questions: Sequence[dict], seed: int = 0,
                 interval_s: float = 0.0) -> dict[str, Any]:
    """Ask ``questions`` (dicts with ``question`` and optional ``lang``) under the scenario's
    faults, with fresh breakers; request ``i`` arrives ``i * interval_s`` seconds after the
    start (or as soon as the previous one is done), so cool-downs play out in real time. An exception escaping ``ask`` counts as unhandled
    (and is recorded, not re-raised). Returns the responses, the unhandled errors, the
    breakers' histories relative to the scenario's start, and summary rates."""
    service.reset_breakers()
    start = service.clock()
    plan = scenario_plan(name, len(questions), seed)
    responses: list[Response] = []
    errors: list[str] = []
    for i, (q, faults) in enumerate(zip(questions, plan)):
        wait = start + i * interval_s - service.clock()
        if wait > 0:
            time.sleep(wait)
        with injector.faults(*faults):
            try:
                responses.append(service.ask(q["question"], f"{name}-{i:03d}", q.get("lang"),
                                             faults=faults))
            except Exception as e:  # noqa: BLE001 - this is exactly what must never happen
                errors.append(_why(e))
    return {"scenario": name, "responses": responses, "errors": errors,
            "history": {b.name: [(t - start, s) for t, s in b.history]
                        for b in (service.store_breaker, service.model_breaker)},
            "seconds": service.clock() - start,
            "store_breaker_opened": service.store_breaker.opened,
            "model_breaker_opened": service.model_breaker.opened,
            "summary": summarize(responses, len(questions))}


def summarize(responses: Sequence[Response], n: int) -> dict[str, Any]:
    """Shares of ``n`` requests: answered, handed off, unhandled; paths; p50 latency."""
    import numpy as np

    ok = [r for r in responses if r.handled]
    answered = sum(r.path in ANSWER_PATHS for r in ok)
    handoff = sum(r.path == "handoff" for r in ok)
    paths = {p: sum(r.path == p for r in ok) for p in PATHS}
    lat = [r.latency_s for r in responses]
    return {"n": n, "answered": answered / n if n else 0.0, "handoff": handoff / n if n else 0.0,
            "unhandled": n - len(ok), "handled_rate": len(ok) / n if n else 1.0,
            "paths": paths, "p50_s": float(np.median(lat)) if lat else 0.0}
