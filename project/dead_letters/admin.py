"""Dead letters after the fact: find them, look at one, replay them, purge them.

Replay re-sends a stored message to the one queue it failed in, through the default
exchange (routing key = queue name): replaying an event to one subscriber does not
reach its siblings. It keeps the message id (the task id) and, for events, the event id
in the body, so the idempotency claim and the inbox still absorb a message that had in
fact been handled. What is re-sent:
- a message the worker's consumer refused (unknown task, undecodable, refused content
  type, too large, rejected by the broker) is re-sent byte for byte: the stored body,
  content type, content encoding and headers (less the broker's own `x-death*` and
  a quorum queue's `x-delivery-count`);
- a message the execution refused or gave up on (invalid, conflict, retries
  exhausted) was stored as its fields; it is re-sent as a task message of its task with
  those fields, a fresh retry budget and its correlation id.
A replayed entry is kept and marked (`replays`, `replayed_at`); if it fails again it is
recorded on the same row, which is then pending again.
"""
from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from sqlalchemy import delete, select, update
from sqlalchemy.engine import Engine

from project.dead_letters.store import REASONS
from project.errors import BusError
from project.headers import CORRELATION_HEADER
from project.store.tables import dead_letters, utcnow
from project.transport.dispatch import own_queue

if TYPE_CHECKING:
    from celery import Celery

    from project.messaging.wiring import Wiring

logger = logging.getLogger(__name__)

#: reasons recorded by the execution from the message's fields (not its raw bytes)
FIELD_REASONS = frozenset({"invalid", "conflict", "retries-exhausted"})
#: headers the broker adds when it dead-letters or (quorum queues) delivers a message; not the original's
BROKER_HEADER_PREFIXES = ("x-death", "x-first-death-", "x-last-death-", "x-delivery-count")


class DeadLetterError(BusError):
    """A dead-letter request that cannot be carried out (unknown id, reason or queue)."""


@dataclass(frozen=True)
class Selection:
    """Which dead letters: every given filter must match."""

    queue: str | None = None
    reason: str | None = None
    older_than: timedelta | None = None
    replayed: bool | None = None  # False: pending only (not replayed since the last failure); True: replayed only

    def where(self) -> list[Any]:
        check_reason(self.reason)
        clauses = []
        if self.queue is not None:
            clauses.append(dead_letters.c.queue == self.queue)
        if self.reason is not None:
            clauses.append(dead_letters.c.reason == self.reason)
        if self.older_than is not None:
            clauses.append(dead_letters.c.last_failed_at < utcnow() - self.older_than)
        if self.replayed is not None:
            clauses.append(dead_letters.c.replayed_at.is_not(None) if self.replayed
                           else dead_letters.c.replayed_at.is_(None))
        return clauses

    @property
    def empty(self) -> bool:
        return self.queue is None and self.reason is None and self.older_than is None and self.replayed is None


def check_reason(reason: str | None) -> None:
    if reason is not None and reason not in REASONS:
        raise DeadLetterError(f"unknown reason {reason!r}; the reasons are: {', '.join(REASONS)}")


def find(engine: Engine, selection: Selection = Selection(), limit: int | None = None) -> list[Any]:
    """Dead letters matching `selection`, oldest first."""
    query = select(dead_letters).where(*selection.where()).order_by(dead_letters.c.id)
    with engine.connect() as conn:
        return list(conn.execute(query.limit(limit) if limit else query))


def get(engine: Engine, ids: Iterable[int]) -> list[Any]:
    """The dead letters `ids`, in that order; raises naming every id that does not exist."""
    wanted = list(dict.fromkeys(ids))
    with engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(select(dead_letters).where(dead_letters.c.id.in_(wanted)))}
    missing = [str(i) for i in wanted if i not in rows]
    if missing:
        raise DeadLetterError(f"no dead letter with id {', '.join(missing)}; `bus dlq list` shows the ids")
    return [rows[i] for i in wanted]


def purge(engine: Engine, selection: Selection) -> int:
    """Delete the dead letters matching `selection`; the number deleted."""
    with engine.begin() as conn:
        return conn.execute(delete(dead_letters).where(*selection.where())).rowcount


def as_dict(row: Any, body: bool = False) -> dict[str, Any]:
    """A JSON-ready view of one dead letter (`body=True` adds the body, as text and base64)."""
    view = {name: getattr(row, name) for name in (
        "id", "message_id", "task", "queue", "boundary", "reason", "error", "attempts", "correlation_id",
        "content_type", "content_encoding", "replays")}
    for name in ("first_failed_at", "last_failed_at", "replayed_at"):
        value = getattr(row, name)
        view[name] = value.isoformat() if value is not None else None
    if body:
        raw = bytes(row.body or b"")
        view.update(headers=row.headers, traceback=row.traceback, body_size=len(raw),
                    body_base64=base64.b64encode(raw).decode("ascii"), body_text=_text(raw))
    return view


def _text(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


# ---- replay ------------------------------------------------------------------------------
def replay(wiring: "Wiring", rows: Sequence[Any], on_sent: Callable[[Any], None] | None = None) -> int:
    """Re-send `rows` each to its own queue; the number sent. Checks every row before sending any."""
    queues = {q.name: q for q in wiring.topology.queues()}
    for row in rows:
        if row.queue not in queues:
            raise DeadLetterError(
                f"dead letter {row.id} failed in queue {row.queue!r}, which is not a queue of this bus "
                f"(check BUS_TASK_MODULES lists the tasks module that binds it); nothing was replayed")
        if row.reason in FIELD_REASONS and row.task not in wiring.app.tasks:
            raise DeadLetterError(f"dead letter {row.id} is a message of task {row.task!r}, which no loaded "
                                  f"tasks module binds; nothing was replayed")
    wiring.ensure_broker()
    engine = wiring.engine()
    with wiring.app.producer_or_acquire() as producer:
        for row in rows:
            # marked first: a replay that fails at once re-records the row, which must then stay pending
            _mark(engine, row.id, replayed=True)
            try:
                _send(wiring.app, producer, row, queues[row.queue])
            except BaseException:
                _mark(engine, row.id, replayed=False)
                raise
            logger.info("replayed dead letter %s (%s) to %s", row.id, row.message_id, row.queue)
            if on_sent is not None:
                on_sent(row)
    return len(rows)


def _mark(engine: Engine, row_id: int, replayed: bool) -> None:
    with engine.begin() as conn:
        values = ({"replays": dead_letters.c.replays + 1, "replayed_at": utcnow()} if replayed
                  else {"replays": dead_letters.c.replays - 1, "replayed_at": None})
        conn.execute(update(dead_letters).where(dead_letters.c.id == row_id).values(**values))


def _send(app: "Celery", producer: Any, row: Any, queue: Any) -> None:
    if row.reason in FIELD_REASONS:
        fields = json.loads(bytes(row.body).decode(row.content_encoding or "utf-8"))
        app.send_task(row.task, kwargs=fields, task_id=row.message_id, producer=producer,
                          headers={CORRELATION_HEADER: row.correlation_id}, **own_queue(row.queue))
        return
    headers = {k: v for k, v in (row.headers or {}).items() if not k.startswith(BROKER_HEADER_PREFIXES)}
    producer.publish(bytes(row.body or b""), exchange="", routing_key=row.queue, declare=[queue],
                     headers=headers, content_type=row.content_type or "application/octet-stream",
                     content_encoding=row.content_encoding or "binary",
                     correlation_id=row.message_id, delivery_mode=2, retry=True)
