"""The Celery app of the bus (Celery's `proj/celery.py` convention): `celery -A project ...` finds it.

Settings come from `celeryconfig.py`; task modules (tasks/) are found through its
`include` list, so this package never imports a business domain.
"""
from __future__ import annotations

from datetime import timedelta

from celery import Celery, signals

from project.core import Bus
from project.dead_letters import dlx
from project.durations import parse_duration
from project.messaging import outbox, relay
from project.observe import flower_auth, logs, metrics
from project.store import retention
from project.store.engine import forget_engines
from project.transport import conversation, dispatch, redis_transport
from project.transport.worker import install

redis_transport.install()  # durable fan-out on redis://, redis+socket:// and sentinel:// (before any connection)
app = Celery("project")
app.config_from_object("celeryconfig")
app.conf.task_routes = ("project.messaging.routing.route_by_name",)
bus = Bus(app)
install(app, bus)
dlx.install(app)  # RabbitMQ: keep what the broker dead-letters (project/dead_letters/dlx.py)
signals.before_task_publish.connect(conversation.stamp, weak=False)
logs.install(app)  # BUS_LOG_FORMAT=json: structured worker logs (project/observe/logs.py)
metrics.install(app, bus)  # worker --metrics-port: Prometheus (project/observe/metrics.py)
relay.install(app, bus.engine, lambda grace: outbox.relay(bus, grace=grace))  # leftovers, no beat (project/messaging/relay.py)
flower_auth.install()  # `celery -A project flower` requires authentication (project/observe/flower_auth.py)


@signals.celeryd_init.connect
def _dispatch_by_queue(sender=None, instance=None, **_: object) -> None:
    """Subscriber queues run their own task (task modules are imported by now)."""
    if instance is not None and instance.app is app:
        dispatch.install(app, {queue: queue for queue in bus.registry.subscribers})


@app.task(name="bus.relay_outbox", ignore_result=True)
def relay_outbox(grace_seconds: float | None = None) -> int:
    """Publish outbox rows a crash left behind (scheduled by beat; workers relay them too, project/messaging/relay.py)."""
    grace = app.conf.bus_relay_grace if grace_seconds is None else grace_seconds
    return outbox.relay(bus, grace=timedelta(seconds=grace))


@app.task(name="bus.purge_keys", ignore_result=True)
def purge_keys(older_than: str = "") -> int:
    """Forget idempotency keys past their retention (kept for schedules that name it; beat runs bus.purge)."""
    return bus.purge_keys(parse_duration(older_than or app.conf.bus_key_retention))


@app.task(name="bus.purge", ignore_result=True)
def purge() -> dict[str, int]:
    """Purge the bus tables past their retention (dead letters excepted), in batches (scheduled by beat; project/store/retention.py)."""
    return retention.purge(bus.engine(), retention.configured(app.conf))


@signals.worker_process_init.connect
def _fresh_engines_after_fork(**_: object) -> None:
    forget_engines()
