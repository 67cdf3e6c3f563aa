"""The dead-letter store: nothing the bus cannot process is dropped without a record.

Each entry keeps the original message (headers and body bytes), the reason and the
error. Recording the same message again for the same reason counts an attempt instead
of adding a row.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from project.observe import metrics
from project.store.tables import dead_letters, utcnow

logger = logging.getLogger(__name__)

REASONS = ("invalid", "conflict", "retries-exhausted", "unknown-task", "undecodable",
           "refused-content-type", "too-large", "rejected-by-broker",
           "delivery-limit")


def record(engine: Engine, *, reason: str, message_id: str | None, task: str | None,
           queue: str | None = None, boundary: str | None = None, error: str = "",
           traceback: str | None = None, headers: dict[str, Any] | None = None,
           body: bytes | str | None = None, content_type: str | None = None,
           content_encoding: str | None = None, correlation_id: str | None = None) -> None:
    """Store one dead letter (or count another attempt of the same one)."""
    assert reason in REASONS, reason
    if isinstance(body, str):
        body = body.encode(content_encoding or "utf-8", errors="surrogateescape")
    now = utcnow()
    safe_headers = json.loads(json.dumps(headers or {}, default=repr))
    with engine.begin() as conn:
        match = (dead_letters.c.message_id == message_id, dead_letters.c.task == task,
                 dead_letters.c.reason == reason)
        found = conn.execute(select(dead_letters.c.id).where(*match)).first() if message_id else None
        if found:
            conn.execute(update(dead_letters).where(dead_letters.c.id == found.id).values(
                attempts=dead_letters.c.attempts + 1, last_failed_at=now, error=error, traceback=traceback,
                replayed_at=None))  # failed again after a replay: pending again
        else:
            conn.execute(dead_letters.insert().values(
                message_id=message_id, task=task, queue=queue, boundary=boundary, reason=reason,
                error=error, traceback=traceback, headers=safe_headers, body=body,
                content_type=content_type, content_encoding=content_encoding, attempts=1,
                correlation_id=correlation_id, first_failed_at=now, last_failed_at=now))
    metrics.dead_lettered(task, reason)
    logger.warning("dead-lettered %s (%s) of %s: %s", message_id, reason, task or queue, error)
