"""A closed-loop load generator and its statistics, for in-process callables and the real service.

Closed loop: ``clients`` threads each send one request, wait for the answer, and send the next
one at once, for ``duration_s`` seconds or until ``requests`` requests have been sent in total.
That is how a fixed pool of users (or worker processes) behaves: the offered load adapts to the
server's speed, so throughput saturates instead of a queue growing without bound.

    res = run_load(lambda i: kb.search(questions[i % n], 5), clients=4, duration_s=5, warmup_s=1)
    res.stats()   # {"n": ..., "errors": ..., "throughput": ..., "p50_ms": ..., "p95_ms": ...}

A target is any callable ``target(i)`` (``i`` counts requests from 0, handy for cycling through
questions). It may return ``None``, a number of generated tokens (``int``), or a dict with
``tokens`` and/or ``items`` (work units per request, e.g. the batch size). An exception is a
failed request: counted in ``errors`` with its message, never stopping the run.

A warm-up phase (``warmup_s`` seconds and/or ``warmup_requests`` requests, same clients) runs
first and is kept apart: first calls pay for lazy loading, JIT compilation (numba in bm25s,
oneDNN kernels in torch) and cold caches, which a steady-state measurement must not include.

Statistics (``LoadResult.stats``): latency percentiles by ``numpy.percentile`` (linear
interpolation) over the successful requests of the measured phase; ``throughput`` = successful
requests / wall time of the measured phase (first start to last end); ``tokens_per_s`` and
``items_per_s`` the same for tokens and items.

``HttpTarget`` posts JSON to a running server (``retrieval_target`` for the RAGFlow-compatible
``/api/v1/retrieval``, ``chat_target`` for the OpenAI-compatible ``/v1/chat/completions``);
``upload_dataset`` creates a dataset over the same API and waits until its documents are
parsed; ``start_server`` starts ``llmtech serve`` in a child process (``launch.Server``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import ConfigError, LlmtechError

log = logging.getLogger(__name__)

Target = Callable[[int], Any]


class RequestFailed(LlmtechError):
    """A request the target considers failed (HTTP status, API error code, bad body)."""


@dataclass
class Sample:
    """One request: perf_counter start/end, outcome, and what it produced."""

    start: float
    end: float
    ok: bool
    error: str | None = None
    tokens: int = 0
    items: int = 1

    @property
    def latency(self) -> float:
        return self.end - self.start


@dataclass
class LoadResult:
    name: str
    clients: int
    samples: list[Sample] = field(default_factory=list)   # the measured phase only
    warmup: list[Sample] = field(default_factory=list)    # excluded from every statistic

    def errors(self) -> list[str]:
        return [s.error or "" for s in self.samples if not s.ok]

    def stats(self) -> dict[str, Any]:
        """Flat statistics of the measured phase (see module docstring); latencies in ms."""
        ok = [s for s in self.samples if s.ok]
        wall = (max(s.end for s in self.samples) - min(s.start for s in self.samples)) \
            if self.samples else 0.0
        lat = np.array([s.latency for s in ok]) * 1000.0
        pct = (lambda q: float(np.percentile(lat, q))) if len(lat) else (lambda q: None)
        per_s = (lambda x: x / wall) if wall > 0 else (lambda x: None)
        errs = self.errors()
        return {"clients": self.clients, "n": len(ok), "errors": len(errs),
                "error_rate": len(errs) / len(self.samples) if self.samples else 0.0,
                "warmup_n": len(self.warmup), "wall_s": wall,
                "throughput": per_s(len(ok)),
                "items_per_s": per_s(sum(s.items for s in ok)),
                "tokens_per_s": per_s(sum(s.tokens for s in ok)),
                "tokens": sum(s.tokens for s in ok),
                "mean_ms": float(lat.mean()) if len(lat) else None,
                "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
                "max_ms": float(lat.max()) if len(lat) else None,
                "first_error": errs[0] if errs else ""}


def check_load_settings(clients: int, duration_s: float | None, requests: int | None,
                        warmup_s: float = 0.0, warmup_requests: int = 0) -> None:
    """Raise ``ConfigError`` naming the setting when a load-test setting is out of range."""
    if not isinstance(clients, int) or clients < 1:
        raise ConfigError(f"clients: must be an integer >= 1, got {clients!r}")
    if duration_s is None and requests is None:
        raise ConfigError("duration_s / requests: give a duration or a request count")
    if duration_s is not None and not duration_s > 0:
        raise ConfigError(f"duration_s: must be > 0 seconds, got {duration_s!r}")
    if requests is not None and requests < 1:
        raise ConfigError(f"requests: must be >= 1, got {requests!r}")
    if warmup_s < 0:
        raise ConfigError(f"warmup_s: must be >= 0, got {warmup_s!r}")
    if warmup_requests < 0:
        raise ConfigError(f"warmup_requests: must be >= 0, got {warmup_requests!r}")


def _call(target: Target, i: int) -> Sample:
    t0 = time.perf_counter()
    try:
        out = target(i)
    except Exception as e:  # noqa: BLE001 - any failure of the target is a failed request
        return Sample(t0, time.perf_counter(), False, f"{type(e).__name__}: {e}"[:300])
    t1 = time.perf_counter()
    tokens, items = 0, 1
    if isinstance(out, dict):
        tokens, items = int(out.get("tokens", 0)), int(out.get("items", 1))
    elif isinstance(out, (int, np.integer)) and not isinstance(out, bool):
        tokens = int(out)
    return Sample(t0, t1, True, None, tokens, items)


def _phase(target: Target, clients: int, duration_s: float | None, requests: int | None,
           first_index: int = 0) -> list[Sample]:
    """Run ``clients`` closed-loop threads until the time or the request budget is used up."""
    lock = threading.Lock()
    counter = [first_index]
    limit = None if requests is None else first_index + requests
    samples: list[Sample] = []
    end = None if duration_s is None else time.perf_counter() + duration_s

    def next_index() -> int | None:
        with lock:
            if limit is not None and counter[0] >= limit:
                return None
            if end is not None and time.perf_counter() >= end:
                return None
            counter[0] += 1
            return counter[0] - 1

    def client() -> None:
        mine = []
        while (i := next_index()) is not None:
            mine.append(_call(target, i))
        with lock:
            samples.extend(mine)

    threads = [threading.Thread(target=client, name=f"load-client-{c}", daemon=True)
               for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    samples.sort(key=lambda s: s.start)
    return samples


def run_load(target: Target, clients: int = 1, duration_s: float | None = None,
             requests: int | None = None, warmup_s: float = 0.0, warmup_requests: int = 0,
             name: str = "") -> LoadResult:
    """Drive ``target`` with ``clients`` closed-loop clients; see the module docstring.

    With both ``duration_s`` and ``requests`` the run stops at whichever comes first. A request
    still running when the time is up is waited for and counted (it started in the window).
    """
    check_load_settings(clients, duration_s, requests, warmup_s, warmup_requests)
    res = LoadResult(name, clients)
    if warmup_s > 0 or warmup_requests > 0:
        res.warmup = _phase(target, clients, warmup_s or None, warmup_requests or None)
    res.samples = _phase(target, clients, duration_s, requests, first_index=len(res.warmup))
    st = res.stats()
    log.debug("%s: %d ok, %d errors, %.2f req/s, p50 %s ms", name or "load", st["n"],
             st["errors"], st["throughput"] or 0.0, st["p50_ms"])
    return res


def slug(name: str) -> str:
    """A metrics-key-safe form of a configuration name ("faiss k=5" -> "faiss_k5")."""
    out = "".join(c if c.isalnum() else "_" for c in name.lower().replace("=", ""))
    return "_".join(p for p in out.split("_") if p)


def summary_row(name: str, stats: dict[str, Any], kind: str = "") -> dict[str, Any]:
    """One table row for a configuration (latencies rounded to 0.1 ms)."""
    r = lambda v, d=1: None if v is None else round(v, d)  # noqa: E731
    row = {"config": name, "kind": kind, "clients": stats["clients"], "n": stats["n"],
           "errors": stats["errors"], "req/s": r(stats["throughput"], 2),
           "p50 ms": r(stats["p50_ms"]), "p95 ms": r(stats["p95_ms"]),
           "p99 ms": r(stats["p99_ms"]), "max ms": r(stats["max_ms"])}
    if stats["tokens"]:
        row["tokens/s"] = r(stats["tokens_per_s"], 2)
    return row


def flat_metrics(name: str, stats: dict[str, Any]) -> dict[str, Any]:
    """metrics.json keys for one configuration: ``<slug>_p50_ms`` ... ``<slug>_throughput``."""
    k = slug(name)
    return {f"{k}_{key}": stats[key] for key in
            ("p50_ms", "p95_ms", "p99_ms", "throughput", "n", "errors")}


def percentile_figure(stats: dict[str, dict[str, Any]]):
    """Grouped bars of p50/p95/p99 per named configuration (log scale); returns the figure."""
    import matplotlib.pyplot as plt

    names = list(stats)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.8 * len(names) + 3), 4.5))
    for j, (p, color) in enumerate((("p50_ms", "C0"), ("p95_ms", "C1"), ("p99_ms", "C3"))):
        ax.bar([x + (j - 1) * 0.27 for x in range(len(names))],
               [stats[n][p] or 0 for n in names], 0.27, label=p[:-3], color=color)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set(yscale="log", ylabel="latency (ms, log)", title="latency percentiles per configuration")
    ax.legend()
    fig.tight_layout()
    return fig


def clients_figure(clients: Sequence[int], stats: Sequence[dict[str, Any]], title: str):
    """Throughput (left axis) and p95 latency (right axis) against the number of clients."""
    import matplotlib.pyplot as plt

    fig, ax1 = plt.subplots(figsize=(6, 4))
    ax1.plot(list(clients), [s["throughput"] for s in stats], "o-", label="throughput (req/s)")
    ax2 = ax1.twinx()
    ax2.plot(list(clients), [s["p95_ms"] for s in stats], "s--", color="C3", label="p95 (ms)")
    ax1.set(xlabel="concurrent clients", ylabel="req/s", title=title)
    ax2.set_ylabel("p95 latency (ms)")
    fig.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


class Bench:
    """The results of a series of configurations: table rows, flat metrics and stats by name."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.stats: dict[str, dict[str, Any]] = {}
        self.kinds: dict[str, str] = {}
        self.metrics: dict[str, Any] = {}

    def add(self, name: str, res: LoadResult, kind: str = "") -> dict[str, Any]:
        """Record one configuration's result; prints a one-line summary and returns its stats."""
        st = res.stats()
        self.stats[name], self.kinds[name] = st, kind
        self.rows.append(summary_row(name, st, kind))
        self.metrics.update(flat_metrics(name, st))
        line = (f"  {name}: {st['n']} ok, {st['throughput'] or 0:.2f} req/s, "
                f"p50 {st['p50_ms'] or 0:.1f} ms")
        if st["errors"]:
            line += f", {st['errors']} errors ({st['first_error']})"
        print(line, flush=True)
        return st


def read_questions(path: str | Path, n: int | None = None, seed: int = 0) -> list[str]:
    """The ``question`` texts of a JSONL/JSON file, shuffled with ``seed``, the first ``n``.
    A record without a question raises ``DataError`` naming the file and line."""
    import random

    from ..data.formats import read_records
    from ..errors import DataError

    qs = []
    for loc, r in read_records(path):
        if not isinstance(r.get("question"), str) or not r["question"].strip():
            raise DataError(f"{loc}: record has no 'question' text")
        qs.append(r["question"])
    random.Random(seed).shuffle(qs)
    return qs[:n] if n else qs


# --------------------------------------------------------------------------- HTTP targets

class HttpTarget:
    """POST a JSON body to ``base_url + path``; ``body(i)`` builds request ``i``'s body.

    A non-2xx status, a RAGFlow-style ``code != 0`` or a body that is not JSON raises
    ``RequestFailed`` (counted as an error by ``run_load``). Each client thread keeps its own
    ``requests.Session`` (keep-alive connections, as a real client pool would).
    ``tokens(json)`` may extract the generated token count from a reply."""

    def __init__(self, base_url: str, path: str, body: Callable[[int], dict],
                 api_key: str | None = None, timeout_s: float = 120.0,
                 tokens: Callable[[dict], int] | None = None):
        self.url = base_url.rstrip("/") + path
        self.body, self.timeout_s, self.tokens = body, timeout_s, tokens
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._local = threading.local()

    def _session(self):
        import requests

        if getattr(self._local, "session", None) is None:
            self._local.session = requests.Session()
        return self._local.session

    def __call__(self, i: int) -> dict:
        r = self._session().post(self.url, json=self.body(i), headers=self.headers,
                                 timeout=self.timeout_s)
        try:
            data = r.json()
        except ValueError:
            raise RequestFailed(f"HTTP {r.status_code}: not JSON: {r.text[:200]!r}") from None
        if r.status_code >= 300:
            msg = None
            if isinstance(data, dict):
                err = data.get("error")
                msg = (err.get("message") if isinstance(err, dict) else err) or data.get("message")
            raise RequestFailed(f"HTTP {r.status_code}: {msg or r.text[:200]}")
        if isinstance(data, dict) and data.get("code", 0) != 0:
            raise RequestFailed(f"API code {data['code']}: {data.get('message')}")
        return {"tokens": self.tokens(data) if self.tokens else 0}


def retrieval_target(base_url: str, api_key: str | None, dataset_ids: Sequence[str],
                     questions: Sequence[str], top_k: int = 5, vary: bool = False,
                     vector_weight: float = 0.3, timeout_s: float = 60.0) -> HttpTarget:
    """Request ``i`` asks ``questions[i % n]`` on the RAGFlow-compatible retrieval API.

    The service keeps recent query vectors in an LRU cache, so cycling through a few questions
    soon measures cache hits only; ``vary=True`` appends `` #<i>`` to each question, making
    every query new (its embedding is computed) while barely changing what it retrieves."""
    if not questions:
        raise ConfigError("questions: the load test needs at least one question")
    qs, ds = list(questions), list(dataset_ids)
    text = (lambda i: f"{qs[i % len(qs)]} #{i}") if vary else (lambda i: qs[i % len(qs)])
    return HttpTarget(base_url, "/api/v1/retrieval", lambda i: {
        "question": text(i), "dataset_ids": ds, "page_size": top_k, "top_k": top_k,
        "similarity_threshold": 0.0, "vector_similarity_weight": vector_weight},
        api_key, timeout_s)


def chat_target(base_url: str, api_key: str | None, model: str, questions: Sequence[str],
                max_tokens: int = 16, timeout_s: float = 300.0) -> HttpTarget:
    """Request ``i`` asks ``questions[i % n]`` on ``/v1/chat/completions`` (non-streaming);
    its tokens are the reply's ``usage.completion_tokens``."""
    if not questions:
        raise ConfigError("questions: the load test needs at least one question")
    qs = list(questions)
    return HttpTarget(base_url, "/v1/chat/completions", lambda i: {
        "model": model, "max_tokens": max_tokens, "temperature": 0,
        "messages": [{"role": "user", "content": qs[i % len(qs)]}]},
        api_key, timeout_s, tokens=lambda d: int((d.get("usage") or {}).get("completion_tokens", 0)))


def query_counters(base_url: str) -> dict[str, int]:
    """The service's query-embedding counters from ``/health``: ``computed`` (queries embedded),
    ``batches`` (forward passes; fewer than computed when concurrent queries were batched) and
    ``cache_hits`` (answered from the LRU cache)."""
    import requests

    got = requests.get(base_url.rstrip("/") + "/health", timeout=10).json()
    return {k: int(v or 0) for k, v in (got.get("query_embeddings") or {}).items()}


def upload_dataset(base_url: str, api_key: str | None, name: str, files: Sequence[Path],
                   timeout_s: float = 300.0) -> tuple[str, int]:
    """Create a dataset on a running service, upload ``files``, parse them and wait until every
    document is DONE. Returns ``(dataset id, chunks)``; a failed document raises ``DataError``."""
    import requests

    from ..errors import DataError

    h = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def ok(r) -> Any:
        body = r.json()
        if r.status_code >= 300 or body.get("code", 0) != 0:
            raise RequestFailed(f"{r.request.method} {r.url}: HTTP {r.status_code}: "
                                f"{body.get('message') or body}")
        return body.get("data")

    ds = ok(requests.post(f"{base_url}/api/v1/datasets", headers=h, json={"name": name},
                          timeout=30))["id"]
    docs = ok(requests.post(f"{base_url}/api/v1/datasets/{ds}/documents", headers=h, timeout=60,
                            files=[("file", (Path(f).name, Path(f).read_bytes())) for f in files]))
    ids = [d["id"] for d in docs]
    ok(requests.post(f"{base_url}/api/v1/datasets/{ds}/chunks", headers=h,
                     json={"document_ids": ids}, timeout=30))
    deadline = time.time() + timeout_s
    while True:
        listed = ok(requests.get(f"{base_url}/api/v1/datasets/{ds}/documents", headers=h,
                                 params={"page_size": max(100, len(ids))}, timeout=30))["docs"]
        states = {d["run"] for d in listed}
        if states <= {"DONE", "FAIL", "CANCEL"}:
            break
        if time.time() > deadline:
            raise RequestFailed(f"documents not parsed within {timeout_s:.0f} s: {sorted(states)}")
        time.sleep(0.3)
    bad = [f"{d['name']}: {d.get('progress_msg')}" for d in listed if d["run"] != "DONE"]
    if bad:
        raise DataError("parsing failed on the server: " + "; ".join(bad[:5]))
    return ds, sum(int(d.get("chunk_count") or 0) for d in listed)


@contextlib.contextmanager
def start_server(overrides: Sequence[str], timeout_s: float = 180.0,
                 log_file: Path | None = None) -> Iterator[Any]:
    """Run ``llmtech serve run`` with ``overrides`` in a child process for a ``with`` block:
    yields the started ``launch.Server`` once /health answers, stops it afterwards. A child that
    exits or never answers raises ``LlmtechError`` with the tail of its log."""
    from .launch import Server

    srv = Server(list(overrides), timeout_s=timeout_s, log_file=log_file)
    try:
        srv.start()
    except LlmtechError as e:
        raise LlmtechError(f"the service for the load test did not start "
                           f"(overrides: {' '.join(overrides)}): {e}") from None
    try:
        yield srv
    finally:
        srv.__exit__(None, None, None)
