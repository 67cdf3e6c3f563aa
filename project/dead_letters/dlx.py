"""RabbitMQ's dead-letter exchange: a message the broker drops outside the bus's code is kept.

The bus's consumer records and acks every message it refuses, so on the bus's own
path nothing is rejected. A message can still be dead-lettered by RabbitMQ itself: a
reject by other code on the queue (a plain Celery worker, a `Reject` raised in a task,
a tool), a message TTL or a queue length limit set by an operator. With dead-lettering
on, such a message goes to the fanout exchange `bus.dead_letter` and its queue
`bus.dead_letter`; workers consuming the `bus` boundary (or `bus dlq drain`) move it
into the dead-letter store with reason 'rejected-by-broker', byte for byte, then ack it.

`BUS_RABBITMQ_DEAD_LETTERS` chooses how the command and subscriber queues get it:
- `off` (default): not wired. A plain Celery sender declares a bus queue without
  arguments when it sends to it; RabbitMQ refuses (PRECONDITION_FAILED) a declaration
  whose arguments differ from the existing queue's, so queue arguments would break
  every sender that is not the bus.
- `arguments`: the queues are declared with `x-dead-letter-exchange: bus.dead_letter`.
  For deployments where only the bus declares its queues. An existing queue keeps the
  arguments it was created with: redeclaring it with others fails with
  PRECONDITION_FAILED, so switching an existing deployment needs its queues deleted
  (drained first) or the `policy` mode.
- `policy`: the queues are declared without arguments; the operator sets the same
  dead-letter exchange with a policy, which applies to existing queues and never
  conflicts with a declaration:
  rabbitmqctl set_policy -p <vhost> bus-dead-letters '<POLICY_PATTERN>'
      '{"dead-letter-exchange":"bus.dead_letter"}' --apply-to queues
  (POLICY_PATTERN matches the bus's queue names and not `bus.dead_letter` itself: a
  dead-letter queue that dead-letters to its own exchange would loop).
In both `arguments` and `policy` the workers declare `bus.dead_letter` (so a dead-lettered
message always has somewhere to go) and the `bus` boundary drains it. Redis has no
dead-lettering: there, the consumer's records are the whole story.

With quorum queues (project/transport/quorum.py) the queues carry arguments anyway, dead-lettering
is required (past its delivery limit a quorum queue would drop the message), so the
mode defaults to `arguments` and `off` is refused; in `arguments` the queues also get
`x-delivery-limit` and at-least-once dead-lettering, and a `policy` should set
`delivery-limit`, `dead-letter-strategy: at-least-once` and `overflow: reject-publish`.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery import bootsteps
from kombu import Connection, Consumer, Exchange, Queue

from project.dead_letters import store as deadletters
from project.errors import BusError
from project.settings import current
from project.store.engine import engine_for
from project.transport import quorum

if TYPE_CHECKING:
    from project.settings import Settings

logger = logging.getLogger(__name__)

#: the queues a `policy` applies to: the bus's `<boundary>.<name>` queues (not bus.dead_letter)
POLICY_PATTERN = r"^(?!bus\.dead_letter$)[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*$"
EXCHANGE = QUEUE = "bus.dead_letter"
#: the bus queue whose consumers also drain the dead-letter queue (the `bus` boundary)
DRAINED_BY = "bus.maintenance"


class DeadLetterExchangeError(BusError):
    """Dead-lettering through RabbitMQ is not available here (not RabbitMQ, or turned off)."""


def mode(settings: "Settings | None" = None) -> str:
    """The configured mode (BUS_RABBITMQ_DEAD_LETTERS, checked by project/settings.py; `arguments` by default
    with quorum queues); this process's settings by default."""
    return (settings or current()).dead_letters


def queue_arguments() -> dict[str, Any] | None:
    """The arguments of the bus's queues: dead-lettering in mode `arguments`, and the quorum type."""
    exchange = EXCHANGE if mode() == "arguments" else None
    if quorum.enabled():
        return quorum.arguments(exchange)
    return {"x-dead-letter-exchange": exchange} if exchange else None


def dead_letter_queue() -> Queue:
    arguments = {"x-queue-type": "quorum"} if quorum.enabled() else None
    return Queue(QUEUE, Exchange(EXCHANGE, type="fanout", durable=True), durable=True, queue_arguments=arguments)


def keep(message: Any, database_url: str) -> None:
    """Record one message of `bus.dead_letter` in the store.

    Reason 'delivery-limit' when a quorum queue gave up redelivering it (a poison
    message: workers died running it), else 'rejected-by-broker'.
    """
    headers = dict(message.headers or {})
    deaths = headers.get("x-death") or [{}]
    first = deaths[-1] if isinstance(deaths, list) and deaths else {}
    queue = first.get("queue") or headers.get("x-first-death-queue")
    why = first.get("reason") or headers.get("x-first-death-reason") or "unknown"
    if why == "delivery_limit":
        reason = "delivery-limit"
        error = (f"RabbitMQ redelivered it from quorum queue {queue!r} more than its delivery limit "
                 f"(BUS_RABBITMQ_DELIVERY_LIMIT) and gave up: a worker died or requeued it every time; "
                 f"find why before `bus dlq replay`")
    else:
        reason = "rejected-by-broker"
        error = f"RabbitMQ dead-lettered it from queue {queue!r} (reason: {why}); it never reached the bus's code"
    deadletters.record(
        engine_for(database_url), reason=reason,
        message_id=headers.get("id") or message.properties.get("correlation_id")
        or message.properties.get("message_id"),
        task=headers.get("task"), queue=queue,
        error=error,
        headers=headers, body=message.body, content_type=message.content_type,
        content_encoding=message.content_encoding)


class DeadLetterDrain(bootsteps.ConsumerStep):
    """Worker step (RabbitMQ): declare `bus.dead_letter`; drain it in workers of the `bus` boundary."""

    database_url: str | None = None
    drains = amqp = False

    def start(self, c: Any) -> None:
        self.database_url = current().database_url
        self.amqp = c.connection.transport.driver_type == "amqp"
        self.drains = DRAINED_BY in (c.app.amqp.queues.consume_from or {})
        if self.amqp and mode() != "off":
            super().start(c)

    def get_consumers(self, channel: Any) -> list[Consumer]:
        queue = dead_letter_queue()(channel)
        queue.declare()
        if not self.drains:
            return []
        consumer = Consumer(channel, queues=[queue], on_message=self.on_message, no_ack=False)
        consumer.qos(prefetch_count=10)
        return [consumer]

    def on_message(self, message: Any) -> None:
        try:
            keep(message, self.database_url)
        except Exception:  # not recorded: RabbitMQ keeps it and offers it again
            logger.exception("could not record a dead-lettered message; requeued")
            message.requeue()
            return
        message.ack()


def install(app: Any) -> None:
    """Add the drain step to `app`'s workers."""
    app.steps["consumer"].add(DeadLetterDrain)


def drain(settings: "Settings", limit: int | None = None) -> int:
    """Move what is in `bus.dead_letter` now into the store; the number moved."""
    if settings.broker_kind != "amqp":
        raise DeadLetterExchangeError(
            f"the broker is {settings.broker_kind}: only RabbitMQ dead-letters messages itself; "
            f"on Redis every refused message is already in the store (`bus dlq list`)")
    if mode(settings) == "off":
        raise DeadLetterExchangeError("BUS_RABBITMQ_DEAD_LETTERS is off: nothing is dead-lettered to "
                                      f"{EXCHANGE}; set it to 'arguments' or 'policy' (see docs/failures.md)")
    moved = 0
    with Connection(settings.broker_url) as conn:
        queue = dead_letter_queue()(conn.default_channel)
        queue.declare()
        while limit is None or moved < limit:
            message = queue.get(no_ack=False, accept=None)
            if message is None:
                return moved
            keep(message, settings.database_url)
            message.ack()
            moved += 1
    return moved
