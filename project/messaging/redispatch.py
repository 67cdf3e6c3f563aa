"""Dispatch on redelivery: what a committed execution left in the outbox goes out with its redelivery.

An execution hands its outbox rows to the publisher right after its commit. A process
killed in between (or a broker that refused the publish) leaves them unpublished; its
message is redelivered, finds its claim (command) or inbox entry (subscriber) committed,
and publishes those rows at once, as NServiceBus's outbox dispatches a stored record's
pending messages, instead of leaving them to a relay.

The rows of an execution are the outbox rows caused by its message (`causation_id`, an
indexed column). Only a delivery that started after that execution finished takes them
over: one that started earlier was waiting on the claim while the execution ran, and
that execution's own process publishes them a moment after its commit (a burst of
duplicates would otherwise race it for every row). Times are the hosts' clocks; skew
only moves the rare delivery that arrives in the hand-off from one side to the other: a
row handed over twice goes out once (the publisher claims it, project/messaging/outbox.py) or is
absorbed by the inbox, and a row left is published by the relay.
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from project.store.tables import executions, outbox


def left_unpublished(session: Session, message_id: str, task: str, started_at: datetime) -> list[str]:
    """The unpublished outbox rows of `task`'s execution of `message_id`, if it finished before `started_at`."""
    finished = select(executions.c.finished_at).where(executions.c.message_id == message_id,
                                                      executions.c.task == task).scalar_subquery()
    # no log row (purged): the execution is older than the key retention, long finished
    return list(session.execute(
        select(outbox.c.id).where(outbox.c.causation_id == message_id, outbox.c.published_at.is_(None),
                                  or_(finished.is_(None), finished < started_at))
        .order_by(outbox.c.created_at, outbox.c.id)).scalars())
