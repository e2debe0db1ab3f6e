"""Record manager for a knowledge base: per-source records, update modes, one writer at a time,
an audit trail, atomic batch rebuilds and a crash drill.

Built on ``KnowledgeBase`` (its docstore is the source of truth; ``sync`` makes the vector store
and BM25 follow it). What this module adds:

* **Records** — one row per source: content hash, first indexed, last updated, chunk ids, the
  run that wrote it (``records`` table in the docstore, written in the same transaction as the
  documents).
* **Modes** of ``RecordManager.index``: ``incremental`` (changed sources are re-chunked and only
  their new chunks embedded; sources missing from the folder are deleted), ``scoped`` (the same,
  but only sources under ``scope`` — a prefix or a list of prefixes — are read or deleted; every
  other source is left untouched) and ``full`` (``rebuild``: a complete new index built next to
  the live one, verified, then swapped in atomically).
* **Vanishing and unreadable files.** The rule: *a source is deleted from the index only when it
  is absent from the folder listing taken at the start of a run.* A file that is listed but then
  cannot be used — it vanished before it was read, it is unreadable, corrupt, empty or too
  large — is reported as skipped and its indexed copy is kept; if it is really gone, the next
  run's listing will not have it and deletes it then.
* **One writer.** ``WriteLock``: an exclusive non-blocking ``flock`` on ``<kb>/write.lock``; a
  second writer gets ``KBLocked`` naming the knowledge base and the holder's pid.
* **Audit trail** (``llmtech.rag.audit``): every run that changes something appends ``begin``,
  one entry per changed source (add / update / delete with before and after content hashes) and
  ``commit``. The run id is stored in the docstore in the same transaction as the documents, so
  after a crash ``recover`` knows exactly whether the run landed: it appends ``commit``
  (``recovered: true``) or ``abort``. A source entry counts only if its run has a ``commit``.
* **Crash drill** (``crash_drill``): kill an update with SIGKILL at named points (an env-var
  fault hook, ``LLMTECH_FAULT=<point>``), rerun it, and check that nothing was lost or
  duplicated and that search results equal a from-scratch build.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from ..errors import DataError, LlmtechError
from .audit import AuditLog, read_entries, verify
from .chunking import text_hash
from .kb import IndexReport, KnowledgeBase, keepers
from .loaders import SUPPORTED, Skipped, load_file

log = logging.getLogger(__name__)

FAULT_ENV = "LLMTECH_FAULT"
RECORDS_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (source TEXT PRIMARY KEY, hash TEXT, first_indexed REAL,
    last_updated REAL, run_id TEXT);
CREATE TABLE IF NOT EXISTS runs (run_id TEXT PRIMARY KEY, mode TEXT, started REAL, committed REAL);
"""


class KBLocked(LlmtechError):
    """Another writer holds the knowledge base's write lock."""


# ---------------------------------------------------------------------------- fault hook

def fault(point: str) -> None:
    """Crash drill hook: SIGKILL this process when ``LLMTECH_FAULT`` names ``point``."""
    if os.environ.get(FAULT_ENV) == point:
        log.warning("fault hook: killing pid %d at %s", os.getpid(), point)
        os.kill(os.getpid(), signal.SIGKILL)


def _arm_embed_fault(kb: KnowledgeBase) -> None:
    """``LLMTECH_FAULT=embed:N``: die right after the N-th batch of vectors was added."""
    want = os.environ.get(FAULT_ENV, "")
    if not want.startswith("embed:"):
        return
    n, store, calls = int(want.split(":")[1]), kb.store, []
    real_add = store.add

    def add(*args, **kwargs):
        real_add(*args, **kwargs)
        calls.append(1)
        if len(calls) >= n:
            fault(want)

    store.add = add


# ---------------------------------------------------------------------------- write lock

class WriteLock:
    """Exclusive, non-blocking ``flock`` on ``<kb>/write.lock``; the holder writes its pid there.

    ``link``: the path the caller opened; if a rebuild swapped a new generation in while we were
    getting the lock, writing here would be lost, so that is refused too."""

    def __init__(self, path: str | os.PathLike, link: str | os.PathLike | None = None):
        self.path, self.link = Path(path), Path(link) if link is not None else None
        self.file = self.path / "write.lock"
        self.fd: int | None = None

    def acquire(self) -> "WriteLock":
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise KBLocked(f"{self.link or self.path}: another writer (pid {holder}) is updating "
                           f"this knowledge base; wait for it to finish and retry "
                           f"(lock: {self.file})") from None
        if self.link is not None and self.link.resolve() != self.path.resolve():
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise KBLocked(f"{self.link}: the knowledge base was rebuilt while this copy was open; "
                           "reopen it and retry")
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "WriteLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------------- listing + reading

def in_scope(source: str, scope: str | Sequence[str] | None) -> bool:
    if scope is None:
        return True
    prefixes = [scope] if isinstance(scope, str) else list(scope)
    return any(source == p or source.startswith(p) for p in prefixes)


def list_sources(folder: str | Path) -> list[str]:
    """The listing a run works from: supported files under ``folder`` (sorted, relative,
    hidden files and folders left out)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: documents folder not found")
    out = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or path.suffix.lower() not in SUPPORTED:
            continue
        try:
            if path.is_file():
                out.append(rel.as_posix())
        except OSError:
            continue
    return sorted(out)


def read_source(folder: Path, source: str, max_bytes: int):
    """A listed source as a Document, or the reason it cannot be used now."""
    path = folder / source
    try:
        size = path.stat().st_size
        if size > max_bytes:
            return None, f"file too large ({size} bytes > {max_bytes})"
        doc = load_file(path, folder)
    except FileNotFoundError:
        return None, "vanished after listing"
    except PermissionError as e:
        return None, f"unreadable: {e.strerror}"
    except LlmtechError as e:
        msg = str(e).replace(str(path), source)
        return None, ("vanished after listing" if "not found" in msg else f"unreadable: {msg}")
    except Exception as e:  # noqa: BLE001 - corrupt pdf/docx raise library-specific errors
        return None, f"unreadable: {type(e).__name__}: {e}"
    if not doc.text.strip():
        return None, "empty document (no text)"
    return doc, None


# ---------------------------------------------------------------------------- records + runs

@dataclass
class Record:
    source: str
    hash: str
    first_indexed: float
    last_updated: float
    chunk_ids: list[str]
    run_id: str | None = None


@dataclass
class RunReport(IndexReport):
    mode: str = "incremental"
    scope: list[str] | None = None
    run_id: str | None = None
    kept: list[str] = field(default_factory=list)   # listed but unusable: indexed copy kept
    consistent: bool | None = None

    def summary(self) -> dict[str, Any]:
        d = super().summary()
        d["n_kept"] = len(self.kept)
        return d


@dataclass
class _Plan:
    writes: list = field(default_factory=list)          # (Document, chunks)
    deleted: list[str] = field(default_factory=list)
    same: list = field(default_factory=list)            # unchanged Documents (for rebuilds)
    changes: list[tuple[str, str, str | None, str | None]] = field(default_factory=list)


class RecordManager:
    """Index a folder into ``kb`` with per-source records and an audit trail.

    ``audit``: an ``AuditLog`` (default ``<kb>/audit.jsonl``)."""

    def __init__(self, kb: KnowledgeBase, audit: AuditLog | None = None,
                 actor: str | None = None):
        self.kb = kb
        self.audit = audit or AuditLog(kb.path / "audit.jsonl", actor=actor)
        with kb.db:
            kb.db.executescript(RECORDS_SCHEMA)

    # -------------------------------------------------------------- reads
    def records(self) -> list[Record]:
        db = self.kb.db
        chunks: dict[str, list[str]] = {}
        for cid, doc in db.execute("SELECT id, doc_id FROM chunks ORDER BY doc_id, n"):
            chunks.setdefault(doc, []).append(cid)
        rows = db.execute("SELECT d.doc_id, d.hash, COALESCE(r.first_indexed, d.updated_at), "
                          "d.updated_at, r.run_id FROM docs d LEFT JOIN records r "
                          "ON r.source = d.doc_id ORDER BY d.doc_id")
        return [Record(s, h, f, u, chunks.get(s, []), run) for s, h, f, u, run in rows]

    def committed_runs(self) -> set[str]:
        return {r[0] for r in self.kb.db.execute("SELECT run_id FROM runs")}

    def open_runs(self) -> list[str]:
        """Runs with a ``begin`` in the audit log but neither ``commit`` nor ``abort``."""
        open_: dict[str, None] = {}
        for e in read_entries(self.audit.path):
            run = e["details"].get("run_id")
            if e["action"] == "begin":
                open_[run] = None
            elif e["action"] in ("commit", "abort"):
                open_.pop(run, None)
        return list(open_)

    # -------------------------------------------------------------- recovery
    def recover(self) -> list[dict[str, Any]]:
        """Close the audit trail of runs a crash interrupted and finish their index sync."""
        done = []
        with self.kb.writing():
            landed = self.committed_runs()
            for run in self.open_runs():
                if run in landed:   # the docstore transaction landed: finish the indexes too
                    self.kb.sync()
                    done.append(self.audit.append("commit", details={
                        "run_id": run, "recovered": True, "consistent": self.kb.consistent()}))
                else:
                    done.append(self.audit.append("abort", details={
                        "run_id": run, "reason": "interrupted before its docstore commit; "
                                                 "nothing of this run was applied"}))
        return done

    # -------------------------------------------------------------- planning
    def _plan(self, docs_dir: Path, scope, report: RunReport, base: dict[str, str]) -> _Plan:
        """Compare the folder with ``base`` (source -> hash) and chunk what must be written."""
        cfg = self.kb.config
        listed = [s for s in list_sources(docs_dir) if in_scope(s, scope)]
        docs = []
        for source in listed:
            doc, why = read_source(docs_dir, source, cfg.max_file_bytes)
            if doc is not None:
                docs.append(doc)
                continue
            if source in base:
                report.kept.append(source)
                why += "; indexed copy kept"
            report.skipped.append(Skipped(source, why))
        if not listed and scope is None:  # a wrong or empty folder must not wipe the index
            raise DataError(f"{docs_dir}: no documents listed, nothing changed")
        tokenizer = (self.kb.embedder.st.tokenizer if cfg.chunk.strategy == "tokens" else None)
        keeper = keepers(docs, base)   # identical content under several names: indexed once
        plan = _Plan()
        present = set(report.kept)
        for doc in docs:
            h = text_hash(doc.text)
            if keeper[h] != doc.source:
                report.skipped.append(Skipped(doc.source, f"duplicate of {keeper[h]}"))
                continue
            present.add(doc.source)
            if base.get(doc.source) == h:
                report.unchanged.append(doc.source)
                plan.same.append(doc)
                continue
            kind = "update" if doc.source in base else "add"
            (report.updated if kind == "update" else report.added).append(doc.source)
            plan.writes.append((doc, self.kb._chunks_of(doc, tokenizer, report)))
            plan.changes.append((kind, doc.source, base.get(doc.source), h))
        # the deletion rule: only in-scope sources that are not in this run's listing
        # (or that became a duplicate of another listed source)
        plan.deleted = sorted(s for s in base if in_scope(s, scope) and s not in present)
        report.deleted = list(plan.deleted)
        plan.changes += [("delete", s, base[s], None) for s in plan.deleted]
        return plan

    # -------------------------------------------------------------- applying
    def _apply(self, plan: _Plan, report: RunReport, mode: str, use_cache: bool = True,
               wipe: bool = False, first_indexed: dict[str, float] | None = None,
               begin: bool = True) -> None:
        """begin → per-source entries → ONE docstore transaction (documents + records + run id)
        → sync vectors and BM25 → commit."""
        kb, run = self.kb, report.run_id
        if begin:
            self.audit.append("begin", details={"run_id": run, "mode": mode,
                                                "scope": report.scope,
                                                "changes": len(plan.changes)})
        for kind, source, before, after in plan.changes:
            chunks = next((len(c) for d, c in plan.writes if d.source == source), 0)
            self.audit.append(kind, source, before, after, {"run_id": run, "chunks": chunks})
        fault("before-commit")
        now = time.time()
        known = dict(first_indexed or {})

        def records(db):
            for s in plan.deleted:
                db.execute("DELETE FROM records WHERE source = ?", (s,))
            for doc, _ in plan.writes:
                db.execute("INSERT INTO records VALUES (?,?,?,?,?) ON CONFLICT(source) DO UPDATE "
                           "SET hash = excluded.hash, last_updated = excluded.last_updated, "
                           "run_id = excluded.run_id",
                           (doc.source, text_hash(doc.text), known.get(doc.source, now), now, run))
            db.execute("INSERT INTO runs VALUES (?,?,?,?)", (run, mode, now, time.time()))

        kb._write(plan.writes, plan.deleted, wipe=wipe, in_transaction=records)
        fault("after-commit")
        _arm_embed_fault(kb)
        kb.sync(report, use_cache=use_cache)
        fault("after-sync")
        report.consistent = kb.consistent()
        report.chunks_total = kb.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
        self.audit.append("commit", details={
            "run_id": run, "added": len(report.added), "updated": len(report.updated),
            "deleted": len(report.deleted), "embedded": report.embedded,
            "consistent": report.consistent})

    def index(self, docs_dir: str | Path, mode: Literal["incremental", "scoped"] = "incremental",
              scope: str | Sequence[str] | None = None, use_cache: bool = True) -> RunReport:
        """Bring the knowledge base in line with ``docs_dir`` (see the module docstring for the
        modes); returns added / updated / unchanged / deleted / kept sources and embed counts."""
        if mode == "full":
            raise LlmtechError("mode 'full' builds a new index: call records.rebuild(...)")
        if mode not in ("incremental", "scoped"):
            raise LlmtechError(f"unknown mode '{mode}' (incremental, scoped, full)")
        if mode == "scoped" and not scope:
            raise LlmtechError("mode 'scoped' needs a scope (a source prefix or a list of them)")
        t0 = time.perf_counter()
        report = RunReport(mode=mode, run_id=uuid.uuid4().hex[:12],
                           scope=None if scope is None else ([scope] if isinstance(scope, str)
                                                             else list(scope)))
        with self.kb.writing():
            self.recover()
            plan = self._plan(Path(docs_dir), scope if mode == "scoped" else None, report,
                              self.kb.doc_hashes())
            if plan.changes:
                self._apply(plan, report, mode, use_cache)
            else:
                self.kb.sync(report, use_cache=use_cache)   # repairs indexes, logs nothing
                report.consistent = self.kb.consistent()
                report.chunks_total = self.kb.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
        report.seconds = time.perf_counter() - t0
        return report


# ---------------------------------------------------------------------------- batch rebuild

def _gens_dir(link: Path) -> Path:
    return link.parent / f".{link.name}.gens"


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def recover_swap(link: Path) -> None:
    """Finish a swap a crash interrupted (only possible on the two-rename fallback path)."""
    tmp = link.with_name(f".{link.name}.link-tmp")
    if not os.path.lexists(link) and os.path.lexists(tmp):
        os.replace(tmp, link)
    elif os.path.lexists(tmp):
        os.unlink(tmp)


def _swap_in(link: Path, new_gen: Path) -> Path | None:
    """Make ``link`` point at ``new_gen``; returns where the previous real folder went."""
    tmp = link.with_name(f".{link.name}.link-tmp")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(os.path.relpath(new_gen, link.parent), tmp)
    if link.is_symlink():
        os.replace(tmp, link)              # atomic: readers see the old or the new target
        return None
    old_home = new_gen.parent / "g-000000"  # first rebuild: the real folder becomes a generation
    if _exchange(tmp, link):
        os.rename(tmp, old_home)
    else:                                   # fallback: two renames, ``recover_swap`` finishes
        os.rename(link, old_home)
        fault("swap-between-renames")
        os.replace(tmp, link)
    return old_home


def rebuild(link: str | Path, docs_dir: str | Path, embedder=None, actor: str | None = None,
            keep: int = 1, use_cache: bool = False) -> RunReport:
    """Full mode: build a complete new index (docstore, vectors, BM25) in a new generation
    folder, verify it, and swap it in atomically. ``link`` becomes a symlink to the current
    generation; ``keep`` older generations stay for readers that still have them open.
    A crash at any point before the swap leaves the old index serving, untouched."""
    t0 = time.perf_counter()
    link = Path(link)
    recover_swap(link)
    current = KnowledgeBase.open(link, embedder)
    report = RunReport(mode="full", run_id=uuid.uuid4().hex[:12])
    gens = _gens_dir(link)
    gens.mkdir(exist_ok=True)
    try:
        with current.writing():
            old_rm = RecordManager(current, actor=actor)
            old_rm.recover()
            serving = link.resolve().name if link.is_symlink() else None
            for stale in gens.iterdir():   # left by a rebuild that crashed: never served
                if stale.name.startswith("tmp-") or serving is None or stale.name > serving:
                    shutil.rmtree(stale, ignore_errors=True)
            base = current.doc_hashes()
            first = {r.source: r.first_indexed for r in old_rm.records()}
            old_rm.audit.append("begin", details={"run_id": report.run_id, "mode": "full"})
            fault("rebuild-begin")
            work = gens / f"tmp-{report.run_id}"
            work.mkdir()
            for name in ("audit.jsonl", "audit.jsonl.head"):   # the trail continues there
                if (current.path / name).exists():
                    shutil.copy2(current.path / name, work / name)
            new = KnowledgeBase.create(work, current.config, embedder)
            try:
                rm = RecordManager(new, audit=AuditLog(work / "audit.jsonl", actor=actor))
                plan = rm._plan(Path(docs_dir), None, report, base)
                # the new index holds every usable source; the audit records only changes
                keep_docs = set(report.kept)
                if keep_docs:   # listed but unreadable now: carry the indexed copy over
                    carry_over(current, new, keep_docs)
                tok = new.embedder.st.tokenizer if new.config.chunk.strategy == "tokens" else None
                plan.writes += [(d, new._chunks_of(d, tok, IndexReport())) for d in plan.same]
                plan.deleted = []
                rm._apply(plan, report, "full", use_cache=use_cache, first_indexed=first,
                          begin=False)
                fault("rebuild-built")
                n_docs = new.db.execute("SELECT COUNT(*) FROM docs").fetchone()[0]
                expect = len(report.added) + len(report.updated) + len(report.unchanged) + len(keep_docs)
                st = new.stats()
                if not (report.consistent and n_docs == expect
                        and st["chunks"] == st["vectors"] == st["bm25_docs"]):
                    raise DataError(f"{work}: the rebuilt index failed verification ({st}, "
                                    f"{n_docs} documents, expected {expect}); the old index "
                                    "keeps serving")
            finally:
                new.close()
            n = max([int(p.name[2:]) for p in gens.glob("g-*") if p.name[2:].isdigit()] or [0]) + 1
            final = gens / f"g-{n:06d}"
            os.rename(work, final)
            fault("rebuild-before-swap")
            _swap_in(link, final)
    finally:
        current.close()
    _prune(link, keep)
    report.seconds = time.perf_counter() - t0
    return report


def carry_over(old: KnowledgeBase, new: KnowledgeBase, sources: set[str]) -> None:
    """Copy these sources' docstore rows (documents, chunks, records) from ``old`` to ``new``."""
    with new.db:
        for s in sources:
            for row in old.db.execute("SELECT * FROM docs WHERE doc_id = ?", (s,)):
                new.db.execute("INSERT INTO docs VALUES (?,?,?,?,?,?,?)", row)
            new.db.executemany("INSERT INTO chunks VALUES (?,?,?,?,?,?,?)",
                               old.db.execute("SELECT * FROM chunks WHERE doc_id = ?", (s,)))
            new.db.executemany("INSERT OR REPLACE INTO records VALUES (?,?,?,?,?)",
                               old.db.execute("SELECT * FROM records WHERE source = ?", (s,)))


def _prune(link: Path, keep: int) -> None:
    """Remove generations other than the current one and the ``keep`` before it."""
    gens = _gens_dir(link)
    current = link.resolve().name
    names = sorted(p.name for p in gens.glob("g-*"))
    older = [n for n in names if n < current][::-1]
    for name in names:
        if name != current and name not in older[:keep]:
            shutil.rmtree(gens / name, ignore_errors=True)


# ---------------------------------------------------------------------------- verifying

def audit_verify(kb_path: str | Path) -> dict[str, Any]:
    """Verify a knowledge base's audit log (for ``llmtech rag audit-verify``): the chain
    result plus the runs left open (begun, neither committed nor aborted)."""
    path = Path(kb_path)
    log_path = (path.resolve() if path.is_symlink() else path) / "audit.jsonl"
    if not log_path.exists():
        raise DataError(f"{path}: no audit log ({log_path.name} not found)")
    result = verify(log_path)
    result["open_runs"] = []
    if result["ok"]:
        open_: dict[str, None] = {}
        for line in log_path.read_text(encoding="utf-8").splitlines():
            e = json.loads(line)
            run = e["details"].get("run_id")
            if e["action"] == "begin":
                open_[run] = None
            elif e["action"] in ("commit", "abort"):
                open_.pop(run, None)
        result["open_runs"] = list(open_)
    return result


def check_index(kb: KnowledgeBase, expect: KnowledgeBase | None = None,
                queries: Sequence[str] = (), k: int = 5) -> dict[str, Any]:
    """The crash drill's checks: every source once, docstore == vectors == BM25 ids, no duplicate
    vectors, and (given a from-scratch build ``expect``) the same documents and search results."""
    docs = [r[0] for r in kb.db.execute("SELECT doc_id FROM docs")]
    ids = [r[0] for r in kb.db.execute("SELECT id FROM chunks")]
    vec = kb.store.ids()
    out = {"documents": len(docs), "chunks": len(ids), "vectors": len(vec),
           "bm25": len(kb.bm25.doc_ids), "no_duplicates": len(vec) == len(set(vec))
           and len(docs) == len(set(docs)), "consistent": kb.consistent()}
    if expect is not None:
        out["same_documents"] = kb.doc_hashes() == expect.doc_hashes()
        out["same_chunks"] = sorted(ids) == sorted(r[0] for r in expect.db.execute("SELECT id FROM chunks"))
        if queries:
            got = [[p.id for p in hs] for hs in kb.search_many(list(queries), k)]
            ref = [[p.id for p in hs] for hs in expect.search_many(list(queries), k)]
            out["same_search"] = got == ref
    out["passed"] = all(v for key, v in out.items() if isinstance(v, bool))
    return out


# ---------------------------------------------------------------------------- crash drill

DEFAULT_POINTS = ("before-commit", "after-commit", "embed:1", "after-sync", "rebuild-built",
                  "rebuild-before-swap")


def crash_drill(baseline: str | Path, docs_dir: str | Path, work: str | Path,
                points: Sequence[str] = DEFAULT_POINTS, embedder=None,
                embedder_spec: str | None = None, pythonpath: Sequence[str] = (),
                queries: Sequence[str] = (), k: int = 5, timeout: float = 300) -> list[dict]:
    """For each kill point: copy the ``baseline`` knowledge base, run the update of
    ``docs_dir`` into it in a child process that is SIGKILLed at that point (``rebuild-*``
    points run a full rebuild, the others an incremental update), rerun the same update here,
    and compare with a from-scratch build of ``docs_dir``.

    ``embedder``: the embedder object for the in-process runs; ``embedder_spec``
    (``module:callable``) makes the same one in the child (default: the knowledge base's own)."""
    baseline, docs_dir, work = Path(baseline), Path(docs_dir), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    config = KnowledgeBase.open(baseline, embedder)
    cfg = config.config
    config.close()
    fresh_dir = work / "fresh"
    shutil.rmtree(fresh_dir, ignore_errors=True)
    fresh = KnowledgeBase.create(fresh_dir, cfg, embedder)
    RecordManager(fresh).index(docs_dir)
    env = dict(os.environ)
    src_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([src_root, *map(str, pythonpath),
                                         env.get("PYTHONPATH", "")])
    rows = []
    try:
        for point in points:
            kb_dir = work / f"kb-{point.replace(':', '-')}"
            shutil.rmtree(kb_dir, ignore_errors=True)
            shutil.rmtree(_gens_dir(kb_dir), ignore_errors=True)
            shutil.copytree(baseline, kb_dir)
            mode = "full" if point.startswith("rebuild") else "incremental"
            cmd = [sys.executable, "-m", "llmtech.rag.records", str(kb_dir), str(docs_dir), mode]
            if embedder_spec:
                cmd.append(embedder_spec)
            t0 = time.perf_counter()
            p = subprocess.run(cmd, env={**env, FAULT_ENV: point}, capture_output=True, text=True,
                               timeout=timeout)
            killed = p.returncode == -signal.SIGKILL
            if not killed:
                log.warning("drill %s: child exited %s: %s", point, p.returncode, p.stderr[-800:])
            serving = KnowledgeBase.open(kb_dir, embedder)   # what readers see right after the kill
            old_ok = serving.consistent() if point.startswith("rebuild") else None
            serving.close()
            # rerun the same update
            if mode == "full":
                rebuild(kb_dir, docs_dir, embedder=embedder)
            else:
                kb = KnowledgeBase.open(kb_dir, embedder)
                RecordManager(kb).index(docs_dir)
                kb.close()
            kb = KnowledgeBase.open(kb_dir, embedder)
            checks = check_index(kb, fresh, queries, k)
            audit = audit_verify(kb_dir)
            kb.close()
            rows.append({"point": point, "mode": mode, "killed": killed,
                         "old_index_served": old_ok, **checks,
                         "audit_ok": audit["ok"], "open_runs": len(audit["open_runs"]),
                         "seconds": round(time.perf_counter() - t0, 2)})
            rows[-1]["passed"] = bool(killed and checks["passed"] and audit["ok"]
                                      and not audit["open_runs"] and old_ok is not False)
    finally:
        fresh.close()
    return rows


def _child(argv: list[str]) -> int:
    """``python -m llmtech.rag.records KB DOCS MODE [module:callable]`` (the drill's child)."""
    kb_dir, docs_dir, mode = argv[:3]
    embedder = None
    if len(argv) > 3:
        import importlib

        mod, _, attr = argv[3].partition(":")
        embedder = getattr(importlib.import_module(mod), attr)()
    if mode == "full":
        rebuild(kb_dir, docs_dir, embedder=embedder)
    else:
        kb = KnowledgeBase.open(kb_dir, embedder)
        RecordManager(kb).index(docs_dir, mode=mode)
        kb.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(_child(sys.argv[1:]))
