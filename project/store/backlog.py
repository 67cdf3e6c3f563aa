"""The outbox's backlog: rows committed but not yet published, and how long the oldest has waited.

`bus check --outbox-age` warns on it; the worker's metrics export it as gauges.
"""
from __future__ import annotations

from datetime import timedelta, timezone

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from project.store.tables import outbox, utcnow


def waiting(engine: Engine, older_than: timedelta) -> tuple[int, timedelta]:
    """(unpublished rows committed over `older_than` ago, how long the oldest of them has waited)."""
    now = utcnow()
    with engine.connect() as conn:
        count, oldest = conn.execute(select(func.count(), func.min(outbox.c.created_at))
                                     .where(outbox.c.published_at.is_(None),
                                            outbox.c.created_at <= now - older_than)).one()
    if not count:
        return 0, timedelta(0)
    return count, now - (oldest if oldest.tzinfo else oldest.replace(tzinfo=timezone.utc))
