"""Load test of the knowledge-base service: a real server (``llmtech serve`` in a child
process, started by ``serve.launch.Server``) driven over HTTP by concurrent clients.

1. Retrieval without generation: a dataset holding the sample KB (uploaded and parsed through
   the RAGFlow-compatible API), then ``--clients`` threads (each its own ``requests.Session``)
   calling ``POST /api/v1/retrieval`` for ``--seconds`` with the eval questions cycling.
   Target: >= 100 requests/s on 2 cores, 0 errors. The cold first query is reported apart.
2. Chat: ``--chat-clients`` threads streaming ``/v1/chat/completions`` (model ``llmtech-kb``
   answering from the dataset): first-token latency p50/p95, tokens/s per stream and in all.
3. Burst beyond capacity: ``--burst`` simultaneous streaming requests with
   ``limits.max_queued_generations=4``: the excess must get 429/503 (never 500 or a dropped
   connection) and ``/health`` must answer 200 afterwards.

The load generator runs on the same 2 cores as the server; the CPU seconds each side used
are reported so the requests/s can be read fairly.

    flock /tmp/llmtech-cpu.lock .venv/bin/python bench/serve_load.py [--seconds 60]
        [--model tiny-llama] [--skip-chat] [--profile-seconds 20]
"""

import argparse
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

import numpy as np
import requests

from common import OUT, ROOT, save

from llmtech.serve.launch import Server

KEY = "sk-bench-load"
H = {"Authorization": f"Bearer {KEY}"}
TARGET_RPS = 100.0
RUNS = itertools.count()   # tags the questions of each load run, so "new" is never repeated


def pct(xs, q):
    return round(float(np.percentile(xs, q)), 1) if xs else None


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds all processes on the machine spent busy (Linux /proc/stat, every core)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)   # idle + iowait
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def api(s: requests.Session, method: str, url: str, **kw):
    r = s.request(method, url, headers=H, timeout=120, **kw)
    body = r.json()
    if r.status_code != 200 or body.get("code") != 0:
        raise RuntimeError(f"{method} {url}: HTTP {r.status_code} {body}")
    return body.get("data")


def build_dataset(url: str) -> tuple[str, int, float]:
    s = requests.Session()
    ds = api(s, "POST", url + "/api/v1/datasets", json={"name": "bench-kb"})
    files = sorted((ROOT / "data/support/kb").glob("*.md"))
    docs = api(s, "POST", f"{url}/api/v1/datasets/{ds['id']}/documents",
               files=[("file", (f.name, f.read_bytes())) for f in files])
    t = time.perf_counter()
    api(s, "POST", f"{url}/api/v1/datasets/{ds['id']}/chunks",
        json={"document_ids": [d["id"] for d in docs]})
    while True:
        listed = api(s, "GET", f"{url}/api/v1/datasets/{ds['id']}/documents",
                     params={"page_size": 100})["docs"]
        if all(d["run"] in ("DONE", "FAIL", "CANCEL") for d in listed):
            break
        time.sleep(0.25)
    bad = [d["name"] for d in listed if d["run"] != "DONE"]
    if bad:
        raise RuntimeError(f"documents not parsed: {bad}")
    return ds["id"], len(listed), time.perf_counter() - t


def query_stats(url: str) -> dict:
    """The server's query-embedding counters (/health): computed, batches, cache_hits."""
    q = requests.get(url + "/health", timeout=10).json().get("query_embeddings") or {}
    return {k: q.get(k) or 0 for k in ("computed", "batches", "cache_hits")}


def retrieval_load(url: str, ds_id: str, questions: list[str], clients: int, seconds: float,
                   server_pid: int, unique: bool = False) -> dict:
    """``unique``: every request's question is made new (a counter appended), so no answer
    comes from the server's query-embedding cache - the cost of questions never seen before."""
    run = next(RUNS)
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors: list[list[str]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(i: int):
        s = requests.Session()
        n = i * 7
        start.wait()
        while time.perf_counter() < stop_at[0]:
            q = questions[n % len(questions)]
            if unique:
                q = f"{q} ({run}-{i}-{n})"
            n += 1
            t = time.perf_counter()
            try:
                r = s.post(url + "/api/v1/retrieval", headers=H, timeout=30,
                           json={"question": q, "dataset_ids": [ds_id], "page_size": 5})
                ok = r.status_code == 200 and r.json().get("code") == 0 \
                    and len(r.json()["data"]["chunks"]) > 0
                if not ok:
                    errors[i].append(f"HTTP {r.status_code} {r.text[:120]}")
            except requests.RequestException as e:
                errors[i].append(type(e).__name__)
                continue
            lat[i].append(1000 * (time.perf_counter() - t))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    stats0 = query_stats(url)
    cpu_server0, cpu_self0, busy0 = proc_cpu_s(server_pid), self_cpu_s(), machine_busy_s()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    start.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    all_lat = [x for xs in lat for x in xs]
    errs = [e for es in errors for e in es]
    rps = len(all_lat) / wall
    cpu_server, cpu_client = proc_cpu_s(server_pid) - cpu_server0, self_cpu_s() - cpu_self0
    # anything else running on the machine meanwhile (it takes cores from the server)
    cpu_other = machine_busy_s() - busy0 - cpu_server - cpu_client
    stats = {k: v - stats0[k] for k, v in query_stats(url).items()}
    looked_up = stats["computed"] + stats["cache_hits"]
    return {"clients": clients, "unique_questions": unique, "seconds": round(wall, 1),
            "requests": len(all_lat),
            "requests_per_s": round(rps, 1), "p50_ms": pct(all_lat, 50),
            "p95_ms": pct(all_lat, 95), "p99_ms": pct(all_lat, 99), "errors": len(errs),
            "error_examples": sorted(set(errs))[:3],
            "server_cpu_s": round(cpu_server, 1), "client_cpu_s": round(cpu_client, 1),
            "other_cpu_s": round(max(0.0, cpu_other), 1),
            "query_cache_hit_share": round(stats["cache_hits"] / looked_up, 3)
            if looked_up else None,
            "mean_embed_batch": round(stats["computed"] / stats["batches"], 2)
            if stats["batches"] else None,
            "ratio_to_target": round(rps / TARGET_RPS, 3)}


def stream_chat(s: requests.Session, url: str, question: str, ds_id: str, max_tokens: int):
    """One streamed /v1/chat/completions; returns (status, first-token s, total s, tokens)."""
    t0 = time.perf_counter()
    first, tokens, status = None, 0, None
    with s.post(url + "/v1/chat/completions", headers=H, stream=True, timeout=600,
                json={"model": "llmtech-kb", "stream": True, "max_tokens": max_tokens,
                      "messages": [{"role": "user", "content": question}],
                      "dataset_ids": [ds_id], "stream_options": {"include_usage": True}}) as r:
        status = r.status_code
        if status != 200:
            return status, None, time.perf_counter() - t0, 0
        for line in r.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
            for ch in obj.get("choices", []):
                if first is None and (ch.get("delta") or {}).get("content"):
                    first = time.perf_counter() - t0
    return status, first, time.perf_counter() - t0, tokens


def chat_load(url: str, ds_id: str, questions: list[str], clients: int, per_client: int,
              max_tokens: int) -> dict:
    rows: list[dict] = []
    lock = threading.Lock()

    def client(i: int):
        s = requests.Session()
        for j in range(per_client):
            q = questions[(i * per_client + j) * 5 % len(questions)]
            status, first, total, tokens = stream_chat(s, url, q, ds_id, max_tokens)
            with lock:
                rows.append({"status": status, "first_s": first, "total_s": total,
                             "tokens": tokens})

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in rows if r["status"] == 200 and r["first_s"] is not None]
    firsts = [r["first_s"] for r in ok]
    per_stream = [r["tokens"] / (r["total_s"] - r["first_s"]) for r in ok
                  if r["tokens"] > 1 and r["total_s"] > r["first_s"]]
    return {"clients": clients, "requests": len(rows), "ok": len(ok),
            "statuses": dict(Counter(str(r["status"]) for r in rows)),
            "first_token_p50_s": round(float(np.percentile(firsts, 50)), 2) if firsts else None,
            "first_token_p95_s": round(float(np.percentile(firsts, 95)), 2) if firsts else None,
            "tokens_per_s_per_stream_p50":
                round(float(np.median(per_stream)), 1) if per_stream else None,
            "tokens_per_s_aggregate": round(sum(r["tokens"] for r in ok) / wall, 1),
            "completion_tokens": sum(r["tokens"] for r in ok), "seconds": round(wall, 1)}


def burst(url: str, ds_id: str, questions: list[str], n: int, max_tokens: int) -> dict:
    gate = threading.Barrier(n)
    results: list[str] = [""] * n

    def client(i: int):
        s = requests.Session()
        gate.wait()
        try:
            status, *_ = stream_chat(s, url, questions[i % len(questions)], ds_id, max_tokens)
            results[i] = str(status)
        except requests.RequestException as e:
            results[i] = type(e).__name__

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    health = requests.get(url + "/health", timeout=10)
    after = stream_chat(requests.Session(), url, questions[0], ds_id, 8)[0]
    counts = Counter(results)
    return {"requests": n, "statuses": dict(counts), "seconds": round(wall, 1),
            "rejected": counts.get("429", 0) + counts.get("503", 0),
            "server_errors_or_drops": sum(v for k, v in counts.items()
                                          if k not in ("200", "429", "503")),
            "health_after": health.status_code, "request_after_burst": after}


def profile_server(pid: int, seconds: int, out_dir) -> str | None:
    """py-spy on the server while retrieval load runs (if py-spy is installed)."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))
    if not spy:
        return None
    out = out_dir / "serve_load_profile.txt"
    subprocess.run([spy, "record", "--pid", str(pid), "--duration", str(seconds), "--format",
                    "raw", "--output", str(out), "--nonblocking"], capture_output=True)
    return str(out) if out.exists() else None


def summarize_profile(path: str, top: int = 15) -> dict:
    """Collapsed py-spy stacks -> the functions with the most samples, on-CPU itself (leaf)
    and including callees, as shares of all active samples."""
    leaf: Counter = Counter()
    incl: Counter = Counter()
    total = 0
    for line in open(path, encoding="utf-8", errors="replace"):
        stack, _, n = line.rstrip().rpartition(" ")
        if not n.isdigit():
            continue
        frames = [f.split(" (")[0] + " (" + f.split(" (")[-1].split("/")[-1]
                  if " (" in f else f for f in stack.split(";")]
        total += int(n)
        leaf[frames[-1]] += int(n)
        for f in set(frames):
            incl[f] += int(n)
    def share(c: Counter) -> list:
        return [(f, round(v / total, 3)) for f, v in c.most_common(top)]
    return {"samples": total, "self": share(leaf), "inclusive": share(incl)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60, help="retrieval load duration")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--model", default="smollm2-135m", help="generation model of the server")
    ap.add_argument("--chat-clients", type=int, default=4)
    ap.add_argument("--chat-requests", type=int, default=2, help="requests per chat client")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--burst", type=int, default=16)
    ap.add_argument("--skip-chat", action="store_true")
    ap.add_argument("--profile-seconds", type=int, default=0,
                    help="also run py-spy on the server under retrieval load this long")
    a = ap.parse_args()
    questions = [json.loads(line)["question"] for line in
                 (ROOT / "data/support/eval_qa.jsonl").read_text(encoding="utf-8").splitlines()]
    data_dir = tempfile.mkdtemp(prefix="serve-load-")
    result: dict = {"model": a.model, "cpu_cores": os.cpu_count(), "target_rps": TARGET_RPS}
    try:
        t = time.perf_counter()
        with Server([f"generation.model={a.model}", f"data_dir={data_dir}", "kb_docs=null",
                     f"api_keys={{{KEY}: bench}}", "limits.max_queued_generations=4"]) as srv:
            result["server_start_s"] = round(time.perf_counter() - t, 1)
            ds_id, n_docs, parse_s = build_dataset(srv.url)
            result.update(n_docs=n_docs, parse_s=round(parse_s, 1))
            s = requests.Session()
            t = time.perf_counter()
            api(s, "POST", srv.url + "/api/v1/retrieval",
                json={"question": questions[0], "dataset_ids": [ds_id], "page_size": 5})
            result["cold_first_retrieval_ms"] = round(1000 * (time.perf_counter() - t), 1)
            for q in questions[:20]:   # warm-up both languages' code paths
                api(s, "POST", srv.url + "/api/v1/retrieval",
                    json={"question": q, "dataset_ids": [ds_id], "page_size": 5})
            one = retrieval_load(srv.url, ds_id, questions, 1, min(10.0, a.seconds),
                                 srv.proc.pid, unique=True)
            result["retrieval_1_client"] = one
            print(f"retrieval, 1 client: {one['requests_per_s']} req/s, p50 {one['p50_ms']} ms",
                  flush=True)
            for key, unique in (("retrieval", False), ("retrieval_unique", True)):
                rl = retrieval_load(srv.url, ds_id, questions, a.clients, a.seconds,
                                    srv.proc.pid, unique)
                result[key] = rl
                print(f"{key}, {a.clients} clients: {rl['requests_per_s']} req/s "
                      f"(target {TARGET_RPS:.0f}, ratio {rl['ratio_to_target']}), p50/p95/p99 "
                      f"{rl['p50_ms']}/{rl['p95_ms']}/{rl['p99_ms']} ms, errors "
                      f"{rl['errors']}, cache hits {rl['query_cache_hit_share']}", flush=True)
            if a.profile_seconds:
                th = threading.Thread(target=retrieval_load, args=(
                    srv.url, ds_id, questions, a.clients, a.profile_seconds + 4, srv.proc.pid,
                    True))
                th.start()
                time.sleep(2)
                prof = profile_server(srv.proc.pid, a.profile_seconds, OUT)
                th.join()
                if prof:
                    result["profile"] = {"file": prof, **summarize_profile(prof)}
            if not a.skip_chat:
                # one client alone first: its first-token latency has no queue in it
                one_chat = chat_load(srv.url, ds_id, questions, 1, a.chat_requests,
                                     a.max_tokens)
                result["chat_1_client"] = one_chat
                print(f"chat, 1 client: {one_chat}", flush=True)
                ch = chat_load(srv.url, ds_id, questions, a.chat_clients, a.chat_requests,
                               a.max_tokens)
                result["chat"] = ch
                print(f"chat: {ch}", flush=True)
                b = burst(srv.url, ds_id, questions, a.burst, 16)
                result["burst"] = b
                print(f"burst: {b}", flush=True)
            result["server_alive_at_end"] = srv.alive()
            errors_500 = srv.log_text().count("HTTP/1.1\" 500")
            result["server_log_500s"] = errors_500
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    rl, ru = result["retrieval"], result["retrieval_unique"]
    result["retrieval_rps_ratio_to_target"] = rl["ratio_to_target"]
    result["retrieval_unique_rps_ratio_to_target"] = ru["ratio_to_target"]
    burst_ok = "burst" not in result or (
        result["burst"]["server_errors_or_drops"] == 0 and result["burst"]["rejected"] > 0
        and result["burst"]["health_after"] == 200)
    result["pass"] = bool(rl["requests_per_s"] >= TARGET_RPS and rl["errors"] == 0
                          and ru["errors"] == 0 and burst_ok
                          and result["server_log_500s"] == 0)
    save("serve_load", result)
    write_markdown(result)


def write_markdown(r: dict) -> None:
    from llmtech.io import atomic_write_text

    rl, ru, one = r["retrieval"], r["retrieval_unique"], r["retrieval_1_client"]
    lines = [f"# serve_load ({r['model']}, {r['cpu_cores']} cores)", "",
             f"Dataset: {r['n_docs']} documents parsed in {r['parse_s']} s; cold first "
             f"retrieval {r['cold_first_retrieval_ms']} ms.", "",
             "| retrieval | req/s | p50 ms | p95 ms | p99 ms | errors | query cache hits | "
             "embed batch | server CPU s | client CPU s | other processes CPU s |",
             "|---" * 11 + "|"]
    for name, x in ((f"1 client, {one['seconds']} s, every question new", one),
                    (f"{rl['clients']} clients, {rl['seconds']} s, eval questions cycling", rl),
                    (f"{ru['clients']} clients, {ru['seconds']} s, every question new", ru)):
        lines.append(f"| {name} | {x['requests_per_s']} | {x['p50_ms']} | {x['p95_ms']} | "
                     f"{x['p99_ms']} | {x['errors']} | {x['query_cache_hit_share']} | "
                     f"{x['mean_embed_batch']} | {x['server_cpu_s']} | {x['client_cpu_s']} | "
                     f"{x['other_cpu_s']} |")
    lines += ["", f"Ratio to the {r['target_rps']:.0f} req/s target: "
                  f"**{rl['ratio_to_target']}** (questions cycling), "
                  f"**{ru['ratio_to_target']}** (every question new).", ""]
    if "chat" in r:
        b = r["burst"]
        lines += ["| chat (streaming, llmtech-kb) | requests | first token p50 s | p95 s | "
                  "tok/s per stream | tok/s aggregate |", "|---|---|---|---|---|---|"]
        for c in (r["chat_1_client"], r["chat"]):
            lines.append(f"| {c['clients']} client(s) | {c['requests']} ({c['statuses']}) | "
                         f"{c['first_token_p50_s']} | {c['first_token_p95_s']} | "
                         f"{c['tokens_per_s_per_stream_p50']} | {c['tokens_per_s_aggregate']} |")
        lines += ["", "One generation runs at a time (limits.max_concurrent_generations=1): with "
                  "several clients the first-token latency includes the wait in the queue.", "",
                  f"Burst of {b['requests']} (max_queued_generations=4): statuses "
                  f"{b['statuses']}, /health after: {b['health_after']}, a request after the "
                  f"burst: {b['request_after_burst']}.", ""]
    lines.append(f"pass: {r['pass']}")
    atomic_write_text(OUT / "serve_load.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
