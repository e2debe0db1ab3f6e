"""L7.06 load testing: closed-loop load generator statistics on targets with known latencies,
errors and warm-up, HTTP targets, bad settings, and the lab end to end against the real service."""

import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import ROOT, SUPPORT, load_lab_module
from llmtech.errors import ConfigError, LlmtechError
from llmtech.serve import loadtest as lt

LAB = ROOT / "lessons/lesson7/06_performance_testing/performance_benchmark.py"


def test_sleeping_target_gives_its_latency_and_throughput():
    res = lt.run_load(lambda i: time.sleep(0.01), clients=2, duration_s=0.8, warmup_requests=2)
    st = res.stats()
    assert st["warmup_n"] == 2 and len(res.warmup) == 2 and st["errors"] == 0
    assert 9.9 <= st["p50_ms"] <= 20 and st["p50_ms"] <= st["p95_ms"] <= st["p99_ms"] <= st["max_ms"]
    # closed loop: 2 clients x 1 / 10 ms = at most 200 req/s (sleep never returns early)
    assert 80 <= st["throughput"] <= 201
    assert st["n"] == pytest.approx(st["throughput"] * st["wall_s"], rel=1e-6)
    assert 0.8 <= st["wall_s"] < 1.2


def test_percentiles_of_a_known_mix_and_request_count():
    # one request in ten takes 60 ms, the rest 2 ms: p50 is fast, p95 / p99 are the slow ones
    res = lt.run_load(lambda i: time.sleep(0.06 if i % 10 == 9 else 0.002), clients=1, requests=60)
    st = res.stats()
    assert st["n"] == 60 and st["clients"] == 1
    assert st["p50_ms"] < 20 and st["p95_ms"] >= 55 and st["p99_ms"] >= 55
    assert [s.start for s in res.samples] == sorted(s.start for s in res.samples)


def test_warmup_is_excluded_from_the_statistics():
    def cold_start(i):
        time.sleep(0.15 if i < 2 else 0.001)

    res = lt.run_load(cold_start, clients=1, requests=20, warmup_requests=2)
    st = res.stats()
    assert len(res.warmup) == 2 and all(s.latency >= 0.15 for s in res.warmup)
    assert st["n"] == 20 and st["max_ms"] < 100  # the two slow first calls are not in here
    cold = lt.run_load(cold_start, clients=1, requests=20).stats()
    assert cold["max_ms"] >= 150 and cold["warmup_n"] == 0


def test_errors_are_counted_not_raised_and_tokens_add_up():
    def flaky(i):
        if i % 4 == 0:
            raise RuntimeError(f"backend down at {i}")
        return {"tokens": 3, "items": 2}

    st = lt.run_load(flaky, clients=3, requests=40).stats()
    assert st["errors"] == 10 and st["n"] == 30 and st["error_rate"] == 0.25
    assert "RuntimeError: backend down" in st["first_error"]
    assert st["tokens"] == 90 and st["items_per_s"] == pytest.approx(2 * st["throughput"])
    dead = lt.run_load(lambda i: 1 / 0, clients=2, requests=5).stats()
    assert dead["n"] == 0 and dead["errors"] == 5 and dead["p50_ms"] is None
    assert dead["throughput"] == 0 and "ZeroDivisionError" in dead["first_error"]
    assert lt.run_load(lambda i: 7, requests=2).stats()["tokens"] == 14  # an int is tokens


@pytest.mark.parametrize("kw, key", [({"clients": 0, "duration_s": 1}, "clients"),
                                     ({"clients": 2, "duration_s": 0}, "duration_s"),
                                     ({"clients": 1, "duration_s": -3}, "duration_s"),
                                     ({"clients": 1}, "duration_s"),
                                     ({"clients": 1, "requests": 0}, "requests"),
                                     ({"clients": 1, "requests": 3, "warmup_s": -1}, "warmup_s")])
def test_bad_settings_name_the_key(kw, key):
    with pytest.raises(ConfigError, match=key):
        lt.run_load(lambda i: None, **kw)


def test_http_target_counts_bad_statuses_and_api_codes():
    class H(BaseHTTPRequestHandler):
        def do_POST(self):
            n = int(self.headers["Content-Length"])
            body = json.loads(self.rfile.read(n))
            status, reply = {"ok": (200, {"code": 0, "usage": {"completion_tokens": 4}}),
                             "api": (200, {"code": 102, "message": "dataset not found"}),
                             "busy": (429, {"error": {"message": "server busy"}})}[body["q"]]
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        kinds = ["ok", "api", "ok", "busy"]
        t = lt.HttpTarget(f"http://127.0.0.1:{srv.server_port}", "/x", lambda i: {"q": kinds[i % 4]},
                          tokens=lambda d: d["usage"]["completion_tokens"])
        res = lt.run_load(t, clients=2, requests=8)
        st = res.stats()
        assert st["n"] == 4 and st["errors"] == 4 and st["tokens"] == 16
        errs = " ".join(res.errors())
        assert "API code 102: dataset not found" in errs and "HTTP 429: server busy" in errs
    finally:
        srv.shutdown()


def test_server_that_fails_to_start_is_a_clear_error(tmp_path):
    with pytest.raises(LlmtechError, match="did not start.*no_such_key"):
        with lt.start_server(["no_such_key=1", f"data_dir={tmp_path}"], timeout_s=60):
            pass


def test_lab_bad_store_is_a_config_error(tmp_path):
    from llmtech import labs

    mod = load_lab_module(LAB, "l706_bad")
    ctx = labs.LabContext(out=tmp_path, lab_id="L7.06", title="t")
    with pytest.raises(ConfigError, match="stores: unknown store 'milvus'"):
        mod.main(mod.Config(stores=["faiss", "milvus"]), ctx)
    with pytest.raises(ConfigError, match="clients"):
        mod.main(mod.Config(clients=[0]), ctx)
    with pytest.raises(ConfigError, match="duration_s"):
        mod.main(mod.Config(duration_s=0), ctx)


def test_lab_end_to_end_tiny(tmp_path):
    from llmtech import labs

    kb = tmp_path / "kb"
    kb.mkdir()
    for name in ("warranty_en.md", "warranty_zh.md", "returns_en.md"):
        shutil.copy(SUPPORT / "kb" / name, kb / name)
    mod = load_lab_module(LAB, "l706_e2e")
    out = tmp_path / "out"
    m = labs.run(mod.main, mod.Config, argv=[
        "--quick", "--out", str(out), "model=tiny-llama", f"kb_dir={kb}", "n_questions=6",
        "stores=[faiss, chroma]", "top_ks=[2, 4]", "rerank_top=2", "clients=[1, 2]",
        "duration_s=0.5", "warmup_s=0.1", "gen_questions=2", "batch_sizes=[1, 2]",
        "max_new_tokens=4", "gen_top_k=1"])
    # 2 stores + k=4 + rerank + 3 HTTP (c=1, c=2, c=2 cached) + (fp32, int8) x (batch 1, 2)
    assert m["n_configs"] == 11 and m["total_errors"] == 0 and m["server_alive_after"]
    for key in ("faiss_k2", "chroma_k2", "faiss_k4", "faiss_k2_rerank_llm", "http_retrieval_c1",
                "http_retrieval_c2", "fp32_batch1", "int8_batch2"):
        assert m[f"{key}_n"] >= 1 and m[f"{key}_p50_ms"] > 0 and m[f"{key}_throughput"] > 0
        assert m[f"{key}_p50_ms"] <= m[f"{key}_p95_ms"] <= m[f"{key}_p99_ms"]
    # varied questions are embedded by the server; repeated ones come from its LRU cache
    assert m["http_retrieval_c1_computed"] >= m["http_retrieval_c1_n"]
    assert m["http_retrieval_c2_cached_cache_hits"] > 0
    assert m["fp32_batch2_n"] == 1 and m["fp32_batch1_n"] == 2  # 2 questions each
    assert m["fp32_tokens_per_s"] > 0 and m["quant_tokens_per_s"] > 0
    assert m["batch4_vs_batch1_throughput"] > 0 and m["http_c4_vs_c1_throughput"] > 0
    assert m["http_chunks"] >= 3 and m["best_retrieval_config"] in {
        "faiss k=2", "chroma k=2", "faiss k=4", "faiss k=2 +rerank llm",
        "http retrieval c=1", "http retrieval c=2", "http retrieval c=2 cached"}
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["n_configs"] == 11
    assert (out / "latency_percentiles.png").stat().st_size > 1000
    assert (out / "throughput_vs_clients.png").exists()
    report = (out / "report.md").read_text()
    assert "2 核 CPU" in report and "http retrieval c=2" in report


def test_question_file_errors_name_the_line(tmp_path):
    from llmtech.errors import DataError

    f = tmp_path / "q.jsonl"
    f.write_text('{"question": "保修多久？"}\n{"answer": "7天"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"q\.jsonl.*2"):
        lt.read_questions(f)
    f.write_text('{"question": "a"}\n{"question": "b"}\n{"question": "c"}\n', encoding="utf-8")
    assert sorted(lt.read_questions(f)) == ["a", "b", "c"] and len(lt.read_questions(f, 2)) == 2
    assert lt.read_questions(f, seed=1) == lt.read_questions(f, seed=1)
