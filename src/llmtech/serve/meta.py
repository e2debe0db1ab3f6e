"""The service's metadata in one SQLite file: API keys, datasets, documents, chats, sessions.

Every row carries its tenant, and every read takes the tenant: a query for another tenant's
id finds nothing, so the API answers 404 exactly as for an id that never existed. The file is
opened in WAL mode and written in transactions, so killing the server loses nothing that was
acknowledged; documents that were being parsed are queued again at the next start.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (key_hash TEXT PRIMARY KEY, tenant TEXT NOT NULL,
    created REAL);
CREATE TABLE IF NOT EXISTS datasets (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT,
    description TEXT, embedding_model TEXT, chunk_method TEXT, permission TEXT,
    created REAL, updated REAL, UNIQUE (tenant, name));
CREATE TABLE IF NOT EXISTS documents (id TEXT PRIMARY KEY, dataset_id TEXT NOT NULL,
    tenant TEXT NOT NULL, name TEXT, type TEXT, size INTEGER, path TEXT,
    run TEXT, progress REAL, progress_msg TEXT, chunk_count INTEGER, token_count INTEGER,
    created REAL, process_begin_at REAL, process_duration REAL);
CREATE INDEX IF NOT EXISTS documents_dataset ON documents(dataset_id);
CREATE TABLE IF NOT EXISTS chats (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT,
    dataset_ids TEXT, llm TEXT, prompt TEXT, created REAL, UNIQUE (tenant, name));
CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, chat_id TEXT NOT NULL,
    tenant TEXT NOT NULL, name TEXT, messages TEXT, created REAL, updated REAL);
"""

# parse states, as RAGFlow names them
UNSTART, RUNNING, CANCEL, DONE, FAIL = "UNSTART", "RUNNING", "CANCEL", "DONE", "FAIL"


def new_id() -> str:
    return uuid.uuid4().hex


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class Meta:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self.db = sqlite3.connect(self.path, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self.db.close()

    # -- low level
    def _all(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self.db.execute(sql, args)]

    def _one(self, sql: str, args: tuple = ()) -> dict[str, Any] | None:
        rows = self._all(sql, args)
        return rows[0] if rows else None

    def _run(self, sql: str, args: tuple = ()) -> int:
        with self._lock, self.db:
            return self.db.execute(sql, args).rowcount

    # -- keys
    def add_key(self, tenant: str, key: str | None = None) -> str:
        key = key or "sk-" + secrets.token_urlsafe(24)
        self._run("INSERT OR REPLACE INTO api_keys VALUES (?,?,?)", (key_hash(key), tenant,
                                                                     time.time()))
        return key

    def tenant_of(self, key: str) -> str | None:
        row = self._one("SELECT tenant FROM api_keys WHERE key_hash = ?", (key_hash(key),))
        return row["tenant"] if row else None

    # -- datasets
    def create_dataset(self, tenant: str, name: str, description: str = "",
                       embedding_model: str = "", chunk_method: str = "naive",
                       permission: str = "me") -> dict[str, Any]:
        now = time.time()
        ds_id = new_id()
        self._run("INSERT INTO datasets VALUES (?,?,?,?,?,?,?,?,?)",
                  (ds_id, tenant, name, description, embedding_model, chunk_method, permission,
                   now, now))
        return self.dataset(tenant, ds_id)  # type: ignore[return-value]

    def dataset(self, tenant: str, ds_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM datasets WHERE id = ? AND tenant = ?", (ds_id, tenant))

    def dataset_by_name(self, tenant: str, name: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM datasets WHERE name = ? AND tenant = ?", (name, tenant))

    def datasets(self, tenant: str, desc: bool = True) -> list[dict[str, Any]]:
        order = "DESC" if desc else "ASC"
        return self._all(f"SELECT * FROM datasets WHERE tenant = ? ORDER BY created {order}",
                         (tenant,))

    def update_dataset(self, tenant: str, ds_id: str, **fields: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        self._run(f"UPDATE datasets SET {sets}, updated = ? WHERE id = ? AND tenant = ?",
                  (*fields.values(), time.time(), ds_id, tenant))

    def delete_dataset(self, tenant: str, ds_id: str) -> None:
        with self._lock, self.db:
            self.db.execute("DELETE FROM documents WHERE dataset_id = ? AND tenant = ?",
                            (ds_id, tenant))
            self.db.execute("DELETE FROM datasets WHERE id = ? AND tenant = ?", (ds_id, tenant))

    # -- documents
    def add_document(self, tenant: str, ds_id: str, doc_id: str, name: str, kind: str,
                     size: int, path: str) -> dict[str, Any]:
        self._run("INSERT INTO documents VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                  (doc_id, ds_id, tenant, name, kind, size, path, UNSTART, 0.0, "", 0, 0,
                   time.time(), None, 0.0))
        return self.document(tenant, ds_id, doc_id)  # type: ignore[return-value]

    def document(self, tenant: str, ds_id: str, doc_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM documents WHERE id = ? AND dataset_id = ? AND tenant = ?",
                         (doc_id, ds_id, tenant))

    def document_any(self, doc_id: str) -> dict[str, Any] | None:
        """For the parse worker, which acts for whichever tenant queued the document."""
        return self._one("SELECT * FROM documents WHERE id = ?", (doc_id,))

    def documents(self, tenant: str, ds_id: str, desc: bool = True) -> list[dict[str, Any]]:
        order = "DESC" if desc else "ASC"
        return self._all("SELECT * FROM documents WHERE dataset_id = ? AND tenant = ? "
                         f"ORDER BY created {order}", (ds_id, tenant))

    def documents_in(self, state: str) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM documents WHERE run = ? ORDER BY created", (state,))

    def set_document(self, doc_id: str, **fields: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        self._run(f"UPDATE documents SET {sets} WHERE id = ?", (*fields.values(), doc_id))

    def delete_document(self, doc_id: str) -> None:
        self._run("DELETE FROM documents WHERE id = ?", (doc_id,))

    # -- chats and sessions
    def create_chat(self, tenant: str, name: str, dataset_ids: list[str], llm: dict,
                    prompt: dict) -> dict[str, Any]:
        chat_id = new_id()
        self._run("INSERT INTO chats VALUES (?,?,?,?,?,?,?)",
                  (chat_id, tenant, name, json.dumps(dataset_ids), json.dumps(llm),
                   json.dumps(prompt), time.time()))
        return self.chat(tenant, chat_id)  # type: ignore[return-value]

    @staticmethod
    def _chat_row(row: dict[str, Any] | None) -> dict[str, Any] | None:
        if row is None:
            return None
        for k in ("dataset_ids", "llm", "prompt"):
            row[k] = json.loads(row[k])
        return row

    def chat(self, tenant: str, chat_id: str) -> dict[str, Any] | None:
        return self._chat_row(self._one("SELECT * FROM chats WHERE id = ? AND tenant = ?",
                                        (chat_id, tenant)))

    def chats(self, tenant: str, desc: bool = True) -> list[dict[str, Any]]:
        order = "DESC" if desc else "ASC"
        rows = self._all(f"SELECT * FROM chats WHERE tenant = ? ORDER BY created {order}",
                         (tenant,))
        return [self._chat_row(r) for r in rows]  # type: ignore[misc]

    def update_chat(self, tenant: str, chat_id: str, **fields: Any) -> None:
        fields = {k: json.dumps(v) if k in ("dataset_ids", "llm", "prompt") else v
                  for k, v in fields.items()}
        sets = ", ".join(f"{k} = ?" for k in fields)
        self._run(f"UPDATE chats SET {sets} WHERE id = ? AND tenant = ?",
                  (*fields.values(), chat_id, tenant))

    def delete_chat(self, tenant: str, chat_id: str) -> None:
        with self._lock, self.db:
            self.db.execute("DELETE FROM sessions WHERE chat_id = ? AND tenant = ?",
                            (chat_id, tenant))
            self.db.execute("DELETE FROM chats WHERE id = ? AND tenant = ?", (chat_id, tenant))

    def create_session(self, tenant: str, chat_id: str, name: str,
                       messages: list[dict]) -> dict[str, Any]:
        sid, now = new_id(), time.time()
        self._run("INSERT INTO sessions VALUES (?,?,?,?,?,?,?)",
                  (sid, chat_id, tenant, name, json.dumps(messages, ensure_ascii=False), now, now))
        return self.session(tenant, chat_id, sid)  # type: ignore[return-value]

    def session(self, tenant: str, chat_id: str, sid: str) -> dict[str, Any] | None:
        row = self._one("SELECT * FROM sessions WHERE id = ? AND chat_id = ? AND tenant = ?",
                        (sid, chat_id, tenant))
        if row:
            row["messages"] = json.loads(row["messages"])
        return row

    def sessions(self, tenant: str, chat_id: str, desc: bool = True) -> list[dict[str, Any]]:
        order = "DESC" if desc else "ASC"
        rows = self._all("SELECT * FROM sessions WHERE chat_id = ? AND tenant = ? "
                         f"ORDER BY created {order}", (chat_id, tenant))
        for r in rows:
            r["messages"] = json.loads(r["messages"])
        return rows

    def update_session(self, tenant: str, sid: str, **fields: Any) -> None:
        if "messages" in fields:
            fields["messages"] = json.dumps(fields["messages"], ensure_ascii=False)
        sets = ", ".join(f"{k} = ?" for k in fields)
        self._run(f"UPDATE sessions SET {sets}, updated = ? WHERE id = ? AND tenant = ?",
                  (*fields.values(), time.time(), sid, tenant))

    def delete_session(self, tenant: str, sid: str) -> None:
        self._run("DELETE FROM sessions WHERE id = ? AND tenant = ?", (sid, tenant))
