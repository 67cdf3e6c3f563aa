"""A test hook for durable timers on real workers: make a timer due now instead of waiting for it.

    task_id = place_order.apply_async(kwargs=..., countdown=7200).id   # a timer in the outbox
    due_now(engine, task_id)                                           # the relay publishes it at its next tick

It moves the timer's due time in the bus database, which is all a worker's relay reads:
what happens next is what happens when the time comes. A cancelled timer is moved too
and still does not run. The in-process harness has its own clock (`BusHarness.advance`).
"""
from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.engine import Engine

from project.store.tables import outbox, utcnow


def due_now(engine: Engine, timer_id: str) -> None:
    """Make the unpublished timer `timer_id` due now; LookupError if there is none of that id."""
    with engine.begin() as conn:
        moved = conn.execute(update(outbox).where(outbox.c.id == timer_id, outbox.c.due_at.is_not(None),
                                                  outbox.c.published_at.is_(None))
                             .values(due_at=utcnow())).rowcount
    if not moved:
        raise LookupError(f"no unpublished timer {timer_id!r} in the bus database; `bus timers list` shows them")
