"""Record manager, single-writer lock, audit log, atomic rebuild and the crash drill."""

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, SUPPORT
from llmtech.rag import records as R
from llmtech.rag.audit import AuditLog, verify
from llmtech.rag.kb import KBConfig, KnowledgeBase

TESTS = Path(__file__).resolve().parent
DOCS = ["returns_zh.md", "returns_en.md", "warranty_zh.md", "warranty_en.md", "shipping_en.md",
        "manual_a2_en.md", "troubleshooting_s1_en.md", "troubleshooting_l3_en.md"]


class HashEmbedder:
    """Feature-hashing bag of words (a real, if weak, embedder that loads no model): keeps
    these tests fast; the lab and test_lab_l703 use MiniLM."""

    model_id = "hash-64"

    def __init__(self, dim: int = 64):
        self.dim, self.cache, self.stats = dim, None, {"embedded": 0, "cached": 0}

    def encode(self, texts, query=False):
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"\w+", t.lower()):
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % self.dim] += 1
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)
        self.stats["embedded"] += len(texts)
        return out

    def encode_queries(self, queries):
        return self.encode(queries, True)

    def covers(self, lang):
        return True


@pytest.fixture()
def docs(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    for name in DOCS:
        shutil.copy(SUPPORT / "kb" / name, d / name)
    return d


@pytest.fixture()
def emb():
    return HashEmbedder()


def new_kb(path, emb):
    return KnowledgeBase.create(path, KBConfig(embedder=HashEmbedder.model_id), emb)


# ------------------------------------------------------------------ audit log

def _log(tmp_path, n=6):
    log = AuditLog(tmp_path / "audit.jsonl", actor="tester")
    for i in range(n):
        log.append("update", f"doc{i}.md", "a" * 64, "b" * 64, {"run_id": "r1"})
    return log


def _rewrite(path, lines):
    path.write_text("".join(lines), encoding="utf-8")


def test_audit_chain_verifies_and_detects_tampering(tmp_path):
    log = _log(tmp_path)
    assert verify(log.path) == {"ok": True, "path": str(log.path), "entries": 6, "bad_line": None,
                                "reason": None}
    orig = log.path.read_text(encoding="utf-8").splitlines(keepends=True)
    e = json.loads(orig[2])
    assert set(e) == {"seq", "ts", "actor", "action", "source", "before_hash", "after_hash",
                      "details", "prev", "hash"} and e["prev"] == json.loads(orig[1])["hash"]

    edited = list(orig)
    edited[2] = edited[2].replace('"doc2.md"', '"doc9.md"')
    _rewrite(log.path, edited)
    r = verify(log.path)
    assert (r["ok"], r["bad_line"]) == (False, 3) and "edited" in r["reason"]

    _rewrite(log.path, orig[:3] + orig[4:])                      # line 4 deleted
    r = verify(log.path)
    assert r["bad_line"] == 4 and "deleted" in r["reason"]

    _rewrite(log.path, orig[:1] + [orig[2], orig[1]] + orig[3:])  # lines 2 and 3 swapped
    assert verify(log.path)["bad_line"] == 2

    _rewrite(log.path, orig[:4])                                  # whole lines cut off the end
    r = verify(log.path)
    assert r["bad_line"] == 5 and "cut off" in r["reason"]

    _rewrite(log.path, orig[:5] + [orig[5][:40]])                 # torn last line
    assert "incomplete" in verify(log.path)["reason"]

    from llmtech.rag.audit import entry_hash                      # last line edited AND re-hashed:
    last = json.loads(orig[5])                                    # the head file catches it
    last["actor"] = "mallory"
    last["hash"] = entry_hash(last)
    _rewrite(log.path, orig[:5] + [json.dumps(last) + "\n"])
    assert verify(log.path)["bad_line"] == 6

    _rewrite(log.path, orig)
    assert verify(log.path)["ok"]


# ------------------------------------------------------------------ record manager

def test_modes_records_and_audit(tmp_path, docs, emb):
    kb = new_kb(tmp_path / "kb", emb)
    rm = R.RecordManager(kb, actor="alice")
    r = rm.index(docs)
    assert len(r.added) == len(DOCS) and r.consistent and r.embedded == r.chunks_total
    recs = {x.source: x for x in rm.records()}
    assert set(recs) == set(DOCS) and all(x.chunk_ids and x.first_indexed <= x.last_updated
                                          for x in recs.values())
    first = recs["returns_en.md"].first_indexed

    # edit one, add one, delete one, touch one: only the edited/added chunks are embedded
    p = docs / "returns_en.md"
    p.write_text(p.read_text(encoding="utf-8") + "\n\nRefunds now take 3 days.\n", encoding="utf-8")
    (docs / "new_en.md").write_text("# Gift cards\n\nGift cards never expire.\n", encoding="utf-8")
    (docs / "shipping_en.md").unlink()
    (docs / "warranty_en.md").touch()
    r = rm.index(docs)
    assert (r.added, r.updated, r.deleted) == (["new_en.md"], ["returns_en.md"], ["shipping_en.md"])
    assert "warranty_en.md" in r.unchanged and r.consistent
    assert r.embedded == r.chunks_added <= 4 < r.chunks_total // 4   # new chunk texts only
    rec = {x.source: x for x in rm.records()}["returns_en.md"]
    assert rec.first_indexed == first < rec.last_updated
    assert rm.index(docs).embedded == 0                     # nothing changed: nothing logged

    # scoped: only troubleshooting_* is read or deleted; the deleted manual stays indexed
    (docs / "troubleshooting_l3_en.md").unlink()
    (docs / "manual_a2_en.md").unlink()
    t = docs / "troubleshooting_s1_en.md"
    t.write_text(t.read_text(encoding="utf-8") + "\n\nE09: dust bin missing.\n", encoding="utf-8")
    r = rm.index(docs, mode="scoped", scope="troubleshooting_")
    assert r.updated == ["troubleshooting_s1_en.md"] and r.deleted == ["troubleshooting_l3_en.md"]
    assert "manual_a2_en.md" in kb.doc_hashes()
    assert all(s.startswith("troubleshooting_") for s in r.unchanged)
    assert R.RecordManager(kb).index(docs).deleted == ["manual_a2_en.md"]
    with pytest.raises(R.LlmtechError, match="scope"):
        rm.index(docs, mode="scoped")

    entries = [json.loads(x) for x in rm.audit.path.read_text(encoding="utf-8").splitlines()]
    assert verify(rm.audit.path)["ok"] and R.audit_verify(tmp_path / "kb")["open_runs"] == []
    upd = next(e for e in entries if e["action"] == "update" and e["source"] == "returns_en.md")
    assert upd["actor"] == "alice" and upd["before_hash"] != upd["after_hash"]
    assert sum(e["action"] == "commit" for e in entries) == sum(e["action"] == "begin" for e in entries) == 4
    kb.close()


def test_vanished_and_unreadable_files_keep_the_indexed_copy(tmp_path, docs, emb, monkeypatch):
    kb = new_kb(tmp_path / "kb", emb)
    rm = R.RecordManager(kb)
    rm.index(docs)
    real = R.list_sources

    def listing_then_vanish(folder):
        names = real(folder)
        (docs / "warranty_en.md").unlink()          # gone between listing and reading
        return names

    monkeypatch.setattr(R, "list_sources", listing_then_vanish)
    r = rm.index(docs)
    assert r.kept == ["warranty_en.md"] and not r.deleted
    assert "vanished after listing" in {s.source: s.reason for s in r.skipped}["warranty_en.md"]
    assert "warranty_en.md" in kb.doc_hashes()
    monkeypatch.setattr(R, "list_sources", real)
    assert rm.index(docs).deleted == ["warranty_en.md"]   # absent from the next listing: deleted

    (docs / "faq.jsonl").write_text('{"q": "a", "a": "b"}\n', encoding="utf-8")
    rm.index(docs)
    (docs / "faq.jsonl").write_text('{"q": "a", "a": \n', encoding="utf-8")   # now corrupt
    r = rm.index(docs)
    assert r.kept == ["faq.jsonl"] and "faq.jsonl" in kb.doc_hashes() and kb.consistent()
    (tmp_path / "empty").mkdir()
    n = len(kb.doc_hashes())
    with pytest.raises(R.DataError, match="no documents listed"):
        rm.index(tmp_path / "empty")                      # a wrong folder must not wipe the index
    assert len(kb.doc_hashes()) == n
    kb.close()


LOCKED = """
import sys
from llmtech.rag.kb import KnowledgeBase
from llmtech.rag.records import KBLocked, RecordManager
kb = KnowledgeBase.open(sys.argv[1])
try:
    RecordManager(kb).index(sys.argv[2])
except KBLocked as e:
    print(e)
    sys.exit(3)
"""


def test_second_writer_is_refused_readers_are_not(tmp_path, docs, emb):
    kb = new_kb(tmp_path / "kb", emb)
    R.RecordManager(kb).index(docs)
    with kb.writing():
        p = subprocess.run([sys.executable, "-c", LOCKED, str(tmp_path / "kb"), str(docs)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 3, p.stderr[-1500:]
        assert str(tmp_path / "kb") in p.stdout and "pid" in p.stdout
        other = KnowledgeBase.open(tmp_path / "kb", emb)   # a second writer in this process too
        with pytest.raises(R.KBLocked):
            other.update(docs)
        assert other.search("warranty", k=2, mode="bm25")  # reading is never blocked
        other.close()
    assert R.RecordManager(kb).index(docs).consistent     # lock released
    kb.close()


def test_rebuild_swaps_atomically_and_crash_leaves_old_serving(tmp_path, docs, emb):
    link = tmp_path / "kb"
    kb = new_kb(link, emb)
    R.RecordManager(kb).index(docs)
    kb.close()
    (docs / "shipping_en.md").unlink()
    r = R.rebuild(link, docs, embedder=emb)
    assert r.deleted == ["shipping_en.md"] and r.embedded == r.chunks_total and r.consistent
    assert link.is_symlink() and link.resolve().name == "g-000001"
    reader = KnowledgeBase.open(link, emb)                # pinned to generation 1
    (docs / "returns_en.md").unlink()
    R.rebuild(link, docs, embedder=emb)
    assert link.resolve().name == "g-000002" and reader.path.name == "g-000001"
    assert "returns_en.md" in reader.doc_hashes() and reader.consistent()   # old, whole
    with pytest.raises(R.KBLocked, match="rebuilt"):
        reader.update(docs)                               # its writes would be lost
    reader.close()
    now = KnowledgeBase.open(link, emb)
    assert "returns_en.md" not in now.doc_hashes() and now.consistent()
    now.close()
    assert R.audit_verify(link)["ok"]


def test_crash_drill(tmp_path, docs, emb):
    base = tmp_path / "base"
    kb = new_kb(base, emb)
    R.RecordManager(kb).index(docs)
    kb.close()
    p = docs / "warranty_en.md"
    p.write_text(p.read_text(encoding="utf-8") + "\n\nBatteries: 18 months.\n", encoding="utf-8")
    (docs / "returns_zh.md").unlink()
    (docs / "new_en.md").write_text("# Gift cards\n\nGift cards never expire.\n", encoding="utf-8")
    rows = R.crash_drill(base, docs, tmp_path / "drill",
                         ["before-commit", "after-commit", "embed:1", "rebuild-before-swap"],
                         embedder=emb, embedder_spec="test_rag_records:HashEmbedder",
                         pythonpath=[TESTS], queries=["battery warranty", "gift card", "退货"])
    for row in rows:
        assert row["killed"] and row["passed"], row
    assert rows[-1]["old_index_served"] is True


def test_scan_skips_a_file_that_vanishes_after_listing(tmp_path, monkeypatch):
    from llmtech.rag import loaders

    (tmp_path / "a.md").write_text("# A\n\nkept\n", encoding="utf-8")
    ghost = tmp_path / "gone.md"
    real_rglob = Path.rglob
    # the listing still names gone.md, but the file is gone by the time it is read
    monkeypatch.setattr(Path, "rglob", lambda self, pat: [*real_rglob(self, pat), ghost])
    monkeypatch.setattr(Path, "is_file", lambda self: True)
    docs, skipped = loaders.scan(tmp_path)
    assert [d.source for d in docs] == ["a.md"]
    assert skipped[0].source == "gone.md" and "vanished" in skipped[0].reason


def test_cli_audit_verify(tmp_path):
    from conftest import run_cli

    kb = tmp_path / "kb"
    kb.mkdir()
    log = _log(kb)
    assert log.path == kb / "audit.jsonl"
    p = run_cli("rag", "audit-verify", "--kb", kb)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout)["ok"] is True and json.loads(p.stdout)["entries"] == 6
    lines = log.path.read_text(encoding="utf-8").splitlines(keepends=True)
    _rewrite(log.path, lines[:2] + [lines[2].replace('"doc2.md"', '"doc9.md"')] + lines[3:])
    p = run_cli("rag", "audit-verify", "--kb", kb)
    assert p.returncode == 1 and json.loads(p.stdout)["bad_line"] == 3
    p = run_cli("rag", "audit-verify", "--kb", tmp_path / "nothing")
    assert p.returncode == 2 and "no audit log" in p.stderr and "Traceback" not in p.stderr
