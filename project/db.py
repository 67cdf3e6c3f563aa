"""Database access: one engine per process, and the bus's own tables.

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
from datetime import datetime, timezone
from typing import Any, Iterator

from sqlalchemy import (JSON, Column, DateTime, Integer, LargeBinary, MetaData, String, Table, Text,
                        UniqueConstraint, create_engine, event)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import InvalidatePoolError
from sqlalchemy.sql import Executable

metadata = MetaData()


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


#: one row per (command, idempotency key): the claim, then the outcome
commands = Table(
    "bus_commands", metadata,
    Column("task", String(200), primary_key=True),
    Column("key", String(500), primary_key=True),
    Column("payload_hash", String(64), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("status", String(20), nullable=False),
    Column("result", JSON),
    Column("error_type", String(300)),
    Column("error_message", Text),
    # indexed: Celery's result backend answers AsyncResult(message id) from here (project/results.py)
    Column("message_id", String(64), nullable=False, index=True),
    Column("duplicates", Integer, nullable=False, default=0),
    Column("created_at", DateTime(timezone=True), nullable=False, default=utcnow, index=True),
    Column("finished_at", DateTime(timezone=True)),
)

#: messages that could not be processed, kept byte-exact with the reason
dead_letters = Table(
    "bus_dead_letters", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("message_id", String(64)),
    Column("task", String(200)),
    Column("queue", String(200)),
    Column("boundary", String(100)),
    Column("reason", String(40), nullable=False, index=True),
    Column("error", Text),
    Column("traceback", Text),
    Column("headers", JSON),
    Column("body", LargeBinary),
    Column("content_type", String(100)),
    Column("content_encoding", String(50)),
    Column("attempts", Integer, nullable=False, default=1),
    Column("correlation_id", String(64)),
    Column("first_failed_at", DateTime(timezone=True), nullable=False, default=utcnow),
    Column("last_failed_at", DateTime(timezone=True), nullable=False, default=utcnow),
    # `bus dlq replay` re-sent it (kept for the record; a new failure clears replayed_at)
    Column("replays", Integer, nullable=False, default=0, server_default="0"),
    Column("replayed_at", DateTime(timezone=True)),
    UniqueConstraint("message_id", "task", "reason", name="uq_dead_letter_message"),
)

#: events and commands a handler produced, committed with its state, published after commit
outbox = Table(
    "bus_outbox", metadata,
    Column("id", String(64), primary_key=True),
    Column("kind", String(10), nullable=False),
    Column("name", String(200), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("correlation_id", String(64)),
    # indexed: a redelivery that finds its execution committed publishes that execution's
    # unpublished rows at once (the rows' causation is the message that ran the handler)
    Column("causation_id", String(64), index=True),
    Column("created_at", DateTime(timezone=True), nullable=False, default=utcnow),
    Column("published_at", DateTime(timezone=True), index=True),
    # a publisher's claim: until then no other publisher takes the row (project/outbox.py)
    Column("claimed_until", DateTime(timezone=True)),
)

#: one row per (event, subscriber) that ran: a redelivered event does not run it twice
inbox = Table(
    "bus_inbox", metadata,
    Column("event_id", String(64), primary_key=True),
    Column("subscriber", String(200), primary_key=True),
    Column("duplicates", Integer, nullable=False, default=0),
    Column("processed_at", DateTime(timezone=True), nullable=False, default=utcnow, index=True),
)

#: commands accepted by an intake (HTTP API) before any worker saw them: pending vs unknown
intake = Table(
    "bus_intake", metadata,
    Column("id", String(64), primary_key=True),
    Column("task", String(200), nullable=False),
    Column("key", String(500), nullable=False),
    Column("payload_hash", String(64), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("accepted_at", DateTime(timezone=True), nullable=False, default=utcnow, index=True),
    UniqueConstraint("task", "key", name="uq_intake_task_key"),
)

#: leases only one holder (or holders of one `key`) can have at a time: the owner of a
#: command queue (key = its handler, shared by replicas), the worker that relays the outbox
leases = Table(
    "bus_leases", metadata,
    Column("name", String(200), primary_key=True),
    Column("key", String(300), nullable=False),  # holders with the same key share the lease
    Column("holder", String(300), nullable=False),  # the last holder that took or renewed it
    Column("acquired_at", DateTime(timezone=True), nullable=False),
    Column("renewed_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
)

#: one row per execution of a command or subscriber (message, task): the last attempt's
#: outcome, for `bus trace` (project/trace.py); written with the handler's effects
executions = Table(
    "bus_executions", metadata,
    Column("message_id", String(64), primary_key=True),
    Column("task", String(200), primary_key=True),
    Column("kind", String(12), nullable=False),
    Column("boundary", String(100)),
    Column("correlation_id", String(64), index=True),
    Column("event_id", String(64)),
    Column("state", String(20), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("error", Text),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=False, index=True),
)

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
