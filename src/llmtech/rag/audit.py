"""An append-only, hash-chained audit log (JSON Lines) and its verifier.

Each line is one entry::

    {"seq": 3, "ts": 1764400000.1, "actor": "alice", "action": "update", "source": "a.md",
     "before_hash": "…", "after_hash": "…", "details": {…}, "prev": "<hash of line 2>",
     "hash": "<sha256 of this entry without 'hash', canonical JSON>"}

``prev`` chains every entry to the one before it (the first one to ``GENESIS``), so editing,
deleting or reordering a line breaks the chain at that line. Cutting lines off the end leaves a
valid chain, so every append also rewrites a small *head* file (``<log>.head``: the last seq and
hash, atomically replaced); ``verify`` reports a log shorter than its head as truncated. The head
is written after the line is fsynced, so a crash in between leaves the log one entry *ahead* of
the head, which is fine; behind it never is unless someone removed lines.

Appends use ``O_APPEND`` and one ``write`` per line, then ``fsync``.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..io import atomic_write_json

GENESIS = "0" * 64
FIELDS = ("seq", "ts", "actor", "action", "source", "before_hash", "after_hash", "details",
          "prev", "hash")


def canonical(entry: dict[str, Any]) -> bytes:
    """The bytes an entry's hash is computed over: sorted keys, no spaces, UTF-8."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_hash(entry: dict[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def default_actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        user = f"uid{os.getuid()}"
    return f"{user}@pid{os.getpid()}"


class AuditLog:
    """Append entries to ``path`` (created on first append)."""

    def __init__(self, path: str | os.PathLike, actor: str | None = None):
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.name + ".head")
        self.actor = actor or default_actor()

    def _tail(self) -> tuple[int, str]:
        """(last seq, last hash) from the end of the file; refuses a torn or broken tail."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return 0, GENESIS
        with open(self.path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 65536))
            tail = f.read()
        if not tail.endswith(b"\n"):
            raise DataError(f"{self.path}: the last line is incomplete (torn write); run verify "
                            "and repair the log before appending")
        last = tail.rstrip(b"\n").rsplit(b"\n", 1)[-1]
        try:
            entry = json.loads(last)
            return int(entry["seq"]), str(entry["hash"])
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{self.path}: the last line is not a valid audit entry; "
                            "run verify before appending") from None

    def append(self, action: str, source: str = "*", before_hash: str | None = None,
               after_hash: str | None = None, details: dict[str, Any] | None = None,
               actor: str | None = None) -> dict[str, Any]:
        """Append one entry, fsync it, then move the head; returns the entry."""
        seq, prev = self._tail()
        entry = {"seq": seq + 1, "ts": round(time.time(), 6), "actor": actor or self.actor,
                 "action": action, "source": source, "before_hash": before_hash,
                 "after_hash": after_hash, "details": details or {}, "prev": prev}
        entry["hash"] = entry_hash(entry)
        line = json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        atomic_write_json(self.head_path, {"seq": entry["seq"], "hash": entry["hash"]}, indent=None)
        return entry

    def entries(self) -> list[dict[str, Any]]:
        return read_entries(self.path)


def read_entries(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every entry of a log that ``verify`` accepts (raises DataError naming the bad line)."""
    result = verify(path)
    if not result["ok"]:
        raise DataError(f"{path}: line {result['bad_line']}: {result['reason']}")
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()]


def verify(path: str | os.PathLike) -> dict[str, Any]:
    """Check the whole chain. Returns ``{"ok", "path", "entries", "bad_line", "reason"}``:
    ``bad_line`` is the 1-based number of the first line that fails (``None`` when ok), and
    ``reason`` says why (edited, deleted or reordered line, torn or truncated tail)."""
    path = Path(path)
    out: dict[str, Any] = {"ok": True, "path": str(path), "entries": 0, "bad_line": None,
                           "reason": None}

    def bad(line_no: int, reason: str) -> dict[str, Any]:
        out.update(ok=False, bad_line=line_no, reason=reason)
        return out

    raw = path.read_bytes() if path.exists() else b""
    head_file = path.with_name(path.name + ".head")
    head = None
    if head_file.exists():
        try:
            head = json.loads(head_file.read_text(encoding="utf-8"))
        except ValueError:
            return bad(0, f"{head_file.name} is not valid JSON")
    lines = raw.split(b"\n")
    if raw and not raw.endswith(b"\n"):
        return bad(len(lines), "incomplete last line (torn write or truncated file)")
    lines = lines[:-1] if raw else []
    prev, by_seq = GENESIS, {}
    for no, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except ValueError:
            return bad(no, "not valid JSON")
        if not isinstance(entry, dict) or set(entry) != set(FIELDS):
            return bad(no, f"fields are not exactly {list(FIELDS)}")
        if entry["seq"] != no:
            why = "a line before it was deleted" if isinstance(entry["seq"], int) and entry["seq"] > no \
                else "lines were reordered or duplicated"
            return bad(no, f"seq {entry['seq']} where {no} was expected ({why})")
        if entry["prev"] != prev:
            return bad(no, "prev does not match the hash of the line before "
                           "(a line was deleted, reordered or re-hashed)")
        if entry_hash(entry) != entry["hash"]:
            return bad(no, "content does not match its hash (the line was edited)")
        prev, by_seq[no] = entry["hash"], entry["hash"]
        out["entries"] = no
    if head is not None:
        hseq, hhash = head.get("seq"), head.get("hash")
        if not isinstance(hseq, int) or hseq > len(lines):
            return bad(len(lines) + 1, f"the log ends at entry {len(lines)} but its head file "
                                       f"records entry {hseq} (lines were cut off the end)")
        if hseq > 0 and by_seq.get(hseq) != hhash:
            return bad(hseq, "does not match the hash in the head file (edited and re-hashed)")
        if len(lines) > hseq + 1:  # a crash leaves the log at most ONE entry ahead of its head
            return bad(hseq + 2, f"the head file records entry {hseq}, but entries after "
                                 f"{hseq + 1} exist (appended without the log's writer)")
    elif len(lines) > 1:  # a crash after the very first append can leave no head yet
        return bad(len(lines) + 1, f"head file {head_file.name} is missing")
    return out
