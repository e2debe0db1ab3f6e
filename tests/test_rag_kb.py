"""Knowledge base: incremental indexing, bad input, crash safety, CLI."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, SUPPORT, run_cli
from llmtech.errors import ConfigError
from llmtech.rag.kb import KBConfig, KnowledgeBase

DOCS = ["returns_zh.md", "returns_en.md", "warranty_zh.md", "warranty_en.md", "shipping_en.md",
        "manual_a2_en.md"]


@pytest.fixture()
def docs(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    for name in DOCS:
        shutil.copy(SUPPORT / "kb" / name, d / name)
    return d


def _ids(kb):
    return sorted(r[0] for r in kb.db.execute("SELECT id FROM chunks"))


def test_incremental_update_and_bad_files(tmp_path, docs):
    kb = KnowledgeBase.build(tmp_path / "kb", docs)
    r = kb.last_report
    assert len(r.added) == len(DOCS) and not r.skipped and kb.consistent()
    first = _ids(kb)
    hit = kb.search("What does the warranty not cover and how long is the S1 battery warranty?", k=3)
    assert hit[0].doc_id == "warranty_en.md" and hit[0].text in (docs / "warranty_en.md").read_text()
    assert kb.search("质量问题换货的期限", k=3, mode="bm25")[0].doc_id == "returns_zh.md"

    # change one, delete one, add a duplicate, an empty file, a corrupt PDF, an unsupported type,
    # a GBK text file
    (docs / "shipping_en.md").write_text("# Shipping\n\nWe ship within 24 hours now.\n", encoding="utf-8")
    (docs / "manual_a2_en.md").unlink()
    shutil.copy(docs / "returns_en.md", docs / "copy_of_returns.md")
    (docs / "empty.md").write_text("  \n", encoding="utf-8")
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    (docs / "image.png").write_bytes(b"\x89PNG")
    (docs / "gbk.txt").write_bytes("门锁保修三十六个月。".encode("gbk"))
    kb.close()
    kb = KnowledgeBase.open(tmp_path / "kb")
    r = kb.update(docs)
    assert r.updated == ["shipping_en.md"] and r.deleted == ["manual_a2_en.md"]
    assert r.added == ["gbk.txt"]
    reasons = {s.source: s.reason for s in r.skipped}
    assert "duplicate of" in reasons["copy_of_returns.md"]
    assert "empty" in reasons["empty.md"]
    assert "broken.pdf" in reasons and "unsupported" in reasons["image.png"]
    assert kb.consistent()
    now = _ids(kb)
    assert not any(i.startswith("manual_a2_en.md#") for i in now)
    unchanged = [i for i in first if i.startswith("returns_")]
    assert set(unchanged) <= set(now)              # untouched documents keep their chunks
    assert r.embedded <= 3                          # only the new/changed chunks were embedded
    assert kb.search("门锁保修", k=1, mode="bm25")[0].doc_id == "gbk.txt"
    kb.close()


def test_dimension_mismatch_is_a_clear_error(tmp_path, docs):
    from llmtech.rag.stores import FaissStore

    store = FaissStore(8, path=tmp_path / "kb" / "vectors")
    store.persist()
    kb = KnowledgeBase.create(tmp_path / "kb", KBConfig())
    with pytest.raises(ConfigError, match="8-d"):
        kb.update(docs)


CRASH = textwrap.dedent("""
    import os, sys
    from llmtech.rag import kb as K
    from llmtech.rag.stores import faiss_store
    where = sys.argv[3]
    if where == "persist":      # the docstore is committed, vectors added, not yet persisted
        faiss_store.FaissStore.persist = lambda self: os._exit(9)
    elif where == "embed":      # dies inside embedding, after a first batch was added
        real = K.KnowledgeBase.sync
        from llmtech.rag.embed import Embedder
        enc = Embedder.encode
        calls = []
        def dying(self, texts, query=False):
            calls.append(1)
            if len(calls) > 1:
                os._exit(9)
            return enc(self, texts, query)
        Embedder.encode = dying
    cfg = K.KBConfig(batch_size=2)   # small batches: several writes per update
    kb = K.KnowledgeBase.build(sys.argv[1], sys.argv[2], cfg)
""")


@pytest.mark.parametrize("where", ["persist", "embed"])
def test_killed_update_loses_nothing_on_rerun(tmp_path, docs, where):
    script = tmp_path / "crash.py"
    script.write_text(CRASH, encoding="utf-8")
    kb_dir = tmp_path / "kb"
    p = subprocess.run([sys.executable, str(script), str(kb_dir), str(docs), where], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 9, p.stderr[-2000:]
    kb = KnowledgeBase.build(kb_dir, docs)             # rerun after the crash
    assert kb.consistent()
    assert sorted(r[0] for r in kb.db.execute("SELECT doc_id FROM docs")) == sorted(DOCS)
    ids = kb.store.ids()
    assert len(ids) == len(set(ids)) == len(_ids(kb))  # nothing duplicated
    kb.close()


def test_cli_index_ask_errors_and_eval(tmp_path, docs):
    kb = tmp_path / "kbs" / "demo"
    p = run_cli("rag", "index", "--docs", docs, "--kb", kb)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    assert out["n_added"] == len(DOCS) and out["consistent"] is True
    p = run_cli("rag", "index", "--docs", docs, "--kb", kb)
    assert json.loads(p.stdout)["n_unchanged"] == len(DOCS)

    p = run_cli("rag", "index", "--docs", tmp_path / "nope", "--kb", kb)
    assert p.returncode == 2 and "nope" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("rag", "index", "--docs", docs, "--kb", tmp_path / "k2", "chunk.sise=3")
    assert p.returncode == 2 and "sise" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("rag", "ask", "--kb", tmp_path / "missing", "hello")
    assert p.returncode == 2 and "no knowledge base" in p.stderr

    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    corpus = [{"_id": f"d{i}", "title": "", "text": open(docs / n, encoding="utf-8").read()}
              for i, n in enumerate(DOCS)]
    (beir / "corpus.jsonl").write_text("\n".join(json.dumps(c, ensure_ascii=False) for c in corpus))
    queries = [("q1", "How many days do I have to return an item without a reason?", "d1"),
               ("q2", "智能门锁的保修期是多久", "d2"), ("q3", "When is my order shipped?", "d4")]
    (beir / "queries.jsonl").write_text("\n".join(json.dumps({"_id": q, "text": t}, ensure_ascii=False)
                                                  for q, t, _ in queries))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n"
                                             + "".join(f"{q}\t{d}\t1\n" for q, _, d in queries))
    for retriever in ("bm25", "dense", "hybrid"):
        p = run_cli("rag", "eval", "--beir", beir, "--retriever", retriever, "--no-cache")
        assert p.returncode == 0, p.stderr[-2000:]
        res = json.loads(p.stdout)
        assert {"ndcg@10", "recall@100", "mrr@10", "queries_per_s", "index_seconds"} <= set(res)
        assert res["n_queries"] == 3 and 0 < res["ndcg@10"] <= 1
    assert res["ndcg@10"] > 0.6
    p = run_cli("rag", "eval", "--beir", beir, "--retriever", "tfidf")
    assert p.returncode == 2 and "bm25, dense or hybrid" in p.stderr
    p = run_cli("rag", "eval", "--beir", beir, "--split", "dev")
    assert p.returncode == 2 and "available: test" in p.stderr


def test_cli_ask_answers_with_sources(tmp_path, docs):
    kb = tmp_path / "kb"
    assert run_cli("rag", "index", "--docs", docs, "--kb", kb).returncode == 0
    p = run_cli("rag", "ask", "--kb", kb, "--json", "--k", "2",
                "How many days do I have to return an item without giving a reason?")
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    assert out["answer"].strip() and len(out["sources"]) == 2
    assert out["sources"][0]["doc_id"] == "returns_en.md"
    assert all(1 <= n <= 2 for n in out["citations"])     # only real sources can be cited
    p = run_cli("rag", "ask", "--kb", kb, "--rerank", "ms:nobody/no-such-reranker", "hi")
    assert p.returncode == 2 and "--rerank llm" in p.stderr and "Traceback" not in p.stderr


def test_garbled_chunks_are_left_out_and_reported(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    good = "# 保修\n\n智能门锁 L3 保修 36 个月，电池除外。"
    garbled = "空气净化器滤芯每六个月更换一次。".encode("gbk").decode("latin-1")  # GBK read as Latin-1
    (docs / "a.md").write_text(good + "\n\n" + "\n\n".join([garbled] * 3), encoding="utf-8")
    kb = KnowledgeBase.build(tmp_path / "kb", docs, KBConfig(chunk={"size": 60, "overlap": 0}))
    r = kb.last_report
    assert r.bad_chunks and all("mojibake" in b for b in r.bad_chunks)
    texts = [t for (t,) in kb.db.execute("SELECT text FROM chunks")]
    assert any("36 个月" in t for t in texts) and not any(garbled[:6] in t for t in texts)
    assert kb.consistent()
    kb.close()


def test_empty_or_wrong_folder_does_not_wipe_the_kb(tmp_path, docs):
    kb_dir = tmp_path / "kb"
    assert run_cli("rag", "index", "--docs", docs, "--kb", kb_dir).returncode == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.png").write_bytes(b"\x89PNG")
    p = run_cli("rag", "index", "--docs", empty, "--kb", kb_dir)
    assert p.returncode == 2 and "no readable documents, nothing changed" in p.stderr
    assert "notes.png" in p.stderr and "Traceback" not in p.stderr
    kb = KnowledgeBase.open(kb_dir)
    assert kb.stats()["documents"] == len(DOCS) and kb.consistent()
    kb.close()


def test_corrupt_docstore_is_a_clear_error(tmp_path, docs):
    kb_dir = tmp_path / "kb"
    assert run_cli("rag", "index", "--docs", docs, "--kb", kb_dir).returncode == 0
    (kb_dir / "docstore.sqlite").write_bytes(b"this is not a sqlite file at all" * 100)
    p = run_cli("rag", "index", "--docs", docs, "--kb", kb_dir)
    assert p.returncode == 2 and "docstore.sqlite: not a readable docstore" in p.stderr
    assert "Traceback" not in p.stderr
