"""The composition root: `compose(app)` builds the bus of a configured Celery app and wires it in.

    redis_transport.install()           # before any connection
    app = Celery("project")
    app.config_from_object(...)
    bus = compose(app)

Everything the bus hooks into Celery is here, in one place: the routing of bus tasks,
the worker's start-up (`--boundary`, owner leases), RabbitMQ's dead-letter drain, the
conversation headers, JSON logs, metrics, the outbox relay thread, Flower's
authentication, dispatch by queue, the maintenance tasks (`bus.relay_outbox`,
`bus.purge_keys`, `bus.purge`) and fresh database engines in forked processes. The
modules it wires take only the parts they use (the bus's `wiring`, `providers`, engine,
settings), never the bus. Composing an app twice returns its first bus.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any
from weakref import WeakKeyDictionary

from celery import Celery, signals

from project.core import Bus
from project.dead_letters import dlx
from project.durations import parse_duration
from project.messaging import outbox, relay
from project.observe import flower_auth, logs, metrics
from project.store import retention
from project.store.engine import forget_engines
from project.transport import conversation, dispatch, worker

_composed: WeakKeyDictionary[Celery, Bus] = WeakKeyDictionary()


def compose(app: Celery) -> Bus:
    """The bus of `app` (configured already), with its worker steps, signals and maintenance tasks."""
    if app in _composed:
        return _composed[app]
    app.conf.task_routes = ("project.messaging.routing.route_by_name",)
    bus = _composed[app] = Bus(app)
    worker.install(bus.wiring, bus.providers, lambda: bus.settings)
    dlx.install(app)  # RabbitMQ: keep what the broker dead-letters (project/dead_letters/dlx.py)
    signals.before_task_publish.connect(conversation.stamp, weak=False)
    logs.install(app)  # BUS_LOG_FORMAT=json: structured worker logs (project/observe/logs.py)
    metrics.install(app, bus.engine)  # worker --metrics-port: Prometheus (project/observe/metrics.py)
    # leftovers, no beat (project/messaging/relay.py)
    relay.install(app, bus.engine, lambda grace: outbox.relay(bus.wiring, grace=grace))
    flower_auth.install()  # `celery -A project flower` requires authentication (project/observe/flower_auth.py)
    signals.celeryd_init.connect(_dispatch_by_queue)
    _maintenance_tasks(app, bus)
    signals.worker_process_init.connect(_fresh_engines_after_fork)
    return bus


def _dispatch_by_queue(sender: Any = None, instance: Any = None, **_: object) -> None:
    """Subscriber queues run their own task (task modules are imported by now)."""
    bus = _composed.get(instance.app) if instance is not None else None
    if bus is not None:
        dispatch.install(bus.app, {queue: queue for queue in bus.registry.subscribers})


def _maintenance_tasks(app: Celery, bus: Bus) -> None:
    """The bus's housekeeping as tasks of `app` only (not shared: another app's would run on this bus)."""

    @app.task(name="bus.relay_outbox", ignore_result=True, shared=False)
    def relay_outbox(grace_seconds: float | None = None) -> int:
        """Publish outbox rows a crash left behind (scheduled by beat; workers relay them too, project/messaging/relay.py)."""
        grace = app.conf.bus_relay_grace if grace_seconds is None else grace_seconds
        return outbox.relay(bus.wiring, grace=timedelta(seconds=grace))

    @app.task(name="bus.purge_keys", ignore_result=True, shared=False)
    def purge_keys(older_than: str = "") -> int:
        """Forget idempotency keys past their retention (kept for schedules that name it; beat runs bus.purge)."""
        return bus.purge_keys(parse_duration(older_than or app.conf.bus_key_retention))

    @app.task(name="bus.purge", ignore_result=True, shared=False)
    def purge() -> dict[str, int]:
        """Purge the bus tables past their retention (dead letters excepted), in batches (scheduled by beat; project/store/retention.py)."""
        return retention.purge(bus.engine(), retention.configured(app.conf))


def _fresh_engines_after_fork(**_: object) -> None:
    forget_engines()
