"""Celery's result backend in front of the bus: a command's result is not stored twice over.

A command's outcome is stored with its idempotency claim (`bus_commands`), in the
handler's transaction; Celery's result backend would store it a second time after the
task returns. `backend_url()` puts one of the classes below in front of Celery's own
backend (celeryconfig.py):

- Database backend (RabbitMQ's default, `db+<BUS_DATABASE_URL>`): a command's SUCCESS
  that its claim row already holds under the same message id is not written again
  (that write was a session, a read, an insert and a commit: 4-5 round trips), and
  `AsyncResult(id)` of a message Celery has no final state for (no row, or STARTED)
  answers from the claim stored under that id. A command only the bus's app can read: a plain Celery client reading
  the same database sees PENDING for those results.
- Redis backend: the copy stays (its PUBLISH wakes a waiting `.get()`, and any Celery
  client can read it); only Celery's read before the write is skipped for a command's
  SUCCESS, which is always the first execution's result (the claim sees to that), so
  overwriting one with another changes nothing.

Everything else (failures, idempotency conflicts, retries, duplicates sent under
another task id, tasks that are not commands) is stored by Celery as before.
"""
from __future__ import annotations

from typing import Any

from celery import states
from celery.backends.database import DatabaseBackend as CeleryDatabaseBackend
from celery.backends.redis import RedisBackend as CeleryRedisBackend

#: set on a command's request by its task (project/messaging/commands.py): True if the claim row
#: holds this SUCCESS under this very message id, False if Celery must keep the copy
STORED_WITH_CLAIM = "bus_result_stored_with_claim"


def backend_url(url: str) -> str:
    """The `result_backend` setting for `url`: a class below in front of Celery's Redis or database backend.

    Celery reads `<class>+<url>` as "this backend class, with this URL". Other kinds of
    backend are returned unchanged (and store every result as usual).
    """
    scheme = url.split("://", 1)[0]
    if scheme in ("redis", "rediss"):
        return f"{__name__}:RedisBackend+{url}"
    if scheme == "redis+socket":  # Celery's own alias turns redis+socket:// into socket://
        return f"{__name__}:RedisBackend+{url[len('redis+'):]}"
    if scheme.startswith("db+"):
        return f"{__name__}:DatabaseBackend+{url[len('db+'):]}"
    return url


def mark(request: Any, stored_under: str | None) -> None:
    """Note on a command's request whether its claim row holds the result under this message id."""
    setattr(request, STORED_WITH_CLAIM, stored_under is not None and stored_under == request.id)


class RedisBackend(CeleryRedisBackend):
    """Celery's Redis backend; a command's SUCCESS is written without reading the key first, and a
    send does not subscribe to its result."""

    def on_task_call(self, producer, task_id):
        """Subscribe to a result when a caller waits for it, not on every send.

        Celery subscribes at each send, and unsubscribes when the AsyncResult is dropped:
        two more commands to Redis, a seventh of a command's `.delay()` (docs/benchmarks.md).
        A waiting `get()` (or `then()`) subscribes first and then reads the stored result,
        so a result stored before the caller waits still reaches it.
        """
        return {}

    def _store_result(self, task_id, result, state, traceback=None, request=None, **kwargs):
        if state != states.SUCCESS or not hasattr(request, STORED_WITH_CLAIM):
            return super()._store_result(task_id, result, state, traceback, request=request, **kwargs)
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = task_id
        self._set_with_state(self.get_key_for_task(task_id), self.encode(meta), state)
        return result


class DatabaseBackend(CeleryDatabaseBackend):
    """Celery's database backend; a command's SUCCESS is read from its claim instead of stored twice."""

    def _store_result(self, task_id, result, state, traceback=None, request=None, **kwargs):
        if state == states.SUCCESS and getattr(request, STORED_WITH_CLAIM, False):
            return result
        return super()._store_result(task_id, result, state, traceback, request=request, **kwargs)

    def _get_task_meta_for(self, task_id):
        meta = super()._get_task_meta_for(task_id)
        if meta["status"] in states.READY_STATES:  # PENDING, STARTED or RETRY: the claim may hold the SUCCESS
            return meta
        from project import (
            bus,  # the app, which configures this backend, is loaded by now
        )
        from project.store import idempotency
        with bus.engine().connect() as conn:
            stored = idempotency.succeeded_under(conn, task_id)
        if stored is None:
            return meta
        return {"task_id": task_id, "status": states.SUCCESS, "result": stored.result, "traceback": None,
                "children": [], "date_done": stored.finished_at, "name": stored.task, "args": [],
                "kwargs": stored.payload, "worker": None, "retries": None, "queue": stored.task}
