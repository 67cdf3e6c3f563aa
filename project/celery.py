"""The Celery app of the bus (Celery's `proj/celery.py` convention): `celery -A project ...` finds it.

Settings come from the config module `project.settings.config_module()` chooses
(BUS_CONFIG_MODULE, a `celeryconfig.py` in the working directory, else project.config);
task modules are found through its `include` list (BUS_TASK_MODULES), so this package
never imports a business domain. What the bus wires into the app is project/compose.py's.
"""
from __future__ import annotations

from celery import Celery

from project.compose import compose
from project.settings import config_module
from project.transport import redis_transport

redis_transport.install()  # durable fan-out on redis://, redis+socket:// and sentinel:// (before any connection)
app = Celery("project")
app.config_from_object(config_module())  # BUS_CONFIG_MODULE, ./celeryconfig.py or project.config
bus = compose(app)
