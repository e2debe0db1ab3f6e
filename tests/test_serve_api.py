"""The service in-process (FastAPI TestClient, tiny model): tenants, bad input, limits."""

import shutil
import threading
import time

import pytest

from conftest import SUPPORT

pytestmark = pytest.mark.filterwarnings("ignore")

KEYS = {"Authorization": "Bearer key-alice"}
BOB = {"Authorization": "Bearer key-bob"}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from llmtech.serve import ServeConfig, create_app

    kb = tmp_path_factory.mktemp("kbdocs")
    for name in ("warranty_en.md", "warranty_zh.md", "products_en.md"):
        shutil.copy(SUPPORT / "kb" / name, kb / name)
    cfg = ServeConfig(data_dir=str(tmp_path_factory.mktemp("serve")), kb_docs=str(kb),
                      api_keys={"key-alice": "alice", "key-bob": "bob"},
                      generation={"model": "tiny-llama"},
                      limits={"max_upload_bytes": 2000, "max_queued_generations": 2})
    app = create_app(cfg)
    with TestClient(app) as c:
        c.service = app.state.service
        yield c


def make_dataset(client, name, headers=KEYS, text=b"# Lamp\n\nThe S9 lamp has a 3 year warranty."):
    r = client.post("/api/v1/datasets", headers=headers, json={"name": name})
    assert r.status_code == 200 and r.json()["code"] == 0, r.text
    ds = r.json()["data"]["id"]
    r = client.post(f"/api/v1/datasets/{ds}/documents", headers=headers,
                    files=[("file", ("lamp.md", text))])
    doc = r.json()["data"][0]["id"]
    assert client.post(f"/api/v1/datasets/{ds}/chunks", headers=headers,
                       json={"document_ids": [doc]}).json()["code"] == 0
    client.service.wait_parsed([doc], timeout=60)
    return ds, doc


def test_keys_are_required(client):
    assert client.get("/health").status_code == 200  # health needs no key
    r = client.get("/v1/models")
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    r = client.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    r = client.get("/api/v1/datasets", headers={"Authorization": "Basic abc"})
    assert r.status_code == 401 and r.json()["code"] == 401  # RAGFlow envelope


def test_tenant_sees_only_its_own(client):
    ds, doc = make_dataset(client, "alice-private")
    # alice can read it
    assert client.get("/api/v1/datasets", headers=KEYS, params={"id": ds}).json()["code"] == 0
    # bob cannot list, read, search, change, delete or chat with it: 404 as if it did not exist
    assert [d["id"] for d in client.get("/api/v1/datasets", headers=BOB).json()["data"]] == []
    calls = [
        ("get", "/api/v1/datasets", {"params": {"id": ds}}),
        ("get", f"/api/v1/datasets/{ds}/documents", {}),
        ("get", f"/api/v1/datasets/{ds}/documents/{doc}", {}),
        ("get", f"/api/v1/datasets/{ds}/documents/{doc}/chunks", {}),
        ("put", f"/api/v1/datasets/{ds}", {"json": {"name": "stolen"}}),
        ("delete", "/api/v1/datasets", {"json": {"ids": [ds]}}),
        ("post", f"/api/v1/datasets/{ds}/chunks", {"json": {"document_ids": [doc]}}),
        ("post", "/api/v1/retrieval", {"json": {"question": "lamp", "dataset_ids": [ds]}}),
        ("post", "/api/v1/chats", {"json": {"name": "x", "dataset_ids": [ds]}}),
        ("post", "/v1/chat/completions", {"json": {"model": "llmtech-kb", "dataset_ids": [ds],
                                                   "messages": [{"role": "user", "content": "hi"}]}}),
    ]
    for method, url, kw in calls:
        r = client.request(method.upper(), url, headers=BOB, **kw)
        assert r.status_code in (403, 404), (method, url, r.status_code, r.text)
    # bob's attempts changed nothing
    d = client.get("/api/v1/datasets", headers=KEYS, params={"id": ds}).json()["data"][0]
    assert d["name"] == "alice-private" and d["document_count"] == 1
    chat = client.post("/api/v1/chats", headers=KEYS,
                       json={"name": "alice-chat", "dataset_ids": [ds]}).json()["data"]
    r = client.post(f"/api/v1/chats/{chat['id']}/sessions", headers=BOB, json={"name": "s"})
    assert r.status_code == 404
    r = client.post(f"/api/v1/chats/{chat['id']}/completions", headers=BOB,
                    json={"question": "hi", "stream": False})
    assert r.status_code == 404


def test_upload_limits_and_names(client):
    ds = client.post("/api/v1/datasets", headers=KEYS, json={"name": "limits"}).json()["data"]["id"]
    up = f"/api/v1/datasets/{ds}/documents"
    r = client.post(up, headers=KEYS, files=[("file", ("big.txt", b"x" * 2001))])
    assert r.status_code == 413 and "upload limit" in r.json()["message"]
    r = client.post(up, headers=KEYS, files=[("file", ("tool.exe", b"MZ..."))])
    assert r.status_code == 415 and ".exe" in r.json()["message"]
    r = client.post(up, headers=KEYS, files=[("file", ("empty.md", b""))])
    assert r.status_code == 400
    # a name that tries to climb out of the storage folder is only a display name
    r = client.post(up, headers=KEYS, files=[("file", ("../../../etc/evil.md", b"# hi\n\ntext"))])
    doc = r.json()["data"][0]
    assert doc["name"] == "evil.md"
    stored = list((client.service.dataset_dir(ds) / "files").iterdir())
    assert [p.name for p in stored] == [doc["id"] + ".md"]
    assert not (client.service.root.parent / "etc").exists()


def test_bad_requests_name_the_field(client):
    r = client.post("/v1/chat/completions", headers=KEYS, json={"model": "llmtech-kb"})
    assert r.status_code == 422 and "messages" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", headers={**KEYS, "content-type": "application/json"},
                    content=b"{not json")
    assert r.status_code == 422
    r = client.post("/v1/chat/completions", headers=KEYS,
                    json={"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and "no-such-model" in r.json()["error"]["message"]
    r = client.post("/api/v1/retrieval", headers=KEYS, json={"question": "x"})
    assert r.status_code == 422 and "dataset_ids" in r.json()["message"]
    r = client.get("/api/v1/datasets/nope/documents", headers=KEYS)
    assert r.status_code == 404 and r.json()["code"] == 404
    r = client.post("/api/v1/datasets", headers=KEYS, json={"name": "limits"})
    assert r.status_code == 409  # duplicate name


def test_failed_parse_reports_reason_and_spares_others(client):
    ds = client.post("/api/v1/datasets", headers=KEYS, json={"name": "mixed"}).json()["data"]["id"]
    up = f"/api/v1/datasets/{ds}/documents"
    bad = client.post(up, headers=KEYS,
                      files=[("file", ("broken.pdf", b"%PDF-1.4 this is not a pdf"))]).json()
    good = client.post(up, headers=KEYS,
                       files=[("file", ("ok.md", b"# Fan\n\nThe F2 fan is quiet."))]).json()
    ids = [bad["data"][0]["id"], good["data"][0]["id"]]
    client.post(f"/api/v1/datasets/{ds}/chunks", headers=KEYS, json={"document_ids": ids})
    client.service.wait_parsed(ids, timeout=60)
    docs = {d["name"]: d for d in client.get(up, headers=KEYS).json()["data"]["docs"]}
    assert docs["broken.pdf"]["run"] == "FAIL" and docs["broken.pdf"]["progress_msg"]
    assert docs["ok.md"]["run"] == "DONE" and docs["ok.md"]["chunk_count"] >= 1
    hits = client.post("/api/v1/retrieval", headers=KEYS,
                       json={"question": "F2 fan", "dataset_ids": [ds],
                             "similarity_threshold": 0}).json()["data"]["chunks"]
    assert hits and hits[0]["document_name"] == "ok.md"


def test_gbk_upload_is_decoded(client):
    text = "云杉智能门锁 L3 的电池可以用十二个月。".encode("gbk")
    ds, doc = make_dataset(client, "gbk", text=text)
    d = client.get(f"/api/v1/datasets/{ds}/documents", headers=KEYS).json()["data"]["docs"][0]
    assert d["run"] == "DONE", d
    hits = client.post("/api/v1/retrieval", headers=KEYS, json={
        "question": "门锁电池", "dataset_ids": [ds], "similarity_threshold": 0}).json()["data"]
    assert "十二个月" in hits["chunks"][0]["content"]


def test_chunks_add_and_delete_change_retrieval(client):
    ds, doc = make_dataset(client, "chunks")
    base = f"/api/v1/datasets/{ds}/documents/{doc}/chunks"
    before = client.get(base, headers=KEYS).json()["data"]["total"]
    r = client.post(base, headers=KEYS, json={"content": "Zebra mode makes the lamp blink."})
    cid = r.json()["data"]["chunk"]["id"]
    assert client.get(base, headers=KEYS).json()["data"]["total"] == before + 1
    q = {"question": "zebra blink", "dataset_ids": [ds], "similarity_threshold": 0.1}
    hits = client.post("/api/v1/retrieval", headers=KEYS, json=q).json()["data"]["chunks"]
    assert hits[0]["id"] == cid
    assert client.request("DELETE", base, headers=KEYS, json={"chunk_ids": [cid]}).json()["code"] == 0
    hits = client.post("/api/v1/retrieval", headers=KEYS, json=q).json()["data"]["chunks"]
    assert cid not in [h["id"] for h in hits]
    r = client.request("DELETE", base, headers=KEYS, json={"chunk_ids": ["nope"]})
    assert r.status_code == 404


def test_busy_server_answers_429_not_a_crash(client):
    gate = client.service.gate
    body = {"model": "llmtech-kb", "max_tokens": 4,
            "messages": [{"role": "user", "content": "What is the warranty?"}]}
    gate.acquire()  # the one generation slot is taken
    old = gate.max_waiting
    try:
        gate.max_waiting = 0  # and nobody may queue
        r = client.post("/v1/chat/completions", headers=KEYS, json=body)
        assert r.status_code == 429 and r.headers["retry-after"]
        r = client.post("/v1/chat/completions", headers=KEYS, json={**body, "stream": True})
        assert r.status_code == 429
        gate.max_waiting, gate.timeout_s = 1, 0.2  # may queue, but waits too long
        r = client.post("/v1/chat/completions", headers=KEYS, json=body)
        assert r.status_code == 503
    finally:
        gate.max_waiting, gate.timeout_s = old, 120.0
        gate.release()
    assert client.post("/v1/chat/completions", headers=KEYS, json=body).status_code == 200


def test_gate_admits_at_most_running_plus_waiting():
    from llmtech.serve.backends import Busy, Gate

    gate = Gate(max_running=1, max_waiting=2, timeout_s=5)
    results = []

    def worker():
        try:
            gate.acquire()
            time.sleep(0.3)
            gate.release()
            results.append("ok")
        except Busy as e:
            results.append(e.status)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
        time.sleep(0.01)
    for t in threads:
        t.join()
    assert results.count("ok") == 3 and results.count(429) == 3
    assert gate.running == 0 and gate.waiting == 0


def test_assistant_answers_with_references(client):
    r = client.post("/v1/chat/completions", headers=KEYS, json={
        "model": "llmtech-kb", "max_tokens": 6,
        "messages": [{"role": "user", "content": "How long is the warranty?"}]})
    body = r.json()
    assert r.status_code == 200 and body["usage"]["completion_tokens"] >= 1
    refs = body["references"]
    assert 1 <= len(refs) <= 4 and refs[0]["n"] == 1
    assert any(ref["document_id"].startswith("warranty") for ref in refs)
    # the plain model: no retrieval, no references
    r = client.post("/v1/chat/completions", headers=KEYS, json={
        "model": "tiny-llama", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.json()["references"] == []
    # a chat whose assistant has no dataset refuses without calling the model
    chat = client.post("/api/v1/chats", headers=KEYS, json={"name": "empty"}).json()["data"]
    r = client.post(f"/api/v1/chats/{chat['id']}/completions", headers=KEYS,
                    json={"question": "What is the warranty?", "stream": False}).json()
    assert r["code"] == 0 and "I could not find" in r["data"]["answer"]


def test_embeddings_endpoint(client):
    r = client.post("/v1/embeddings", headers=KEYS, json={"input": ["a lamp", "a fan"]})
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1] and len(data[0]["embedding"]) == 384
    r = client.post("/v1/embeddings", headers=KEYS, json={"input": []})
    assert r.status_code == 422
    r = client.post("/v1/embeddings", headers=KEYS, json={"input": ["x"] * 300})
    assert r.status_code == 413


def test_datasets_on_a_pgvector_server(tmp_path):
    """`kb.store=pgvector` from the config: each dataset gets its own table on a real
    PostgreSQL + pgvector server, and deleting the dataset deletes its vectors."""
    from fastapi.testclient import TestClient

    from llmtech.rag.stores import load_store, local_postgres
    from llmtech.serve import ServeConfig, create_app

    server, url = local_postgres(tmp_path / "pg", cleanup_mode="delete")
    try:
        cfg = ServeConfig(data_dir=str(tmp_path / "serve"), kb_docs=None,
                          api_keys={"key-alice": "alice"}, generation={"model": "tiny-llama"},
                          kb={"store": "pgvector", "store_options": {"url": url}})
        app = create_app(cfg)
        with TestClient(app) as c:
            c.service = app.state.service
            ds, doc = make_dataset(c, "pg", text=b"# Lamp\n\nThe S9 lamp has a 3 year warranty.")
            kb, _ = c.service.kb(ds)
            table = kb.config.store_options["table"]
            assert table.endswith(ds) and len(kb.store) >= 1
            hits = c.post("/api/v1/retrieval", headers=KEYS, json={
                "question": "S9 lamp warranty", "dataset_ids": [ds],
                "similarity_threshold": 0}).json()["data"]["chunks"]
            assert hits and "S9" in hits[0]["content"]
            assert c.request("DELETE", "/api/v1/datasets", headers=KEYS,
                             json={"ids": [ds]}).json()["code"] == 0
            assert len(load_store("pgvector", url, table=table)) == 0
    finally:
        server.cleanup()
