"""The execution log (`bus_executions`): one row per execution of a command or subscriber.

Every execution leaves one row (message, task, conversation, state, attempts, start and
end of the last attempt). A success is written in the handler's own transaction (one
more INSERT, no extra commit; on PostgreSQL a command's goes in one round trip with its
stored result), so the row exists exactly when the effects do; so is a refusal (a
domain error), with the refusal stored under the claim it keeps. A failed attempt
(retrying, or given up and dead-lettered) is written in a short transaction of its own,
and a failure to write it never changes the message's outcome. Duplicates absorbed are
not logged here: the claim tables already count them. `bus trace` reads the log back
(project/observe/trace.py).
"""
from __future__ import annotations

import logging
from datetime import datetime
from functools import cache
from typing import Any, Protocol

from sqlalchemy import Insert, bindparam
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from project.store.engine import Write
from project.store.tables import executions, utcnow


class Delivery(Protocol):
    """What the log reads of a delivery (project.messaging.execution.Delivery); the store imports no messaging."""

    message_id: str
    attempt: int
    correlation_id: str | None
    started_at: datetime


logger = logging.getLogger(__name__)


def succeeded(dialect_name: str, binding: Any, delivery: "Delivery", *, event_id: str | None = None) -> Write:
    """The write that logs this successful attempt, in the execution's own transaction (`UnitOfWork.write`)."""
    return _upsert(dialect_name, keep_error=True), _params(_row(binding, delivery, event_id, "succeeded", None))


def refused(dialect_name: str, binding: Any, delivery: "Delivery", exc: BaseException) -> Write:
    """The write that logs a refused attempt (a domain error), in the execution's own transaction."""
    return _upsert(dialect_name, keep_error=False), _params(_row(binding, delivery, None, "refused", _error(exc)))


def failed(engine: Engine, binding: Any, delivery: "Delivery", exc: BaseException, *, state: str,
           event_id: str | None = None) -> None:
    """Log a failed attempt (`retrying`, `dead-lettered`) in a transaction of its own."""
    row = _row(binding, delivery, event_id, state, _error(exc))
    try:
        with engine.begin() as conn:
            conn.execute(_upsert(engine.dialect.name, keep_error=False), _params(row))
    except Exception:  # the outcome is decided; the log is a convenience
        logger.warning("could not log the failed attempt of %s %s", binding.name, delivery.message_id,
                       exc_info=True)


def _row(binding: Any, delivery: "Delivery", event_id: str | None, state: str, error: str | None) -> dict:
    return {"message_id": delivery.message_id, "task": binding.name,
            "kind": "subscriber" if hasattr(binding, "retry") else "command", "boundary": binding.boundary,
            "correlation_id": delivery.correlation_id or delivery.message_id, "event_id": event_id,
            "state": state, "attempts": delivery.attempt + 1, "error": error,
            "started_at": delivery.started_at, "finished_at": utcnow()}


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


def _params(row: dict) -> dict:
    return {f"log_{name}": value for name, value in row.items()}


@cache
def _upsert(dialect_name: str, keep_error: bool) -> Insert:
    """The log row's INSERT .. ON CONFLICT DO UPDATE, built once (parameters `log_<column>`, see `_params`)."""
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    stmt = dialect.insert(executions).values({c.name: bindparam(f"log_{c.name}") for c in executions.columns})
    changed = {name: stmt.excluded[name] for name in ("state", "attempts", "started_at", "finished_at")}
    # a success keeps the error of the attempt before it ("succeeded after: ...")
    changed["error"] = executions.c.error if keep_error else stmt.excluded.error
    return stmt.on_conflict_do_update(index_elements=["message_id", "task"], set_=changed)
