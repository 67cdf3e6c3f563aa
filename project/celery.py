"""The Celery app of the bus (Celery's `proj/celery.py` convention): `celery -A project ...` finds it.

Settings come from `celeryconfig.py`; task modules (tasks/) are found through its
`include` list, so this package never imports a business domain.
"""
from __future__ import annotations

from datetime import timedelta

from celery import Celery, signals

from project import conversation, dispatch, dlx, flower_auth, logs, metrics, outbox, redis_transport
from project.durations import parse_duration
from project.core import Bus
from project.db import forget_engines
from project.worker import install

redis_transport.install()  # durable fan-out on redis:// and redis+socket:// (before any connection)
app = Celery("project")
app.config_from_object("celeryconfig")
app.conf.task_routes = ("project.routing.route_by_name",)
bus = Bus(app)
install(app, bus)
dlx.install(app)  # RabbitMQ: keep what the broker dead-letters (project/dlx.py)
signals.before_task_publish.connect(conversation.stamp, weak=False)
logs.install(app)  # BUS_LOG_FORMAT=json: structured worker logs (project/logs.py)
metrics.install(app, bus)  # worker --metrics-port: Prometheus (project/metrics.py)
flower_auth.install()  # `celery -A project flower` requires authentication (project/flower_auth.py)


@signals.celeryd_init.connect
def _dispatch_by_queue(sender=None, instance=None, **_: object) -> None:
    """Subscriber queues run their own task (task modules are imported by now)."""
    if instance is not None and instance.app is app:
        dispatch.install(app, {queue: queue for queue in bus.registry.subscribers})


@app.task(name="bus.relay_outbox", ignore_result=True)
def relay_outbox(grace_seconds: float = 5.0) -> int:
    """Publish outbox rows a crash left behind (scheduled by beat; see celeryconfig)."""
    return outbox.relay(bus, grace=timedelta(seconds=grace_seconds))


@app.task(name="bus.purge_keys", ignore_result=True)
def purge_keys(older_than: str = "") -> int:
    """Forget idempotency keys past their retention (scheduled by beat)."""
    return bus.purge_keys(parse_duration(older_than or app.conf.bus_key_retention))


@signals.worker_process_init.connect
def _fresh_engines_after_fork(**_: object) -> None:
    forget_engines()
