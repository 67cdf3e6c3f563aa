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
A claim is one committed statement, `UPDATE .. SET claimed_until = now + CLAIM_TTL
WHERE <unpublished and unclaimed> .. RETURNING ..` (on PostgreSQL its row selection
skips rows another claim has locked); then the rows are published, then marked
published. No lock is held while the broker takes the messages: on SQLite a claim held
across a publish made every worker's commit wait for it (a confirmed publish to a
quorum queue made a reader wait past its 60 s busy timeout). A failed publish gives the
claim back at once; a crash leaves it to expire, after which the relay publishes the
rows: nothing is lost, a crashed claim delays its rows by up to CLAIM_TTL. A publish
after commit costs the claim and the mark, as the read and the mark did before. The one
duplicate left: a row may be published twice (a crash between its publish and its
mark, or a publish slower than CLAIM_TTL); the subscribers' inbox makes that harmless.

Durable timers (project/messaging/timers.py) are rows with a due time (`delay=` of
`send`/`publish`, `schedule`, or a delayed send from outside a handler). A command timer
is published once it is due within the lookahead (BUS_TIMER_THRESHOLD), with Celery's
eta set to its due time, so a worker holds it at most that long; an event timer when it
is due (its copies go to many queues, and with quorum queues RabbitMQ's delayed delivery
routes an eta by queue name, which an event's fanout has not). The publish after commit
leaves a timer not due yet to the relay. A cancelled timer is never claimed, and a
claimed one is never cancelled (project/store/timers.py `owed`).
"""
from __future__ import annotations

import logging
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

from sqlalchemy import ColumnElement, Select, Update, and_, or_, select, update
from sqlalchemy.orm import Session

from project.contracts import Command, Event
from project.errors import NotACommand, WrongBoundary
from project.headers import CAUSATION_HEADER, CORRELATION_HEADER, EVENT_ID
from project.messaging.sending import body_of, check_route, kwargs_repr
from project.messaging.timers import lookahead, seconds_of
from project.messaging.topology import Topology, event_exchange, named_command_queue
from project.store.engine import single_statements
from project.store.tables import as_utc, outbox, utcnow
from project.store.timers import command_row, owed

if TYPE_CHECKING:
    from celery import Celery

    from project.messaging.wiring import Wiring

logger = logging.getLogger(__name__)
EVENT_ID_NAMESPACE = uuid.UUID("0c6b2f5e-93d1-4a57-8a0b-6e3f4f1d2a77")
#: how long a publisher's claim keeps other publishers off its rows (a batch publishes in about a second)
CLAIM_TTL = timedelta(seconds=30)


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

    def publish(self, event: Event, *, delay: timedelta | float | None = None) -> None:
        """Record `event` for publication after commit (`delay`: that much later); only its owner may publish it."""
        if not isinstance(event, Event):
            raise TypeError(f"events.publish() takes an Event contract instance, got {type(event).__name__}"
                            + ("; send commands with commands.send(...)" if isinstance(event, Command) else ""))
        if event.boundary != self.boundary:
            raise WrongBoundary(
                f"{type(event).__name__} is owned by boundary {event.boundary!r}; a handler of {self.boundary!r} "
                f"cannot publish it. Publish an event of {self.boundary!r}, or send a command to "
                f"{event.boundary!r} and let its handler publish {type(event).__name__}."
            )
        due_at = _after(delay)
        event_id = self._next_id()
        self._write(event_id, "event", event.exchange_name(), {**event.payload(), EVENT_ID: event_id}, due_at)

    def send(self, command: Command, *, idempotency_key: str | None = None,
             delay: timedelta | float | None = None) -> None:
        """Record `command` for sending after commit (choreography; `delay`: that much later, a durable timer)."""
        if not isinstance(command, Command):
            raise NotACommand(f"commands.send() takes a Command contract instance, got {type(command).__name__}")
        due_at = _after(delay)
        message_id = self._next_id()
        body, task_id = body_of(command, idempotency_key or message_id)
        self._write(task_id, "command", command.task_name(), body, due_at)

    def schedule(self, name: str, payload: dict[str, Any], due_at: datetime, *, row_id: str | None = None) -> str:
        """Record a bus-internal command for the command queue `name`, due at `due_at` (aware); its row id
        (`row_id`, or one deterministic for the execution)."""
        if due_at.tzinfo is None:
            raise ValueError(f"schedule({name!r}, ...) takes an aware due_at, got {due_at!r}; "
                             f"use e.g. datetime.now(timezone.utc) + timedelta(minutes=5)")
        row_id = row_id or self._next_id()
        self._write(row_id, "command", name, payload, due_at.astimezone(timezone.utc))
        return row_id

    def _write(self, row_id: str, kind: str, name: str, payload: dict[str, Any],
               due_at: datetime | None = None) -> None:
        row = {"id": row_id, "kind": kind, "name": name, "payload": payload, "created_at": utcnow(),
               "due_at": due_at, "correlation_id": self.correlation_id, "causation_id": self.causation_id}
        if kind == "command":  # its id is its task id: the same command sent before is one message with it
            self.session.execute(command_row(self.session.bind.dialect.name, row))
        else:
            self.session.execute(outbox.insert().values(**row))
        self.written.append(row_id)


def _after(delay: timedelta | float | None) -> datetime | None:
    """The due time of a row written now with `delay` (a timedelta or seconds); None: at once."""
    seconds = 0.0 if delay is None else seconds_of(delay)
    return utcnow() + timedelta(seconds=seconds) if seconds > 0 else None


class Publisher(Protocol):
    """Takes the ids of outbox rows an execution committed."""

    def publish(self, ids: list[str]) -> None: ...


class BrokerPublisher:
    """Publishes committed rows to the broker at once; on failure the relay will."""

    def __init__(self, wiring: "Wiring") -> None:
        self.wiring = wiring

    def publish(self, ids: list[str]) -> None:
        if not ids:
            return
        try:
            publish(self.wiring, ids)
        except Exception:  # the claim was given back (or, if only the mark failed, expires): the relay publishes them
            logger.warning("publishing %d outbox row(s) failed; the relay will retry", len(ids), exc_info=True)


def publish(wiring: "Wiring", ids: list[str]) -> int:
    """Publish the outbox rows `ids` now (after their commit) unless another publisher has, or they are timers not
    due within the lookahead (the relay publishes those); the number published."""
    if not ids:
        return 0
    position = {row_id: n for n, row_id in enumerate(ids)}
    now = utcnow()
    until = now + CLAIM_TTL
    return _claim_and_publish(wiring, post_commit_claim(ids, now, until, lookahead(wiring.app.conf)), until,
                              lambda row: position[row.id])


def relay(wiring: "Wiring", batch: int = 500, grace: timedelta = timedelta(0)) -> int:
    """Publish every unpublished row older than `grace`, oldest first, then every timer due within the lookahead,
    soonest first, `batch` at a time; the number published."""
    ahead = lookahead(wiring.app.conf)
    left = _relay_all(wiring, batch, lambda now: and_(outbox.c.due_at.is_(None), outbox.c.created_at <= now - grace),
                      outbox.c.created_at)
    return left + _relay_all(wiring, batch, lambda now: _due(now, ahead), outbox.c.due_at)


def publishable(now: datetime, ahead: timedelta) -> ColumnElement[bool]:
    """A row a publisher may hand to the broker now, as far as time goes: no due time, or due within `ahead`."""
    return or_(outbox.c.due_at.is_(None), _due(now, ahead))


def _due(now: datetime, ahead: timedelta) -> ColumnElement[bool]:
    """A timer to publish now: a command due within `ahead` (published with eta), an event due already."""
    return and_(outbox.c.due_at <= now + ahead, or_(outbox.c.kind == "command", outbox.c.due_at <= now))


def _relay_all(wiring: "Wiring", batch: int, selection: Callable[[datetime], ColumnElement[bool]], column: Any) -> int:
    """Publish the rows of `selection(now)` in the order of `column`, `batch` at a time; the number published."""
    total = 0
    while True:
        now = utcnow()
        first = _claimable(now).where(selection(now)).order_by(column).limit(batch)
        until = now + CLAIM_TTL
        count = _claim_and_publish(wiring, _claim(first, now, until), until,
                                   lambda row: getattr(row, column.key))
        total += count
        if count < batch:  # the rest, if any, is claimed by another publisher
            return total


def _claimable(now: datetime) -> Select:
    """The ids of rows a publisher may claim (on PostgreSQL rows locked by a claim in progress are skipped)."""
    return select(outbox.c.id).where(owed(now)).with_for_update(skip_locked=True)


def post_commit_claim(ids: list[str], now: datetime, until: datetime, ahead: timedelta) -> Update:
    """The claim of a committed execution's outbox rows `ids`, those a publisher may hand over now."""
    ready = _claimable(now).where(outbox.c.id.in_(ids), publishable(now, ahead))
    return _claim(ready, now, until, among=ids)


def _claim(claimable: Select, now: datetime, until: datetime, among: list[str] | None = None) -> Update:
    """The UPDATE that claims the rows of `claimable` (of the ids `among`, if given) until `until`, returning them."""
    # the outer condition again: PostgreSQL re-checks it on a row a concurrent claim (or cancel) just changed
    claim = update(outbox).where(outbox.c.id.in_(claimable), owed(now))
    if among is not None:
        # the ids on the outer statement too: without them PostgreSQL's generic plan (psycopg prepares a statement
        # run 5 times) scans every owed row (pending timers) and reruns the subquery for each: O(owed ** 2)
        claim = claim.where(outbox.c.id.in_(among))
    return claim.values(claimed_until=until).returning(*outbox.c)


def _claim_and_publish(wiring: "Wiring", claim: Update, until: datetime, order: Callable[[Any], Any]) -> int:
    """Claim rows with the statement `claim` (claims running to `until`), publish them in `order`, mark them
    published; the number published."""
    engine = wiring.engine()
    with single_statements(engine) as conn:
        rows = sorted(conn.execute(claim).all(), key=order)
    if not rows:
        return 0
    ids = [row.id for row in rows]
    try:
        _publish_rows(wiring.app, wiring.topology, rows)
    except BaseException:
        with single_statements(engine) as conn:  # give the claim back: the relay's next tick retries
            conn.execute(update(outbox).where(outbox.c.id.in_(ids), outbox.c.claimed_until == until)
                         .values(claimed_until=None))
        raise
    with single_statements(engine) as conn:
        conn.execute(update(outbox).where(outbox.c.id.in_(ids)).values(published_at=utcnow()))
    logger.debug("published %d outbox row(s)", len(rows))
    return len(rows)


class _NoSentEvent:
    """Drops Celery's `task-sent` event of an event's publish: an event is not a task.

    No worker runs a task of the event's id (subscribers run copies with ids of their
    own), so Flower would list the event as a PENDING task forever.
    """

    def publish(self, *args: Any, **kwargs: Any) -> None:
        pass


@contextmanager
def _batched_events(channel: Any) -> Iterator[Callable[[], None]]:
    """On the bus's Redis transport, the batch's events in one pipelined round trip
    (project/transport/redis_transport.py); elsewhere (RabbitMQ) one publish each, as before."""
    if hasattr(channel, "fanout_batch"):
        with channel.fanout_batch():
            yield channel.flush_fanout
    else:
        yield lambda: None


def _eta(row: Any) -> datetime | None:
    """A command timer published before its due time waits in the broker or worker until then."""
    due_at = row.due_at and as_utc(row.due_at)
    return due_at if due_at and due_at > utcnow() else None


def _publish_rows(app: "Celery", topology: Topology, rows: list[Any]) -> None:
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
                    declare = [exchange, *topology.subscriber_queues(row.name)]
                app.send_task(row.name, kwargs=row.payload, task_id=row.id, producer=producer,
                              exchange=exchange, routing_key=row.name, ignore_result=True, headers=headers,
                              declare=declare, event_dispatcher=_NoSentEvent(),
                              argsrepr="()", kwargsrepr=kwargs_repr(row.payload))
            else:
                check_route(row.name, {})
                flush()  # the events before it go out first: the rows' order is kept
                app.send_task(row.name, kwargs=row.payload, task_id=row.id, producer=producer,
                              queue=named_command_queue(row.name), headers=headers, eta=_eta(row))
