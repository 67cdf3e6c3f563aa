"""The bus's own tables (bus_*): their SQLAlchemy definitions, one MetaData.

The migrations under project/store/migrations create them; the code reads and writes
them through these definitions only.
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(value: datetime) -> datetime:
    """A stored time as an aware UTC datetime (SQLite gives it back naive, in UTC as the bus writes it)."""
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


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
    # indexed: Celery's result backend answers AsyncResult(message id) from here (project/store/results.py)
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
    # a publisher's claim: until then no other publisher takes the row (project/messaging/outbox.py)
    Column("claimed_until", DateTime(timezone=True)),
    # a durable timer: not published before this time (null: at once); project/store/timers.py
    Column("due_at", DateTime(timezone=True)),
    # a cancelled timer is never published (`bus timers cancel`)
    Column("cancelled_at", DateTime(timezone=True)),
)
# The rows publishers still owe, by due time: timers (due_at) and a crash's leftovers (due_at null).
# Partial: published and cancelled rows, which pile up until the retention purge, are not in it,
# so the relay's tick and `bus timers list` read only what is pending.
_owed = outbox.c.published_at.is_(None) & outbox.c.cancelled_at.is_(None)
Index("ix_bus_outbox_due_at", outbox.c.due_at, postgresql_where=_owed, sqlite_where=_owed)

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
#: outcome, for `bus trace` (project/observe/trace.py); written with the handler's effects
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

#: one row per instance of a process manager: its state, under a version that serialises
#: concurrent steps (project/store/process_state.py)
process_instances = Table(
    "bus_process_instances", metadata,
    Column("manager", String(200), primary_key=True),
    Column("instance_id", String(300), primary_key=True),
    Column("state", JSON, nullable=False),
    Column("version", Integer, nullable=False),
    Column("status", String(20), nullable=False),  # running | completed
    Column("timers", JSON, nullable=False),  # the pending timeouts: {name: timer id}
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("completed_at", DateTime(timezone=True)),
)
