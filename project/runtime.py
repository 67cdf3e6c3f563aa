"""The Celery shell around `project.execution`: one delivery of a bus task on a worker.

A retry the policy asks for is published by Celery's `retry()` to `retry_options()`
(a subscriber's own queue); everything else is decided in project/execution.py.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import Task

from project.execution import Delivery, RetryLater
from project.headers import CORRELATION_HEADER, header

if TYPE_CHECKING:
    from project.core import Bus


class BusTask(Task):
    """Base of command and subscriber tasks; `bus` and `binding` are set per task."""

    bus: "Bus"
    binding: Any
    typing = False  # the contract validates the fields, not the function signature

    def retry_options(self) -> dict[str, Any]:
        """Where a retry is published (default: where the message came from)."""
        return {}

    def delivery(self) -> Delivery:
        """This message, as the execution sees it."""
        request = self.request
        return Delivery(name=self.name, message_id=request.id, attempt=request.retries,
                        correlation_id=header(request, CORRELATION_HEADER), root_id=request.root_id)

    def run_execution(self, execute, fields: dict[str, Any]) -> Any:
        """Run `execute(binding, fields, delivery)`; a RetryLater becomes Celery's retry()."""
        try:
            return execute(self.binding, fields, self.delivery())
        except RetryLater as later:
            # max_retries=None: the policy already decided; Celery's default (3) must not cap it
            raise self.retry(exc=later.cause, countdown=whole_seconds(later.delay), max_retries=None,
                             **self.retry_options())


def whole_seconds(delay: float) -> float:
    """A retry delay Celery can publish on every broker: 0, or at least 1 second.

    With quorum queues Celery sends a countdown through RabbitMQ's delayed delivery,
    which counts whole seconds and refuses a countdown that truncates to 0
    (kombu's calculate_routing_key raises ValueError for 0 < countdown < 1).
    """
    return max(delay, 1.0) if delay > 0 else 0.0
