"""The outbox's backlog: rows committed but not yet published, and how long the oldest has waited.

A durable timer waits from its due time on: one not due yet is not late, and a cancelled one
never will be.

`bus check --outbox-age` warns on it; the worker's metrics export it as gauges.
"""
from __future__ import annotations

from datetime import timedelta, timezone

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from project.store.tables import outbox, utcnow


def waiting(engine: Engine, older_than: timedelta) -> tuple[int, timedelta]:
    """(unpublished rows due over `older_than` ago, how long the oldest of them has waited)."""
    now = utcnow()
    since = func.coalesce(outbox.c.due_at, outbox.c.created_at)
    with engine.connect() as conn:
        count, oldest = conn.execute(select(func.count(), func.min(since))
                                     .where(outbox.c.published_at.is_(None), outbox.c.cancelled_at.is_(None),
                                            since <= now - older_than)).one()
    if not count:
        return 0, timedelta(0)
    return count, now - (oldest if oldest.tzinfo else oldest.replace(tzinfo=timezone.utc))
