"""The transactional outbox: what a handler publishes is committed with its state.

`OutboxSink` is the `events` and `commands` dependency of handlers: it writes rows in
the handler's transaction (nothing is published if it rolls back), with ids that are
deterministic for the execution, so a re-run writes the same ids. After commit the
worker publishes the rows at once (`publish`); `relay` publishes whatever a crash left
behind, in batches, oldest first. Ordering: rows of one execution are published in the
order they were raised; across executions and across the relay there is no order
promise.

Publishers that overlap (a worker's publish after its commit, the workers' relay thread,
beat's relay task, `bus relay`) claim the rows they publish, so each row goes out once.
A claim is one statement, `UPDATE .. SET published_at .. WHERE id IN (SELECT .. FOR
UPDATE SKIP LOCKED) RETURNING ..`, in a transaction held open across the publish and
committed after it. A failed publish rolls the mark back, and so does a crash (the
database ends a dead connection's transaction): the row stays for the relay, nothing is
lost. Committing the claim before publishing would free the lock sooner, but a crash
between that commit and the publish would lose the row. On PostgreSQL another publisher
skips the locked rows and, once the claim commits, no longer sees them; a publish after
commit costs BEGIN, the claim and COMMIT (it was a read and a mark, each autocommitted).
On SQLite the claim holds the write lock (BEGIN IMMEDIATE, project/db.py), so
publishers take turns, and every other writer waits for the claim's publish: the relay
publishes small batches there, with pauses (SQLITE_BATCH, SQLITE_PAUSE; measured in
docs/failures.md, "The outbox relay"). The one duplicate left: a row may be published
twice (crash between publish and commit); the subscribers' inbox makes that harmless.
"""
from __future__ import annotations

import logging
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta, timezone
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

from sqlalchemy import Select, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from project.commands import body_of, check_route
from project.contracts import Command, Event
from project.db import outbox, utcnow
from project.errors import NotACommand, WrongBoundary
from project.headers import CAUSATION_HEADER, CORRELATION_HEADER, EVENT_ID
from project.topology import event_exchange, named_command_queue

if TYPE_CHECKING:
    from project.core import Bus

logger = logging.getLogger(__name__)
EVENT_ID_NAMESPACE = uuid.UUID("0c6b2f5e-93d1-4a57-8a0b-6e3f4f1d2a77")
#: on SQLite every writer waits for the write lock while the relay publishes a batch: the
#: relay's largest batch there, and its pause between batches (docs/failures.md, "The outbox relay")
SQLITE_BATCH = 100
SQLITE_PAUSE = 0.1


@dataclass
class OutboxSink:
    """`events.publish(...)` / `commands.send(...)` inside one handler execution."""

    session: Session
    boundary: str
    origin: str  # stable for the execution: "<task>:<idempotency key>" or "<subscriber>:<event id>"
    correlation_id: str | None = None
    causation_id: str | None = None
    written: list[str] = field(default_factory=list)

    def _next_id(self) -> str:
        return str(uuid.uuid5(EVENT_ID_NAMESPACE, f"{self.origin}:{len(self.written)}"))

    def publish(self, event: Event) -> None:
        """Record `event` for publication after commit; only its owner may publish it."""
        if not isinstance(event, Event):
            raise TypeError(f"events.publish() takes an Event contract instance, got {type(event).__name__}"
                            + ("; send commands with commands.send(...)" if isinstance(event, Command) else ""))
        if event.boundary != self.boundary:
            raise WrongBoundary(
                f"{type(event).__name__} is owned by boundary {event.boundary!r}; a handler of {self.boundary!r} "
                f"cannot publish it. Publish an event of {self.boundary!r}, or send a command to "
                f"{event.boundary!r} and let its handler publish {type(event).__name__}."
            )
        event_id = self._next_id()
        self._write(event_id, "event", event.exchange_name(), {**event.payload(), EVENT_ID: event_id})

    def send(self, command: Command, *, idempotency_key: str | None = None) -> None:
        """Record `command` for sending after commit (choreography)."""
        if not isinstance(command, Command):
            raise NotACommand(f"commands.send() takes a Command contract instance, got {type(command).__name__}")
        message_id = self._next_id()
        body, task_id = body_of(command, idempotency_key or message_id)
        self._write(task_id, "command", command.task_name(), body)

    def _write(self, row_id: str, kind: str, name: str, payload: dict[str, Any]) -> None:
        self.session.execute(outbox.insert().values(
            id=row_id, kind=kind, name=name, payload=payload, created_at=utcnow(),
            correlation_id=self.correlation_id, causation_id=self.causation_id))
        self.written.append(row_id)


class Publisher(Protocol):
    """Takes the ids of outbox rows an execution committed."""

    def publish(self, ids: list[str]) -> None: ...


class BrokerPublisher:
    """Publishes committed rows to the broker at once; on failure the relay will."""

    def __init__(self, bus: "Bus") -> None:
        self.bus = bus

    def publish(self, ids: list[str]) -> None:
        if not ids:
            return
        try:
            publish(self.bus, ids)
        except Exception:  # the rows are committed and unclaimed again: the workers' relay publishes them
            logger.warning("publishing %d outbox row(s) failed; the relay will retry", len(ids), exc_info=True)


def publish(bus: "Bus", ids: list[str]) -> int:
    """Publish the outbox rows `ids` now (after their commit) unless another publisher has; the number published."""
    if not ids:
        return 0
    position = {row_id: n for n, row_id in enumerate(ids)}
    return _claim_and_publish(bus, _claimable().where(outbox.c.id.in_(ids)), lambda row: position[row.id])


def relay(bus: "Bus", batch: int = 500, grace: timedelta = timedelta(0)) -> int:
    """Publish every unpublished row older than `grace`, `batch` at a time; the number published."""
    sqlite = bus.engine().dialect.name == "sqlite"
    if sqlite:
        batch = min(batch, SQLITE_BATCH)
    total = 0
    while True:
        oldest = (_claimable().where(outbox.c.created_at <= utcnow() - grace)
                  .order_by(outbox.c.created_at).limit(batch))
        count = _claim_and_publish(bus, oldest, lambda row: row.created_at)
        total += count
        if count < batch:  # the rest, if any, is claimed by another publisher
            return total
        if sqlite:
            # A writer waiting for SQLite's lock polls it, at most every 100 ms; without a
            # gap that long the next batch takes the lock back before a waiting worker
            # notices, and workers wait for the whole relay (measured: seconds).
            time.sleep(SQLITE_PAUSE)


def waiting(engine: Engine, older_than: timedelta) -> tuple[int, timedelta]:
    """(unpublished rows committed over `older_than` ago, how long the oldest of them has waited)."""
    now = utcnow()
    with engine.connect() as conn:
        count, oldest = conn.execute(select(func.count(), func.min(outbox.c.created_at))
                                     .where(outbox.c.published_at.is_(None),
                                            outbox.c.created_at <= now - older_than)).one()
    if not count:
        return 0, timedelta(0)
    return count, now - (oldest if oldest.tzinfo else oldest.replace(tzinfo=timezone.utc))


def _claimable() -> Select:
    """Unpublished rows nobody is publishing (SKIP LOCKED: PostgreSQL; SQLite has one writer)."""
    return select(outbox.c.id).where(outbox.c.published_at.is_(None)).with_for_update(skip_locked=True)


def _claim_and_publish(bus: "Bus", claimable: Select, order: Callable[[Any], Any]) -> int:
    """Claim the rows of `claimable`, publish them in `order`, commit the claim; the number published."""
    claim = (update(outbox).where(outbox.c.id.in_(claimable)).values(published_at=utcnow())
             .returning(*outbox.c))
    with bus.engine().begin() as conn:
        rows = sorted(conn.execute(claim).all(), key=order)
        if rows:
            _publish_rows(bus, rows)
    if rows:
        logger.debug("published %d outbox row(s)", len(rows))
    return len(rows)


class _NoSentEvent:
    """Drops Celery's `task-sent` event of an event's publish: an event is not a task.

    No worker runs a task of the event's id (subscribers run copies with ids of their
    own), so Flower would list the event as a PENDING task forever.
    """

    def publish(self, *args: Any, **kwargs: Any) -> None:
        pass


def kwargs_repr(payload: dict[str, Any], limit: int = 1024) -> str:
    """What Flower shows as an event's kwargs: Celery's saferepr, without its cost per row.

    A payload is JSON (str, numbers, lists, dicts), whose repr saferepr would give as is;
    saferepr walks it in Python, which was a tenth of the relay's time. Cut at `limit`
    characters, as saferepr is.
    """
    text = repr(payload)
    return text if len(text) <= limit else text[:limit - 3] + "..."


@contextmanager
def _batched_events(channel: Any) -> Iterator[Callable[[], None]]:
    """On the bus's Redis transport, the batch's events in one pipelined round trip
    (project/redis_transport.py); elsewhere (RabbitMQ) one publish each, as before."""
    if hasattr(channel, "fanout_batch"):
        with channel.fanout_batch():
            yield channel.flush_fanout
    else:
        yield lambda: None


def _publish_rows(bus: "Bus", rows: list[Any]) -> None:
    app = bus.app
    # Exchange and queues of each event are built and declared with its first row of the
    # batch only: per row, that cost the relay about a fifth of its time (docs/benchmarks.md).
    exchanges: dict[str, Any] = {}
    with app.producer_or_acquire() as producer, _batched_events(producer.channel) as flush:
        for row in rows:
            headers = {CORRELATION_HEADER: row.correlation_id, CAUSATION_HEADER: row.causation_id}
            if row.kind == "event":
                exchange, declare = exchanges.get(row.name), []
                if exchange is None:
                    exchange = exchanges[row.name] = event_exchange(row.name)
                    declare = [exchange, *bus.topology.subscriber_queues(row.name)]
                app.send_task(row.name, kwargs=row.payload, task_id=row.id, producer=producer,
                              exchange=exchange, routing_key=row.name, ignore_result=True, headers=headers,
                              declare=declare, event_dispatcher=_NoSentEvent(),
                              argsrepr="()", kwargsrepr=kwargs_repr(row.payload))
            else:
                check_route(row.name, {})
                flush()  # the events before it go out first: the rows' order is kept
                app.send_task(row.name, kwargs=row.payload, task_id=row.id, producer=producer,
                              queue=named_command_queue(row.name), headers=headers)
