"""Event subscribers as Celery tasks, each on its own durable queue.

Delivery guarantee: every event published while a subscriber is registered reaches
its queue (even with its workers down); the subscriber runs it once per event (inbox
claim in the handler's transaction, see project/messaging/execution.py); a failure is retried on
the subscriber's own queue only, by its own policy, and dead-lettered when the policy
gives up. No other subscriber of the event is affected.
"""
from __future__ import annotations

from typing import Any

from project.errors import InvalidMessage
from project.messaging.retry import Backoff
from project.messaging.runtime import BusTask


class SubscriberTask(BusTask):
    """The Celery task of one subscriber."""

    ignore_result = True  # results of events are not awaited by anyone
    throws = (InvalidMessage,)

    @classmethod
    def retry_policy(cls) -> Backoff:
        """This subscriber's retry policy, read from the class (as Celery binds it)."""
        return cls.binding.retry


def run_subscriber(task: SubscriberTask, **fields: Any) -> None:
    """The body of every subscriber task."""
    task.run_execution(task.execution.subscriber, fields)
