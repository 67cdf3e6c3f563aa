"""The Celery shell around `project.messaging.execution`: one delivery of a bus task on a worker.

A retry the policy asks for is published by Celery's `retry()` to the task's own queue
only (`retry_options()`), as often as the bus's policy says: Celery's own cap is off.
Everything else is decided in project/messaging/execution.py.
"""
from __future__ import annotations

from typing import Any, Callable

from celery import Task

from project.headers import CORRELATION_HEADER, header
from project.messaging.execution import (
    STORE_RETRY_DELAY,
    Delivery,
    Execution,
    RetryLater,
)
from project.messaging.retry import Backoff, check_visibility
from project.transport.dispatch import own_queue


class BusTask(Task):
    """Base of command and subscriber tasks; `execution`, `ensure_broker` and `binding` are set per task."""

    execution: Execution
    #: start the embedded broker on first use in this process (a staticmethod of the task class)
    ensure_broker: Callable[[], None]
    binding: Any
    typing = False  # the contract validates the fields, not the function signature
    # No cap of Celery's: retry() reads its max_retries=None argument as "use this attribute"
    # (3 by default) and fails the 4th retry without a dead letter. The policy decides alone.
    max_retries = None

    def retry_options(self) -> dict[str, Any]:
        """Where a retry is published: this task's own queue, through the default exchange.

        Celery would re-publish to the exchange the message came from: for an event that
        is its fanout (every subscriber would run again), for a command on quorum queues
        the main exchange `bus.queues`, which the command's route check refuses. On quorum
        queues a countdown then travels through RabbitMQ's delayed delivery, which Celery
        routes by the queue's own exchange and name: to this queue only.
        """
        return own_queue(self.name)

    @classmethod
    def retry_policy(cls) -> Backoff:
        """The policy this task's failures are retried by."""
        raise NotImplementedError(f"{cls.__name__} is not a bus task base: bind handlers with bus.command(...) "
                                  f"or bus.subscriber(...), whose task classes say their retry policy")

    @classmethod
    def on_bound(cls, app: Any) -> None:
        """Refuse, as the app binds this task (a worker at start), a policy its broker would run twice."""
        check_visibility(cls.name, cls.retry_policy(), visibility_timeout(app), other_wait=STORE_RETRY_DELAY)

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
            raise self.retry(exc=later.cause, countdown=whole_seconds(later.delay), **self.retry_options())


def visibility_timeout(app: Any) -> float | None:
    """Seconds after which `app`'s broker hands an unacknowledged message back; None if it never does by time.

    kombu's Redis transports (and the embedded broker, Redis on a socket) do, after the
    transport option `visibility_timeout` (celeryconfig: BUS_VISIBILITY_TIMEOUT); RabbitMQ
    hands a message back only when its consumer goes away.
    """
    with app.connection_for_write() as connection:  # not connected: only the transport's class is read
        transport = connection.get_transport_cls()
    if getattr(transport, "driver_type", None) != "redis":
        return None
    options = app.conf.broker_transport_options or {}
    return float(options.get("visibility_timeout", transport.Channel.visibility_timeout))


def whole_seconds(delay: float) -> float:
    """A retry delay Celery can publish on every broker: 0, or at least 1 second.

    With quorum queues Celery sends a countdown through RabbitMQ's delayed delivery,
    which counts whole seconds and refuses a countdown that truncates to 0
    (kombu's calculate_routing_key raises ValueError for 0 < countdown < 1).
    """
    return max(delay, 1.0) if delay > 0 else 0.0
