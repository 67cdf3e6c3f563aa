"""The Celery app of the bus (Celery's `proj/celery.py` convention): `celery -A project ...` finds it.

Settings come from `celeryconfig.py`; task modules (tasks/) are found through its
`include` list, so this package never imports a business domain.
"""
from __future__ import annotations

from celery import Celery, signals

from project.core import Bus
from project.db import forget_engines
from project.worker import install

app = Celery("project")
app.config_from_object("celeryconfig")
app.conf.task_routes = ("project.routing.route_by_name",)
bus = Bus(app)
install(app, bus)


@signals.worker_process_init.connect
def _fresh_engines_after_fork(**_: object) -> None:
    forget_engines()
