"""Database access: one engine per process.

Engines are created lazily and forgotten in a forked child (`worker_process_init`), so
no connection is ever shared across a fork. SQLite runs in WAL mode and opens every
write transaction with BEGIN IMMEDIATE: concurrent claims queue on the write lock
instead of failing with "database is locked" halfway through.
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import InvalidatePoolError
from sqlalchemy.sql import Executable

#: seconds a pooled PostgreSQL connection may sit unused before it is pinged on checkout
PING_AFTER_IDLE = 5.0

#: a prebuilt DML statement and its parameters (`UnitOfWork.write` executes several at once)
Write = tuple[Executable, dict[str, Any]]

_engines: dict[str, Engine] = {}
_lock = threading.Lock()
_pid = os.getpid()


def _after_fork_in_child() -> None:
    """A fresh lock in a forked child: a thread of the parent (the outbox relay, the owner
    heartbeat) may have held it at the fork, and a held copy would block the child forever."""
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def engine_for(url: str) -> Engine:
    """The engine of this process for `url` (created on first use)."""
    global _pid
    with _lock:
        if os.getpid() != _pid:  # forked: never reuse the parent's pool
            for inherited in _engines.values():
                inherited.dispose(close=False)
            _engines.clear()
            _pid = os.getpid()
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = _create(url)
        return engine


def _create(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60})
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    engine = create_engine(url, pool_size=5, max_overflow=5)
    event.listen(engine, "checkin", _mark_idle)
    event.listen(engine, "checkout", _ping_if_idle(engine.dialect))
    return engine


def _mark_idle(_dbapi_connection, record) -> None:
    record.info["idle_since"] = time.monotonic()


def _ping_if_idle(dialect):
    """A checkout hook: ping a connection idle over PING_AFTER_IDLE s; a dead one is replaced.

    SQLAlchemy's pool_pre_ping pings on every checkout: one more round trip per message,
    against connections that were in use a millisecond ago. A connection cut while in
    use still fails its transaction, which the retry policies retry (transient_errors).
    """
    def checkout(dbapi_connection, record, _proxy) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE:
            return
        try:
            dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as exc:  # replace it, and every connection pooled before it
            raise InvalidatePoolError(f"idle connection failed its ping: {exc}") from exc
    return checkout


@contextmanager
def single_statements(engine: Engine) -> Iterator[Connection]:
    """A connection for statements each complete on its own (a read, one UPDATE), committed at the end.

    On PostgreSQL they run in autocommit: no BEGIN and no COMMIT or ROLLBACK, two round
    trips less per use. SQLite keeps its transaction (BEGIN IMMEDIATE, see _sqlite_begin).
    """
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            yield conn
    else:
        with engine.begin() as conn:
            yield conn


def configure_result_engine(engine: Engine) -> None:
    """Celery's database result backend (`database_engine_callback`): on SQLite, the bus's connection settings.

    Without them each stored result (STARTED, then SUCCESS) is committed with
    synchronous=FULL, an fsync (about 1.3 ms on the bench machine) while holding the
    write lock that every command's transaction waits for (docs/benchmarks.md).
    """
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)


def _sqlite_connect(dbapi_connection, _record) -> None:
    dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_begin(connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def forget_engines() -> None:
    """Drop this process's engines without closing the parent's connections."""
    with _lock:
        for engine in _engines.values():
            engine.dispose(close=False)
        _engines.clear()


def dispose(url: str) -> None:
    """Close and forget this process's engine of `url` (e.g. a test database being deleted)."""
    with _lock:
        engine = _engines.pop(url, None)
    if engine is not None:
        engine.dispose()
