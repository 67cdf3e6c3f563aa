"""Event subscribers as Celery tasks, each on its own durable queue.

Delivery guarantee: every event published while a subscriber is registered reaches
its queue (even with its workers down); the subscriber runs it once per event (inbox
claim in the handler's transaction); a failure is retried on the subscriber's own
queue only, by its own policy, and dead-lettered when the policy gives up. No other
subscriber of the event is affected.
"""
from __future__ import annotations

import logging
from typing import Any

from celery.exceptions import Retry
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy import update

from project.db import inbox, utcnow
from project.dispatch import own_queue
from project.errors import InvalidMessage
from project.headers import EVENT_ID
from project.retry import Backoff
from project.runtime import BusTask
from project.uow import UnitOfWork

logger = logging.getLogger(__name__)
DEFAULT_POLICY = Backoff(max_retries=5, base=1.0, cap=60.0)


def claim(session, event_id: str, subscriber: str) -> bool:
    """Claim (event, subscriber) in the current transaction; False if it already ran."""
    insert = (postgresql.insert if session.bind.dialect.name == "postgresql" else sqlite.insert)(inbox)
    stmt = insert.values(event_id=event_id, subscriber=subscriber, duplicates=0, processed_at=utcnow())
    if session.execute(stmt.on_conflict_do_nothing().returning(inbox.c.event_id)).first() is not None:
        return True
    session.execute(update(inbox).where(inbox.c.event_id == event_id, inbox.c.subscriber == subscriber)
                    .values(duplicates=inbox.c.duplicates + 1))
    return False


class SubscriberTask(BusTask):
    """The Celery task of one subscriber."""

    ignore_result = True  # every copy of an event shares its id: results would collide
    throws = (InvalidMessage,)

    @property
    def policy(self) -> Backoff:
        return self.binding.retry or DEFAULT_POLICY

    def retry_options(self) -> dict[str, Any]:
        # Celery re-publishes a retry to the exchange the message came from: for a fanout
        # that would re-run every subscriber. The default exchange reaches this queue only.
        return own_queue(self.name)

    def execute(self, fields: dict[str, Any]) -> None:
        """Run the subscriber once per event, in one transaction with its effects."""
        event_id = fields.pop(EVENT_ID, None) or self.request.root_id or self.request.id
        event = self.validate(fields, {**fields, EVENT_ID: event_id})
        try:
            published = self._run_once(event, event_id)
        except Retry:
            raise
        except Exception as exc:
            return self.retry_or_dead_letter(exc, {**fields, EVENT_ID: event_id})
        self.bus.publish_after_commit(published)

    def _run_once(self, event, event_id: str) -> list[str]:
        with UnitOfWork(self.bus.engine()) as uow:
            if not claim(uow.session, event_id, self.name):
                uow.commit()
                logger.info("%s already handled event %s: duplicate absorbed", self.name, event_id)
                return []
            context = self.context(f"{self.name}:{event_id}")
            sink = self.bus.sink(uow, self.binding.boundary, f"{self.name}:{event_id}", context)
            self.binding.handler(event, **self.bus.dependencies(self.binding, uow, sink, context))
            uow.commit()
            return sink.written


def run_subscriber(task: SubscriberTask, **fields: Any) -> None:
    """The body of every subscriber task."""
    task.execute(fields)
