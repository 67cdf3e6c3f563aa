"""Structured logs: `BUS_LOG_FORMAT=json` makes every worker log line one JSON object.

Each line carries, besides time, level, logger and message, the message it is about:
`message_id`, `correlation_id`, `causation_id`, `task`, `boundary` and `attempt`
(1 for the first delivery, 2 after one retry, ...). Inside a task they come from the
task's request; in the worker's main process ("Task ... received") from Celery's own
log arguments, where the conversation is not known yet (null). Fields that do not
apply are null, never missing, so a log pipeline can rely on the keys.

Installed through Celery's `after_setup_logger` / `after_setup_task_logger` signals:
the formatter and the context filter go on the handlers Celery configured (stderr or
`--logfile`), and the pool's children inherit them. `BUS_LOG_FORMAT=text` (the default)
leaves Celery's format alone.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from celery import Celery, signals

from project.headers import CAUSATION_HEADER, CORRELATION_HEADER, header
from project.settings import Settings, current

FIELDS = ("message_id", "correlation_id", "causation_id", "task", "boundary", "attempt")


class MessageFields(logging.Filter):
    """Adds the FIELDS of the message being processed to every record (None where unknown)."""

    def __init__(self, app: Celery) -> None:
        super().__init__()
        self.app = app

    def filter(self, record: logging.LogRecord) -> bool:
        from celery._state import get_current_task
        values = dict.fromkeys(FIELDS)
        task = get_current_task()
        request = getattr(task, "request", None)
        if request is not None and request.id:
            values.update(message_id=request.id, task=task.name, attempt=(request.retries or 0) + 1,
                          correlation_id=header(request, CORRELATION_HEADER) or request.id,
                          causation_id=header(request, CAUSATION_HEADER))
        elif isinstance(record.args, Mapping) and "id" in record.args:  # Celery's "Task %(name)s[%(id)s] ..."
            values.update(message_id=record.args.get("id"), task=record.args.get("name"))
        if values["task"]:
            values["boundary"] = self.boundary(values["task"])
        for name, value in values.items():
            if getattr(record, name, None) is None:
                setattr(record, name, value)
        return True

    def boundary(self, task_name: str) -> str:
        binding = getattr(self.app.tasks.get(task_name), "binding", None)
        return getattr(binding, "boundary", None) or task_name.split(".", 1)[0]


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "process": record.processName,
            "message": record.getMessage(),
            **{name: getattr(record, name, None) for name in FIELDS},
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def install(app: Celery, settings: Settings | None = None) -> None:
    """Use the JSON format on `app`'s worker logs when BUS_LOG_FORMAT=json (this process's settings by default)."""
    if (settings or current()).log_format != "json":
        return

    def structure(logger: logging.Logger | None = None, **_: Any) -> None:
        for handler in (logger.handlers if logger is not None else []):
            handler.setFormatter(JsonFormatter())
            if not any(isinstance(f, MessageFields) for f in handler.filters):
                handler.addFilter(MessageFields(app))

    signals.after_setup_logger.connect(structure, weak=False)
    signals.after_setup_task_logger.connect(structure, weak=False)
