"""The service as a real HTTP server (uvicorn in a child process), driven by the official
``openai`` client and the real ``ragflow-sdk`` client; restarts, kills, remote backends."""

import shutil
import time

import pytest
import requests

from conftest import SUPPORT

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

ALICE, BOB = "key-alice", "key-bob"
KEYS = f"api_keys={{{ALICE}: alice, {BOB}: bob}}"


def small_kb(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("warranty_en.md", "warranty_zh.md", "products_en.md", "returns_en.md"):
        if (SUPPORT / "kb" / name).exists():
            shutil.copy(SUPPORT / "kb" / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from llmtech.serve.launch import Server

    tmp = tmp_path_factory.mktemp("srv")
    with Server(["generation.model=tiny-llama", f"data_dir={tmp / 'data'}",
                 f"kb_docs={small_kb(tmp / 'kb')}", KEYS]) as srv:
        yield srv


def test_openai_client_unchanged(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key=ALICE)
    assert {m.id for m in client.models.list()} == {"llmtech-kb", "tiny-llama"}
    r = client.chat.completions.create(
        model="llmtech-kb", max_tokens=8,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "How long is the warranty?"}])
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 50
    assert r.references and r.references[0]["document_id"]  # extra field, kept by the client
    pieces, refs, usage = [], None, None
    for chunk in client.chat.completions.create(
            model="llmtech-kb", max_tokens=8, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "How long is the warranty?"}]):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.model_extra and chunk.model_extra.get("references"):
            refs = chunk.model_extra["references"]
        usage = chunk.usage or usage
    assert refs and usage.completion_tokens >= 1
    e = client.embeddings.create(model="minilm-l6", input=["warranty", "保修"])
    assert len(e.data) == 2 and len(e.data[0].embedding) == 384
    import openai

    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=server.url + "/v1", api_key="wrong").models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])


def test_ragflow_sdk_flow(server):
    from ragflow_sdk import RAGFlow

    rag = RAGFlow(api_key=ALICE, base_url=server.url)
    ds = rag.create_dataset(name="support-sdk")
    assert ds.id and ds.chunk_method == "naive"
    blobs = [{"display_name": n, "blob": (SUPPORT / "kb" / n).read_bytes()}
             for n in ("warranty_en.md", "products_en.md")]
    docs = ds.upload_documents(blobs)
    assert [d.name for d in docs] == ["warranty_en.md", "products_en.md"]
    assert all(d.run == "UNSTART" for d in docs)
    finished = ds.parse_documents([d.id for d in docs])  # starts parsing and polls to the end
    assert {state for _, state, _, _ in finished} == {"DONE"}
    listed = ds.list_documents()
    assert all(d.run == "DONE" and d.progress == 1.0 and d.chunk_count > 0 for d in listed)
    assert rag.list_datasets(name="support-sdk")[0].document_count == 2
    ds.update({"description": "warranty and products"})
    assert rag.list_datasets(id=ds.id)[0].description == "warranty and products"

    chunks = rag.retrieve(dataset_ids=[ds.id], question="How long is the warranty?",
                          similarity_threshold=0.0)
    assert chunks and chunks[0].document_name == "warranty_en.md"
    assert chunks[0].similarity >= chunks[-1].similarity

    doc = [d for d in listed if d.name == "warranty_en.md"][0]
    n = len(doc.list_chunks(page_size=100))
    added = doc.add_chunk(content="Extended warranty: the Gold plan adds two years.")
    assert len(doc.list_chunks(page_size=100)) == n + 1
    doc.delete_chunks([added.id])
    assert len(doc.list_chunks(page_size=100)) == n

    chat = rag.create_chat("support-assistant", dataset_ids=[ds.id])
    assert rag.list_chats(name="support-assistant")[0].id == chat.id
    session = chat.create_session("first")
    streamed = list(session.ask("How long is the warranty?", stream=True))
    # RAGFlow streams the answer so far in every event (the random tiny model may say little)
    texts = [m.content for m in streamed]
    assert len(streamed) >= 2 and all(b.startswith(a.strip()) for a, b in zip(texts, texts[1:]))
    assert streamed[-1].reference and streamed[-1].reference[0]["document_id"]
    answer = list(session.ask("And for the battery?", stream=False))[0]
    assert isinstance(answer.content, str) and answer.reference
    saved = chat.list_sessions(id=session.id)[0]
    assert [m["role"] for m in saved.messages][-4:] == ["user", "assistant", "user", "assistant"]

    # RAGFlow's OpenAI-style path for the same assistant
    from openai import OpenAI

    oa = OpenAI(base_url=f"{server.url}/api/v1/chats_openai/{chat.id}", api_key=ALICE)
    r = oa.chat.completions.create(model="model", max_tokens=6,
                                   messages=[{"role": "user", "content": "warranty?"}])
    assert r.references

    # the second tenant's client sees none of it
    other = RAGFlow(api_key=BOB, base_url=server.url)
    assert other.list_datasets() == [] and other.list_chats() == []
    with pytest.raises(Exception, match="not found"):
        other.retrieve(dataset_ids=[ds.id], question="warranty")
    with pytest.raises(Exception, match="not found"):
        other.delete_datasets(ids=[ds.id])
    assert rag.list_datasets(id=ds.id)  # still there

    chat.delete_sessions(ids=[session.id])
    rag.delete_chats(ids=[chat.id])
    ds.delete_documents(ids=[doc.id])
    assert [d.name for d in ds.list_documents()] == ["products_en.md"]
    rag.delete_datasets(ids=[ds.id])
    assert rag.list_datasets() == []


def test_client_disconnect_mid_stream_keeps_server_healthy(server):
    body = {"model": "tiny-llama", "max_tokens": 200, "stream": True,
            "messages": [{"role": "user", "content": "Tell me a long story."}]}
    h = {"Authorization": f"Bearer {ALICE}"}
    with requests.post(server.url + "/v1/chat/completions", json=body, headers=h,
                       stream=True, timeout=60) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # first event, then hang up
    deadline = time.time() + 20
    while time.time() < deadline:
        health = requests.get(server.url + "/health", timeout=5).json()
        if health["running"] == 0:
            break
        time.sleep(0.2)
    assert health["running"] == 0 and server.alive()
    r = requests.post(server.url + "/v1/chat/completions", headers=h, timeout=60,
                      json={**body, "stream": False, "max_tokens": 3})
    assert r.status_code == 200


def test_kill_during_parsing_then_restart_loses_nothing(tmp_path):
    from llmtech.serve.launch import Server

    data = tmp_path / "data"
    args = ["generation.model=tiny-llama", f"data_dir={data}", "kb_docs=null", KEYS]
    h = {"Authorization": f"Bearer {ALICE}"}
    names = sorted(p.name for p in (SUPPORT / "kb").glob("*.md"))[:16]
    with Server(args) as srv:
        ds = requests.post(srv.url + "/api/v1/datasets", headers=h,
                           json={"name": "crash"}).json()["data"]["id"]
        files = [("file", (n, (SUPPORT / "kb" / n).read_bytes())) for n in names]
        docs = requests.post(f"{srv.url}/api/v1/datasets/{ds}/documents", headers=h,
                             files=files).json()["data"]
        ids = [d["id"] for d in docs]
        chat = requests.post(srv.url + "/api/v1/chats", headers=h,
                             json={"name": "c", "dataset_ids": [ds]}).json()["data"]
        requests.post(f"{srv.url}/api/v1/datasets/{ds}/chunks", headers=h,
                      json={"document_ids": ids})
        time.sleep(0.5)
        states = [d["run"] for d in requests.get(f"{srv.url}/api/v1/datasets/{ds}/documents",
                                                 headers=h).json()["data"]["docs"]]
        srv.kill()  # SIGKILL in the middle of parsing
    assert "RUNNING" in states, states  # the kill really interrupted the parse
    with Server(args) as srv:
        deadline = time.time() + 120
        while time.time() < deadline:
            docs = requests.get(f"{srv.url}/api/v1/datasets/{ds}/documents", headers=h,
                                params={"page_size": 100}).json()["data"]["docs"]
            if all(d["run"] == "DONE" for d in docs):
                break
            time.sleep(0.3)
        assert sorted(d["name"] for d in docs) == names and all(d["run"] == "DONE" for d in docs)
        assert requests.get(srv.url + "/api/v1/chats", headers=h).json()["data"][0]["id"] == chat["id"]
        # every chunk is in the index exactly once
        total = sum(d["chunk_count"] for d in docs)
        hits = requests.post(srv.url + "/api/v1/retrieval", headers=h, json={
            "question": "warranty", "dataset_ids": [ds], "similarity_threshold": 0,
            "page_size": 1000, "top_k": 1000}).json()["data"]
        assert len({c["id"] for c in hits["chunks"]}) == len(hits["chunks"])
        assert 0 < hits["total"] <= total
    from llmtech.rag.kb import KnowledgeBase

    kb = KnowledgeBase.open(data / "datasets" / ds / "kb")
    assert kb.consistent() and kb.stats()["chunks"] == total
    kb.close()


def test_remote_backends_through_a_second_server(tmp_path):
    """Server A generates and embeds through server B's OpenAI-compatible API."""
    from llmtech.serve.launch import Server

    with Server(["generation.model=tiny-llama", f"data_dir={tmp_path / 'b'}", "kb_docs=null",
                 "api_keys={remote-key: engine}"]) as b:
        with Server([f"data_dir={tmp_path / 'a'}", f"kb_docs={small_kb(tmp_path / 'kb')}", KEYS,
                     "generation.kind=openai", f"generation.base_url={b.url}/v1",
                     "generation.model=tiny-llama", "generation.api_key=remote-key",
                     "embedding.kind=openai", f"embedding.base_url={b.url}/v1",
                     "embedding.model=minilm-l6", "embedding.api_key=remote-key"]) as a:
            h = {"Authorization": f"Bearer {ALICE}"}
            health = requests.get(a.url + "/health").json()
            assert health["embedding"] == "openai:minilm-l6"
            r = requests.post(a.url + "/v1/chat/completions", headers=h, timeout=60, json={
                "model": "llmtech-kb", "max_tokens": 5,
                "messages": [{"role": "user", "content": "How long is the warranty?"}]}).json()
            assert r["usage"]["completion_tokens"] >= 1 and r["references"]
            assert r["references"][0]["document_id"].startswith("warranty")
            log_b = b.log_text()
            assert "POST /v1/chat/completions" in log_b and "POST /v1/embeddings" in log_b
        # the remote engine going away is a clear 502, not a crash
        with Server([f"data_dir={tmp_path / 'a2'}", "kb_docs=null", KEYS,
                     "generation.kind=openai", f"generation.base_url={b.url}/v1",
                     "generation.model=tiny-llama", "generation.api_key=remote-key"]) as a2:
            b.stop()
            r = requests.post(a2.url + "/v1/chat/completions", headers=h, timeout=60, json={
                "model": "tiny-llama", "max_tokens": 3,
                "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 502 and "failed" in r.json()["error"]["message"]
            assert requests.get(a2.url + "/health").status_code == 200


def test_serve_cli_bad_config_is_one_line(tmp_path):
    from conftest import run_cli

    r = run_cli("serve", "run", "no_such_key=1", timeout=60)
    assert r.returncode == 2 and "no_such_key" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "serve.yaml"
    bad.write_text("port: [1, 2\n")
    r = run_cli("serve", "run", "--config", bad, timeout=60)
    assert r.returncode == 2 and "serve.yaml" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("serve", "run", "generation.model=/no/such/model", "kb_docs=null",
                f"data_dir={tmp_path / 'm'}", timeout=120)
    assert r.returncode == 2 and "/no/such/model" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("serve", "add-key", "--tenant", "carol", f"data_dir={tmp_path / 'd'}", timeout=60)
    assert r.returncode == 0 and r.stdout.strip().startswith("sk-")
