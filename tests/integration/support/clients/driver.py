"""A sending application for the integration tests, run as its own process.

Why a process of its own: `project.celery` reads its settings from the environment
when it is imported (celeryconfig.py), so one Python process is a client of one
(broker, database) pair only. The test process talks to several pairs, so it starts
one driver per scenario, with that scenario's environment, and sends it requests:
one JSON object per line on stdin, one JSON reply per line on stdout. The driver
imports the bus once; a request then costs milliseconds, not an interpreter start.

Requests: {"op": <name>, ...arguments}. Replies: {"value": ...} or
{"error": {"type": "<module>.<class>", "message": "..."}} when the operation raised
(for `get`: when the task's outcome is an exception, as `AsyncResult.get()` raises it).
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from typing import Any, Callable

# Only protocol lines go to the real stdout; anything printed by libraries goes to stderr.
_protocol = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)

from project import app, bus  # noqa: E402  (configured from this process's environment)

app.loader.import_default_modules()  # bind every tasks module, as a worker does


def _contract(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def delay(task: str, fields: dict[str, Any], idempotency_key: str | None = None) -> str:
    """`<task>.delay(**fields, idempotency_key=...)`: the id of the AsyncResult."""
    extra = {} if idempotency_key is None else {"idempotency_key": idempotency_key}
    return app.tasks[task].delay(**fields, **extra).id


def delay_positional(task: str, args: list[Any]) -> str:
    """`<task>.delay(*args)`: commands take keywords only."""
    return app.tasks[task].delay(*args).id


def apply_async(task: str, kwargs: dict[str, Any], options: dict[str, Any]) -> str:
    return app.tasks[task].apply_async(kwargs=kwargs, **options).id


def send(contract: str, fields: dict[str, Any], idempotency_key: str | None = None) -> str:
    """`bus.send(Contract(**fields), idempotency_key=...)`."""
    return bus.send(_contract(contract)(**fields), idempotency_key=idempotency_key).id


def send_object(value: Any) -> str:
    """`bus.send(value)` with something that is not a command instance (a dict, ...)."""
    return bus.send(value).id


def send_class(contract: str) -> str:
    """`bus.send(Contract)`: the class instead of an instance."""
    return bus.send(_contract(contract)).id


def send_task(name: str, kwargs: dict[str, Any], options: dict[str, Any] | None = None) -> str:
    """Plain Celery through our app: `app.send_task(name, kwargs=...)`."""
    return app.send_task(name, kwargs=kwargs, **(options or {})).id


def burst(task: str, fields: dict[str, Any], idempotency_key: str, times: int) -> list[str]:
    """The same command `times` times, back to back (faster than a worker runs one)."""
    sender = app.tasks[task]
    return [sender.delay(**fields, idempotency_key=idempotency_key).id for _ in range(times)]


def get(task_id: str, timeout: float = 30.0) -> Any:
    """`AsyncResult(task_id).get()`: the handler's return value, or its exception."""
    return app.AsyncResult(task_id).get(timeout=timeout, propagate=True)


OPS: dict[str, Callable[..., Any]] = {f.__name__: f for f in (
    delay, delay_positional, apply_async, send, send_object, send_class, send_task, burst, get)}


def handle(request: dict[str, Any]) -> dict[str, Any]:
    op = OPS[request.pop("op")]
    try:
        return {"value": op(**request)}
    except Exception as exc:  # noqa: BLE001 - every outcome is reported to the test
        return {"error": {"type": f"{type(exc).__module__}.{type(exc).__qualname__}",
                          "message": str(exc), "traceback": traceback.format_exc()}}


def main() -> None:
    _protocol.write(json.dumps({"value": sorted(n for n in app.tasks if not n.startswith("celery."))}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        _protocol.write(json.dumps(handle(json.loads(line)), default=str) + "\n")


if __name__ == "__main__":
    main()
