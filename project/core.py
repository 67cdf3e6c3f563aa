"""The bus facade: bind handlers, provide their dependencies, send commands.

    place_order = bus.command(PlaceOrder)(orders.place_order)   # a real Celery task
    bus.provide("orders", lambda uow: SqlOrderRepository(uow.session))
    bus.send(PlaceOrder(...), idempotency_key="checkout-77")    # from any service
    fulfilment = bus.process_manager("fulfilment", boundary="fulfilment", state=..., correlation="order_id")

Handlers are plain functions; their keyword-only parameters are filled, per
execution, by the providers registered under the same names.
"""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from datetime import timedelta
from functools import cached_property
from typing import Any, Callable, Iterator

from celery import Celery
from celery.result import AsyncResult
from sqlalchemy.engine import Engine

from project.contracts import Command, Event
from project.errors import NotACommand
from project.messaging import outbox, timers
from project.messaging.commands import CommandTask, run_command
from project.messaging.execution import Execution
from project.messaging.outbox import Publisher
from project.messaging.providers import Provider, Providers
from project.messaging.registry import Registry
from project.messaging.retry import Backoff, default_command_policy
from project.messaging.sending import body_of, check_route, shown
from project.messaging.subscribers import SubscriberTask, run_subscriber
from project.messaging.topology import (
    Topology,
    command_queue,
    named_command_queue,
    subscriber_queue,
)
from project.messaging.wiring import Wiring
from project.process.declaration import Correlation, ProcessManager, ProcessManagers
from project.settings import Settings, load
from project.store import retention
from project.store.engine import engine_for
from project.store.tables import utcnow
from project.transport import embedded

logger = logging.getLogger(__name__)


class Bus:
    """Registry, dependency providers and sending, around one Celery app."""

    def __init__(self, app: Celery, command_policy: Backoff | None = None) -> None:
        self.app = app
        self.registry = Registry()
        self.topology = Topology(self.registry)
        self.command_policy = command_policy or default_command_policy()
        self.providers = Providers()
        #: the process managers declared on this bus, by name (project/process/)
        self.process_managers = ProcessManagers()
        #: what publishing, replaying, the survey and the worker use of this bus
        self.wiring = Wiring(app, self.topology, self.engine, self.ensure_broker)
        #: where committed outbox rows go: the broker (the test harness puts its own here)
        self.publisher: Publisher = outbox.BrokerPublisher(self.wiring)
        self.execution = Execution(self.engine, lambda: self.publisher, lambda: self.command_policy, self.providers)
        self._database_url: str | None = None
        self._broker_checked = False
        self._lock = threading.Lock()

    @cached_property
    def settings(self) -> Settings:
        return load()

    def engine(self) -> Engine:
        """This process's engine of the bus database."""
        return engine_for(self._database_url or self.settings.database_url)

    @contextmanager
    def redirected(self, *, database_url: str, publisher: Publisher) -> Iterator["Bus"]:
        """Run this bus against another database and publisher (the in-process test harness)."""
        saved = self._database_url, self.publisher
        self._database_url, self.publisher = database_url, publisher
        try:
            yield self
        finally:
            self._database_url, self.publisher = saved

    # ---- binding -----------------------------------------------------------------
    def command(self, contract: type[Command], *, boundary: str | None = None) -> Callable[[Callable], CommandTask]:
        """Bind the one handler of `contract`; returns the command's Celery task."""
        def bind(handler: Callable[..., Any]) -> CommandTask:
            binding = self.registry.add_command(contract, handler, boundary)
            return self._task(binding, command_queue(binding), CommandTask, run_command)
        return bind

    def subscriber(self, contract: type[Event], *, boundary: str,
                   retry: Backoff | None = None) -> Callable[[Callable], SubscriberTask]:
        """Subscribe a handler of `boundary` to `contract`; returns the subscriber's Celery task.

        Its queue `<boundary>.<handler>` is bound to the event's fanout exchange and gets
        a copy of every event; `retry` is its own policy (default: 5 retries, backoff).
        """
        def bind(handler: Callable[..., Any]) -> SubscriberTask:
            binding = self.registry.add_subscriber(contract, handler, boundary, retry)
            return self._task(binding, subscriber_queue(binding), SubscriberTask, run_subscriber)
        return bind

    def process_manager(self, name: str, *, boundary: str, state: type, correlation: Correlation,
                        retry: Backoff | None = None, on_missing: str = "ignore") -> ProcessManager:
        """Declare the process manager `name` of `boundary`; bind its steps on what it returns.

        Each `.starts(Event, handler)` / `.handles(Event, handler)` is a subscriber
        `<boundary>.<name>.<event>`, `.on_timeout(name, handler)` the command
        `<boundary>.<name>.timeout` (project/process/declaration.py).
        """
        return self.process_managers.add(ProcessManager(
            name, boundary=boundary, state=state, correlation=correlation, retry=retry, on_missing=on_missing,
            subscribe=self.subscriber, command=self.command))

    def _task(self, binding: Any, queue: Any, base: type, body: Callable[..., Any]) -> Any:
        """Register `binding`'s queue (as the topology defines it) and its Celery task."""
        self.app.amqp.queues[binding.name] = queue
        return self.app.task(name=binding.name, base=base, bind=True, shared=False, execution=self.execution,
                             ensure_broker=staticmethod(self.ensure_broker), binding=binding, acks_late=True)(body)

    def provide(self, name: str, factory: Provider) -> None:
        """Provide the handler dependency `name`, built per execution from the unit of work."""
        self.providers.provide(name, factory)

    def provider(self, name: str) -> Provider:
        """The factory of dependency `name` (KeyError if nothing provides it)."""
        return self.providers.provider(name)

    # ---- sending -----------------------------------------------------------------
    def send(self, command: Command, *, idempotency_key: str | None = None, **options: Any) -> AsyncResult:
        """Send a command from anywhere; only its contract needs to be importable here.

        A delay (`countdown`, `eta`) longer than BUS_TIMER_THRESHOLD writes a durable timer
        to the outbox instead (project/messaging/timers.py), under the same task id.
        """
        if not isinstance(command, Command):
            raise NotACommand(_not_a_command_hint(command))
        name = command.task_name()
        check_route(name, options)
        options.pop("queue", None)  # its own queue (check_route refused any other)
        body, task_id = body_of(command, idempotency_key)
        task_id = options.pop("task_id", task_id)
        if timers.defer(self.app.conf, self.engine, name, body, task_id, options):
            return self.app.AsyncResult(task_id, task_name=name)
        self.ensure_broker()
        # the topology's queue (not a bare name): its declaration must match the workers'
        return self.app.send_task(name, kwargs=body, task_id=task_id,
                                  queue=named_command_queue(name), **{**shown(body), **options})

    def purge_keys(self, age: timedelta) -> int:
        """Forget idempotency keys claimed (and executions logged) more than `age` ago; the number of keys."""
        return retention.purge_keys(self.engine(), utcnow() - age)["keys"]

    def ensure_broker(self) -> None:
        """Start the embedded broker on first use in this process (no-op on real brokers)."""
        if self._broker_checked:
            return
        with self._lock:
            if self.settings.embedded:
                embedded.ensure_running(self.settings.home)
            self._broker_checked = True


def _not_a_command_hint(obj: Any) -> str:
    if isinstance(obj, Event):
        return (f"{type(obj).__name__} is an event, not a command: it cannot be sent. Events are "
                f"published by handlers of their owning boundary ({obj.boundary!r}) with events.publish(...)")
    if isinstance(obj, dict):
        return ("bus.send() takes a command contract, not a dict; build it first: "
                "bus.send(PlaceOrder(**data)), or use app.send_task('orders.place_order', kwargs=data)")
    if isinstance(obj, type) and issubclass(obj, Command):
        return f"bus.send() takes a command instance, not the class {obj.__name__}: bus.send({obj.__name__}(...))"
    return f"bus.send() takes a Command contract instance, got {type(obj).__name__}"
