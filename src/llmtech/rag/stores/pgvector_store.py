"""PostgreSQL + pgvector: vectors in an ordinary SQL table, next to the rest of your data.

One row per chunk: ``(id text primary key, embedding vector(dim), metadata jsonb)``. Search
orders by ``embedding <#> query`` — pgvector's *negative* inner product, so ascending order is
best-first and ``score = -distance``. With ``index="hnsw"`` an HNSW index (``vector_ip_ops``)
makes that ORDER BY approximate and fast; ``index="none"`` scans the table exactly.

Give any ``postgresql://`` URL (the server needs the ``vector`` extension installed). Without a
URL a local server is started with pgserver (PostgreSQL 16 + pgvector in a Python wheel) in the
user cache folder; ``local_postgres(folder)`` does the same for a folder of your choice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from ...errors import ConfigError
from .base import Hit, VectorStore


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (safe to show in errors and logs)."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))
    return url


@contextlib.contextmanager
def _start_lock():
    import fcntl

    from ...models import cache_dir

    path = cache_dir() / "pgserver-start.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def local_postgres(data_dir: str | os.PathLike, cleanup_mode: str | None = "stop"):
    """Start (or reuse) a local PostgreSQL + pgvector server whose data lives in ``data_dir``.

    Returns ``(server, url)``. The server stops when this process exits (``cleanup_mode="stop"``),
    also deletes ``data_dir`` (``"delete"``), or keeps running (``None``); ``server.cleanup()``
    stops it now. Run as root, pgserver runs Postgres as a system user ``pgserver``.
    """
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        import pgserver

        logging.getLogger("pgserver").setLevel(logging.WARNING)  # it logs every command at INFO
        data_dir = Path(data_dir).expanduser().resolve()
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            # one start at a time per machine: the first start creates pgserver's files (and,
            # as root, its system user); two processes doing that at once trip over each other
            with _start_lock():
                server = pgserver.get_server(data_dir, cleanup_mode=cleanup_mode)
        except Exception as e:  # noqa: BLE001 - initdb/pg_ctl failures: show the cause briefly
            raise ConfigError(f"cannot start a local PostgreSQL server in {data_dir}: "
                              f"{type(e).__name__}: {e}") from None
    return server, server.get_uri()


def _default_url() -> str:
    from ...models import cache_dir

    _, url = local_postgres(cache_dir() / "pgdata")
    return url


class PgvectorStore(VectorStore):
    kind = "pgvector"

    def __init__(self, dim: int, url: str | None = None, table: str = "llmtech_chunks",
                 index: str = "hnsw", hnsw_m: int = 16, ef_construction: int = 64,
                 ef_search: int = 64, connect_timeout: float = 5.0, drop_existing: bool = False):
        super().__init__(dim)
        if index not in ("hnsw", "none"):
            raise ConfigError(f"pgvector index '{index}' is unknown; choose 'hnsw' or 'none'")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", table):
            raise ConfigError(f"pgvector table name '{table}' is not a plain SQL identifier")
        self.url = url or _default_url()
        self.table, self.index, self.ef_search = table, index, ef_search
        self._conn = self._connect(self.url, connect_timeout)
        if drop_existing:  # start from an empty table (benchmarks, rebuilds)
            self.drop()
        self._setup(hnsw_m, ef_construction)

    @staticmethod
    def _connect(url: str, timeout: float):
        import psycopg
        from pgvector.psycopg import register_vector

        try:
            conn = psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(timeout)))
        except psycopg.Error as e:
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise ConfigError(f"cannot connect to PostgreSQL at {mask_url(url)}: {reason}") from None
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except psycopg.Error as e:
            conn.close()
            raise ConfigError(f"PostgreSQL at {mask_url(url)} cannot enable pgvector "
                              f"(CREATE EXTENSION vector): {e}".strip()) from None
        register_vector(conn)  # numpy arrays <-> the vector type
        return conn

    @staticmethod
    def _table_dim(conn, table: str) -> int | None:
        """Dimension of the table's embedding column (None when the table does not exist);
        for a ``vector(n)`` column PostgreSQL stores n as the column's type modifier."""
        row = conn.execute("SELECT atttypmod FROM pg_attribute WHERE attrelid = to_regclass(%s) "
                           "AND attname = 'embedding'", (table,)).fetchone()
        return None if row is None else int(row[0])

    def _setup(self, hnsw_m: int, ef_construction: int) -> None:
        stored = self._table_dim(self._conn, self.table)
        if stored is not None and stored != self.dim:
            raise ConfigError(f"PostgreSQL table '{self.table}' at {mask_url(self.url)} holds "
                              f"{stored}-dimensional vectors, not {self.dim}")
        t = self.table  # checked above to be a plain identifier, so it is safe in SQL text
        self._conn.execute(f"CREATE TABLE IF NOT EXISTS {t} (id text PRIMARY KEY, "
                           f"embedding vector({self.dim}) NOT NULL, metadata jsonb)")
        if self.index == "hnsw":
            self._conn.execute(
                f"CREATE INDEX IF NOT EXISTS {t}_embedding_hnsw ON {t} USING hnsw "
                f"(embedding vector_ip_ops) WITH (m = {int(hnsw_m)}, "
                f"ef_construction = {int(ef_construction)})")
        self._set_ef(self.ef_search)

    def _set_ef(self, ef: int) -> None:
        # HNSW returns at most ef_search rows, so it must be >= k
        self._conn.execute(f"SET hnsw.ef_search = {int(ef)}")
        self._ef_now = ef

    @classmethod
    def load(cls, url: str | None = None, table: str = "llmtech_chunks", **options) -> "PgvectorStore":
        """Reopen an existing table, reading its dimension from the table."""
        url = url or _default_url()
        with cls._connect(url, options.get("connect_timeout", 5.0)) as conn:
            dim = cls._table_dim(conn, table)
        if dim is None:
            raise ConfigError(f"PostgreSQL at {mask_url(url)} has no table '{table}'")
        return cls(dim, url=url, table=table, **options)

    # ------------------------------------------------------------------ writes
    @staticmethod
    def _json(meta: dict[str, Any] | None):
        from psycopg.types.json import Jsonb

        return Jsonb(meta) if meta else None

    def add(self, ids: Sequence[str], vectors: np.ndarray,
            metadatas: Sequence[dict[str, Any]] | None = None) -> None:
        import psycopg

        v = self._check(ids, vectors)
        metas = metadatas or [None] * len(ids)
        # COPY streams all rows in one command; in one transaction, so a clash adds nothing
        try:
            with self._conn.transaction(), self._conn.cursor() as cur:
                with cur.copy(f"COPY {self.table} (id, embedding, metadata) FROM STDIN "
                              "WITH (FORMAT BINARY)") as copy:
                    copy.set_types(["text", "vector", "jsonb"])
                    for i, vec, meta in zip(ids, v, metas):
                        copy.write_row((i, vec, self._json(meta)))
        except psycopg.errors.UniqueViolation:
            taken = self._existing(ids)
            raise ValueError(f"{len(taken)} id(s) already stored, e.g. {taken[:1]}; "
                             "use upsert") from None

    def upsert(self, ids: Sequence[str], vectors: np.ndarray,
               metadatas: Sequence[dict[str, Any]] | None = None) -> None:
        v = self._check(ids, vectors)
        metas = metadatas or [None] * len(ids)
        with self._conn.transaction(), self._conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {self.table} (id, embedding, metadata) VALUES (%s, %s, %s) "
                "ON CONFLICT (id) DO UPDATE SET embedding = EXCLUDED.embedding, "
                "metadata = EXCLUDED.metadata",
                [(i, vec, self._json(m)) for i, vec, m in zip(ids, v, metas)])

    def delete(self, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        cur = self._conn.execute(f"DELETE FROM {self.table} WHERE id = ANY(%s)", (list(ids),))
        return cur.rowcount

    def _existing(self, ids: Sequence[str]) -> list[str]:
        rows = self._conn.execute(f"SELECT id FROM {self.table} WHERE id = ANY(%s)",
                                  (list(ids),)).fetchall()
        return [r[0] for r in rows]

    # ------------------------------------------------------------------ reads
    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        q = np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)
        if k <= 0:
            return [[] for _ in range(len(q))]
        if self.index == "hnsw" and k > self._ef_now:
            self._set_ef(k)
        sql = (f"SELECT id, embedding <#> %s AS distance FROM {self.table} "
               "ORDER BY distance LIMIT %s")
        out = []
        with self._conn.cursor() as cur:
            for row in q:  # psycopg prepares the statement after a few executions
                cur.execute(sql, (row, k))
                out.append([Hit(i, -float(d)) for i, d in cur.fetchall()])  # score = -distance
        return out

    def ids(self) -> list[str]:
        return [r[0] for r in self._conn.execute(f"SELECT id FROM {self.table}").fetchall()]

    def __len__(self) -> int:
        return int(self._conn.execute(f"SELECT count(*) FROM {self.table}").fetchone()[0])

    def metadata(self, id: str) -> dict[str, Any]:
        row = self._conn.execute(f"SELECT metadata FROM {self.table} WHERE id = %s",
                                 (id,)).fetchone()
        return dict(row[0] or {}) if row else {}

    # ------------------------------------------------------------------ persistence
    def persist(self) -> None:
        """Every statement is committed (autocommit): the server already made it durable."""

    def close(self) -> None:
        self._conn.close()

    def drop(self) -> None:
        """Delete the table (and its index) from the database."""
        self._conn.execute(f"DROP TABLE IF EXISTS {self.table}")

    def storage_bytes(self) -> int:
        """Table + index + TOAST bytes on the server (``pg_total_relation_size``)."""
        return int(self._conn.execute("SELECT pg_total_relation_size(%s)",
                                      (self.table,)).fetchone()[0])
