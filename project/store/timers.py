"""Durable timers in the store: outbox rows with a due time, and which rows publishers may still take.

A timer is a row of bus_outbox whose `due_at` says when it may be published (the relay
publishes it then, project/messaging/outbox.py); its id is the message's id. This
module holds the statements on them that do not publish:

- `owed(now)`: the rows a publisher may claim and a cancel may stop: not published, not
  cancelled, and nobody's claim runs past `now`. Publishers and `cancel` use this one
  condition, so a timer is either cancelled or published, never both;
- `command_row`: the INSERT of a command's outbox row, a timer or not. Its id is the
  command's task id, one per key and payload, so the same command sent twice (by callers,
  by handlers, or both) meets its own row: a pending row stays the one message, due at
  the earlier of the two times; a cancelled one is revived with the new time; a
  published one, or one a publisher is handing over, is left alone (the claim absorbs a
  duplicate);
- `write`: a timer sent from outside a handler (`apply_async(countdown=...)`, `bus.send`),
  in its own short transaction, with `command_row`;
- `cancel`: stop a timer unless it is published or a publisher holds its claim;
- `pending`: the timers still to publish, soonest first (`bus timers list`).
"""
from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Insert, and_, case, null, or_, select, update
from sqlalchemy.engine import Engine

from project.store.engine import single_statements
from project.store.insert import dialect_module
from project.store.tables import outbox, utcnow


class Cancel(enum.Enum):
    """What `cancel` found."""

    CANCELLED = "cancelled"  # it will not run (also when it was cancelled before)
    TOO_LATE = "too late"  # published, or a publisher is handing it to the broker now
    UNKNOWN = "unknown"  # no timer of that id (an outbox row without a due time is no timer)


def owed(now: datetime) -> ColumnElement[bool]:
    """Not published, not cancelled, and nobody's claim on it runs past `now`."""
    return and_(outbox.c.published_at.is_(None), outbox.c.cancelled_at.is_(None),
                or_(outbox.c.claimed_until.is_(None), outbox.c.claimed_until < now))


def command_row(dialect_name: str, row: dict[str, Any]) -> Insert:
    """The INSERT of the command outbox row `row`; the same command's row already there is one message (above)."""
    insert = dialect_module(dialect_name).insert(outbox).values(**row)
    new, old, now = insert.excluded, outbox.c, utcnow()
    earlier = case((old.cancelled_at.is_not(None), new.due_at),
                   (or_(old.due_at.is_(None), new.due_at.is_(None)), null()),
                   (new.due_at < old.due_at, new.due_at), else_=old.due_at)
    return insert.on_conflict_do_update(
        index_elements=[old.id], set_={"due_at": earlier, "cancelled_at": None},
        where=and_(old.published_at.is_(None), or_(old.claimed_until.is_(None), old.claimed_until < now)))


def write(engine: Engine, row_id: str, name: str, payload: dict[str, Any], due_at: datetime,
          correlation_id: str | None, causation_id: str | None) -> None:
    """Commit the command timer `row_id` for the queue `name` (or make the same command's row due no later)."""
    row = {"id": row_id, "kind": "command", "name": name, "payload": payload, "created_at": utcnow(),
           "due_at": due_at, "correlation_id": correlation_id, "causation_id": causation_id}
    with single_statements(engine) as conn:
        conn.execute(command_row(engine.dialect.name, row))


def cancel(engine: Engine, timer_id: str) -> Cancel:
    """Cancel the timer `timer_id` if no publisher has it (published, or claimed now)."""
    now = utcnow()
    with single_statements(engine) as conn:
        stopped = conn.execute(update(outbox).where(outbox.c.id == timer_id, outbox.c.due_at.is_not(None), owed(now))
                               .values(cancelled_at=now).returning(outbox.c.id)).first()
        if stopped is not None:
            return Cancel.CANCELLED
        found = conn.execute(select(outbox.c.due_at, outbox.c.cancelled_at)
                             .where(outbox.c.id == timer_id)).first()
    if found is None or found.due_at is None:
        return Cancel.UNKNOWN
    return Cancel.CANCELLED if found.cancelled_at is not None else Cancel.TOO_LATE


def pending(engine: Engine, limit: int | None = None) -> list[Any]:
    """The timers not yet published nor cancelled, soonest first (at most `limit`)."""
    query = (select(outbox.c.id, outbox.c.kind, outbox.c.name, outbox.c.due_at, outbox.c.correlation_id)
             .where(outbox.c.published_at.is_(None), outbox.c.cancelled_at.is_(None), outbox.c.due_at.is_not(None))
             .order_by(outbox.c.due_at, outbox.c.id).limit(limit))
    with engine.connect() as conn:
        return list(conn.execute(query))
