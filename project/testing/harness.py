"""The in-process test kit: the real bus, without a broker, Celery or waiting.

`BusHarness` runs the application's real registry, contract validation, idempotency
claims, outbox and inbox and retry policies (project/messaging/execution.py) against a SQLite
file of its own, with an in-memory queue and a controllable clock: a retry scheduled
30 s ahead runs at once, and the clock says it is 30 s later. It records what was
sent, published, handled, retried and dead-lettered, for assertions:

    def test_placing_an_order_charges_once(bus_harness):
        bus_harness.send(PlaceOrder(...), idempotency_key="k")
        bus_harness.send(PlaceOrder(...), idempotency_key="k")
        bus_harness.run_until_idle()
        assert bus_harness.published(OrderPlaced) == [OrderPlaced(...)]
        assert bus_harness.handled("billing.charge_payment") == 1

Durable timers wait for the clock: a command sent with `send(..., delay=...)`, or written by
a handler with a delay (`commands.send(..., delay=...)`, `events.publish(..., delay=...)`,
`schedule`), runs once `advance()` has moved the clock past its due time, at the next
`run_until_idle()`; one cancelled before (project/store/timers.py `cancel`) does not run.
As on a worker, a timer a real publisher would already have handed to the broker (a
command due within BUS_TIMER_THRESHOLD) can no longer be cancelled.

The `bus_harness` fixture comes with the package's pytest plugin (project/testing/pytest_plugin.py).
"""
from __future__ import annotations

import heapq
import itertools
import uuid
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import timedelta
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from sqlalchemy import select, update

from project.contracts import Command, DomainError, Event
from project.errors import IdempotencyConflict, InvalidMessage, NotACommand
from project.headers import EVENT_ID
from project.messaging import timers
from project.messaging.execution import Delivery, RetryLater
from project.messaging.outbox import publishable
from project.messaging.sending import body_of, check_route
from project.settings import require_task_modules
from project.store.engine import dispose
from project.store.process_state import Instance
from project.store.tables import as_utc, dead_letters, outbox, utcnow
from project.store.timers import owed
from project.testing.records import DeadLetter
from project.transport.dispatch import copy_task_id

if TYPE_CHECKING:
    from project.core import Bus

E = TypeVar("E", bound=Event)
C = TypeVar("C", bound=Command)


class FakeClock:
    """Seconds since the harness started; moves only when told to (or when waiting is due)."""

    def __init__(self) -> None:
        self.now = 0.0

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class Run:
    """One delivery the harness executed, and what came of it."""

    name: str
    message_id: str
    attempt: int
    outcome: str  # ran | duplicate | retried | refused | invalid | dead-lettered
    at: float
    error: BaseException | None = None


@dataclass(order=True)
class _Pending:
    due: float
    seq: int
    delivery: Delivery = field(compare=False)
    fields: dict[str, Any] = field(compare=False)


@dataclass(order=True)
class _Timer:
    """Something that happens once the clock reaches `due`: a durable timer's publish, a delayed send."""

    due: float
    seq: int
    fire: Callable[[], None] = field(compare=False)


class Failing:
    """A dependency whose first `times` method calls raise `error` (then it behaves)."""

    def __init__(self, target: Any, budget: Counter, name: str, error: Callable[[str], BaseException]) -> None:
        self._target, self._budget, self._name, self._error = target, budget, name, error

    def __getattr__(self, method: str) -> Any:
        attr = getattr(self._target, method)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self._budget[self._name] > 0:
                self._budget[self._name] -= 1
                raise self._error(f"{self._name}.{method} failed (injected by the harness)")
            return attr(*args, **kwargs)
        return call


class BusHarness:
    """Drives the bus in process; see the module docstring."""

    def __init__(self, bus: "Bus", database_url: str, clock: FakeClock | None = None) -> None:
        require_task_modules(bus.app.conf)  # an empty registry would refuse every send: name the setting instead
        self.bus, self.database_url = bus, database_url
        self.clock = clock or FakeClock()
        self.runs: list[Run] = []
        self.results: dict[str, Any] = {}
        self._queue: list[_Pending] = []
        self._seq = itertools.count()
        self._sent: list[Command] = []
        self._failures: Counter = Counter()
        self._stack = ExitStack()
        self._timers: list[_Timer] = []
        self._held: set[str] = set()  # outbox timers waiting in _timers

    def __enter__(self) -> "BusHarness":
        self._stack.enter_context(self.bus.redirected(database_url=self.database_url, publisher=self))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        dispose(self.database_url)

    # ---- driving -----------------------------------------------------------------
    def send(self, command: C, *, idempotency_key: str | None = None, delay: timedelta | float | None = None) -> str:
        """Send a command as `bus.send` would (`delay`: as its countdown); returns its message (task) id."""
        if not isinstance(command, Command):
            raise NotACommand(f"the harness sends Command contract instances, got {type(command).__name__}")
        name = command.task_name()
        check_route(name, {})
        body, task_id = body_of(command, idempotency_key)
        if delay is not None:
            return self._send_later(command, body, task_id, timers.seconds_of(delay))
        self._sent.append(command)
        self._enqueue(Delivery(name=name, message_id=task_id), body)
        return task_id

    def run_until_idle(self, max_steps: int = 10_000) -> list[Run]:
        """Execute deliveries (moving the clock to each retry's time) until none is left."""
        done: list[Run] = []
        for _ in range(max_steps):
            if self._fire_next_timer():
                continue
            if not self._queue:
                return done
            pending = heapq.heappop(self._queue)
            self.clock.now = max(self.clock.now, pending.due)
            done.append(self._execute(pending))
        raise RuntimeError(f"still busy after {max_steps} deliveries: a handler keeps producing messages?")

    def fail(self, dependency: str, times: int, error: Callable[[str], BaseException] = ConnectionError) -> None:
        """Make the dependency `dependency` (e.g. "gateway") fail its next `times` calls."""
        original = self.bus.provider(dependency)
        if self._failures[dependency] == 0 and not getattr(original, "_harness_failing", False):
            def failing(uow: Any) -> Failing:
                return Failing(original(uow), self._failures, dependency, error)
            failing._harness_failing = True  # type: ignore[attr-defined]
            self.bus.provide(dependency, failing)
            self._stack.callback(self.bus.provide, dependency, original)
        self._failures[dependency] += times

    def deliver(self, event: Event, *, event_id: str | None = None) -> str:
        """Deliver `event` to this registry's subscribers as if its owner (another service) published it;
        its event id (pass the same `event_id` again for a duplicate delivery)."""
        if not isinstance(event, Event):
            raise TypeError(f"the harness delivers Event contract instances, got {type(event).__name__}"
                            + ("; send commands with harness.send(...)" if isinstance(event, Command) else ""))
        event_id = event_id or str(uuid.uuid4())
        self._route(SimpleNamespace(kind="event", name=event.exchange_name(), id=event_id, correlation_id=None,
                                    payload={**event.payload(), EVENT_ID: event_id}))
        return event_id

    # ---- Publisher (what executions committed to the outbox) ---------------------
    def publish(self, ids: list[str]) -> None:
        if not ids:
            return
        with self.bus.engine().begin() as conn:
            rows = conn.execute(select(outbox).where(outbox.c.id.in_(ids)).order_by(outbox.c.created_at)).all()
            for row in rows:
                if row.due_at is None:
                    self._route(row)
            handed = self._hold_timers(conn, [row for row in rows if row.due_at is not None])
            conn.execute(update(outbox).where(outbox.c.id.in_([row.id for row in rows if row.due_at is None] + handed))
                         .values(published_at=utcnow()))

    def _route(self, row: Any) -> None:
        if row.kind == "command":
            if row.name in self.bus.registry.commands:  # else another service's: its workers take it, not ours
                self._enqueue(Delivery(name=row.name, message_id=row.id, correlation_id=row.correlation_id),
                              row.payload)
            return
        for subscriber in sorted(s.name for s in self.bus.registry.subscribers.values()
                                 if s.contract.exchange_name() == row.name):
            self._enqueue(Delivery(name=subscriber, message_id=copy_task_id(row.id, subscriber),
                                   correlation_id=row.correlation_id, root_id=row.id), row.payload)

    # ---- durable timers (the clock moves only when told to) -----------------------
    def advance(self, by: timedelta | float) -> None:
        """Move the clock `by` (a timedelta or seconds) forward: the timers due by then run at the next
        `run_until_idle()`."""
        self.clock.advance(timers.seconds_of(by))

    def _send_later(self, command: Command, body: dict[str, Any], task_id: str, seconds: float) -> str:
        """A send with a delay, as a sender's: past the threshold a timer in the outbox (cancellable, listed by
        `sent()` from there), else a message Celery would hold until it is due."""
        name = command.task_name()
        if timers.defer(self.bus.app.conf, self.bus.engine, name, body, task_id, {"countdown": seconds}):
            self._hold_row(task_id, seconds)
        else:
            self._sent.append(command)
            delivery = Delivery(name=name, message_id=task_id)
            self._hold(seconds, lambda: self._enqueue(delivery, body))
        return task_id

    def _hold_timers(self, conn: Any, rows: list[Any]) -> list[str]:
        """Hold the timers an execution committed until the clock reaches their due time; the ids of those a
        real publisher hands to the broker at once (commands due within the lookahead: no longer cancellable)."""
        if not rows:
            return []
        now = utcnow()
        ready = set(conn.execute(select(outbox.c.id).where(
            outbox.c.id.in_([row.id for row in rows]), owed(now),
            publishable(now, timers.lookahead(self.bus.app.conf)))).scalars())
        for row in rows:
            seconds = max(0.0, (as_utc(row.due_at) - now).total_seconds())
            if row.id in ready:
                self._hold(seconds, lambda row=row: self._route(row))
            else:
                self._hold_row(row.id, seconds)
        return sorted(ready)

    def _hold(self, seconds: float, fire: Callable[[], None]) -> None:
        heapq.heappush(self._timers, _Timer(self.clock.now + seconds, next(self._seq), fire))

    def _hold_row(self, row_id: str, seconds: float) -> None:
        """The outbox timer `row_id`: once due, published as the relay would, unless cancelled meanwhile."""
        if row_id not in self._held:
            self._held.add(row_id)
            self._hold(seconds, lambda: self._publish_due(row_id))

    def _publish_due(self, row_id: str) -> None:
        now = utcnow()
        with self.bus.engine().begin() as conn:
            row = conn.execute(update(outbox).where(outbox.c.id == row_id, owed(now)).values(published_at=now)
                               .returning(*outbox.c)).first()
        if row is not None:
            self._route(row)

    def _fire_next_timer(self) -> bool:
        """Fire the soonest timer if the clock has reached it, or will to run the next delivery; whether it did."""
        horizon = max(self.clock.now, self._queue[0].due) if self._queue else self.clock.now
        if not self._timers or self._timers[0].due > horizon:
            return False
        timer = heapq.heappop(self._timers)
        self.clock.now = max(self.clock.now, timer.due)
        timer.fire()
        return True

    # ---- assertions --------------------------------------------------------------
    def published(self, event_type: type[E]) -> list[E]:
        """Events of `event_type` committed to the outbox, oldest first."""
        with self.bus.engine().connect() as conn:
            rows = conn.execute(select(outbox.c.payload).where(outbox.c.kind == "event",
                                                               outbox.c.name == event_type.exchange_name())
                                .order_by(outbox.c.created_at)).all()
        return [event_type.model_validate({k: v for k, v in r.payload.items() if k != EVENT_ID}) for r in rows]

    def sent(self, command_type: type[C] | None = None) -> list[Command]:
        """Commands sent through the harness and by handlers (via the outbox), also those another service handles
        (as `command_type`; without it, only the commands of this registry)."""
        with self.bus.engine().connect() as conn:
            rows = conn.execute(select(outbox.c.name, outbox.c.payload).where(outbox.c.kind == "command")
                                .order_by(outbox.c.created_at)).all()
        contracts = {b.name: b.contract for b in self.bus.registry.commands.values()}
        if command_type is not None:
            contracts[command_type.task_name()] = command_type
        by_handlers = [contracts[r.name].model_validate({k: v for k, v in r.payload.items()
                                                         if k != "idempotency_key"})
                       for r in rows if r.name in contracts]
        everything = self._sent + by_handlers
        return [c for c in everything if command_type is None or isinstance(c, command_type)]

    def handled(self, name: str) -> int:
        """How many deliveries of task/queue `name` ran their handler to commit."""
        return sum(1 for r in self.runs if r.name == name and r.outcome == "ran")

    def retries(self, name: str) -> int:
        """How many times `name` was scheduled for a retry."""
        return sum(1 for r in self.runs if r.name == name and r.outcome == "retried")

    def outcomes(self, name: str) -> list[str]:
        return [r.outcome for r in self.runs if r.name == name]

    def dead_letters(self, name: str | None = None) -> list[DeadLetter]:
        """Dead letters (all, or of task/queue `name`), oldest first: `d.reason` or `d["reason"]`."""
        query = select(dead_letters).order_by(dead_letters.c.id)
        if name is not None:
            query = query.where(dead_letters.c.task == name)
        with self.bus.engine().connect() as conn:
            return [DeadLetter.from_row(row) for row in conn.execute(query)]

    def process(self, manager: str, instance_id: str) -> Instance | None:
        """Process manager `manager`'s instance `instance_id` as stored: `.state` (its model), `.status`
        (running, completed), `.version`, `.timers` (pending timeouts by name); None if it never started."""
        declared = self.bus.process_managers[manager]
        with self.bus.engine().connect() as conn:
            return declared.instance(conn, instance_id)

    def result(self, message_id: str) -> Any:
        """What `AsyncResult.get()` would give for `message_id`: the value, or it raises."""
        outcome = self.results[message_id]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    # ---- internals ---------------------------------------------------------------
    def _enqueue(self, delivery: Delivery, fields: dict[str, Any], delay: float = 0.0) -> None:
        heapq.heappush(self._queue, _Pending(self.clock.now + delay, next(self._seq), delivery, dict(fields)))

    def _execute(self, pending: _Pending) -> Run:
        delivery, registry = pending.delivery, self.bus.registry
        command = registry.commands.get(delivery.name)
        try:
            if command is not None:
                executed = self.bus.execution.command(command, pending.fields, delivery)
                self.results[delivery.message_id] = executed.value
            else:
                executed = self.bus.execution.subscriber(registry.subscribers[delivery.name], pending.fields, delivery)
            outcome, error = ("ran" if executed.ran else "duplicate"), None
        except RetryLater as later:
            self._enqueue(Delivery(delivery.name, delivery.message_id, delivery.attempt + 1,
                                   delivery.correlation_id, delivery.root_id), pending.fields, later.delay)
            outcome, error = "retried", later.cause
        except InvalidMessage as exc:
            outcome, error = "invalid", exc
        except (DomainError, IdempotencyConflict) as exc:
            outcome, error = "refused", exc
        except Exception as exc:  # noqa: BLE001 - the execution dead-lettered it
            outcome, error = "dead-lettered", exc
        if error is not None and outcome != "retried" and command is not None:
            self.results[delivery.message_id] = error
        run = Run(delivery.name, delivery.message_id, delivery.attempt, outcome, self.clock.now, error)
        self.runs.append(run)
        return run
