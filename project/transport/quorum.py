"""RabbitMQ quorum queues for the bus's queues (`BUS_RABBITMQ_QUEUE_TYPE=quorum`).

Quorum queues are RabbitMQ's replicated, durable queue type. With
`BUS_RABBITMQ_QUEUE_TYPE=quorum` every bus queue (commands, subscribers, maintenance,
`bus.dead_letter`) is declared with `x-queue-type: quorum`, and two more things change:

Retries go through Celery's native delayed delivery. Celery (5.5+) publishes a
countdown message to the `celery_delayed_*` exchanges when it sees quorum queues, and
the message comes back through the exchange of the queue it is routed to, matched by
`#.<routing key>`. Direct exchanges are not supported (Celery would hold the ETA in
the worker, which blocks a quorum-queue worker: no global QoS), and a subscriber's
exchange is its event's fanout, so a delayed retry would re-run every subscriber. So in
quorum mode each bus queue's *main* exchange is the topic exchange `bus.queues`, where
it is bound by its own name (`<queue>` and `#.<queue>`): `.delay()`, retries and
delayed retries reach that one queue. Its usual binding (a command's direct exchange of
the same name, a subscriber's event fanout) is declared next to it (`RoutedQueue.also`)
and Celery's delayed-delivery step never binds it to `celery_delayed_delivery`.

Poison guard: a quorum queue counts the redeliveries of a message (a worker killed
while running it, a reject with requeue); past `x-delivery-limit`
(`BUS_RABBITMQ_DELIVERY_LIMIT`, default 20, RabbitMQ 4's default) RabbitMQ
dead-letters it. Quorum mode therefore needs dead-lettering (project/dead_letters/dlx.py): unset, it
is `arguments`; `off` is refused, because past the limit the message would be dropped.
"""
from __future__ import annotations

from typing import Any, Iterable

from kombu import Exchange, Queue, binding

from project.errors import ConfigurationError
from project.settings import Settings, current

#: the topic exchange where every bus queue is bound by its own name (quorum mode)
ROUTER = "bus.queues"


def enabled(settings: Settings | None = None) -> bool:
    """Whether the bus's queues are quorum queues (BUS_RABBITMQ_QUEUE_TYPE; this process's settings by default)."""
    return (settings or current()).queue_type == "quorum"


def check(settings: Settings) -> None:
    """Refuse quorum mode on a broker that has no quorum queues."""
    if enabled(settings) and settings.broker_kind != "amqp":
        raise ConfigurationError(
            f"BUS_RABBITMQ_QUEUE_TYPE=quorum needs RabbitMQ, but the broker is {settings.broker_kind}; "
            f"unset it, or set CELERY_BROKER_URL=amqp://user:pass@host:5672/vhost")


def router() -> Exchange:
    return Exchange(ROUTER, type="topic", durable=True)


class RoutedQueue(Queue):
    """A queue whose main exchange is `bus.queues` (by its own name), bound also to `also`.

    kombu's own `bindings=` would drop the main exchange, and Celery needs one: it
    publishes to it, chooses native delayed delivery by its type, and binds it to
    `celery_delayed_delivery`.
    """

    attrs = Queue.attrs + (("also", tuple),)

    def declare(self, nowait: bool = False, channel: Any = None) -> str:
        name = super().declare(nowait=nowait, channel=channel)
        if not self.no_declare:
            channel = channel or self.channel
            for extra in self.also or ():
                extra.declare(channel)
                extra.bind(self, nowait=nowait, channel=channel)
        return name

    def routes(self) -> list[tuple[Exchange, str]]:
        """Every (exchange, routing key) the queue is bound to."""
        return [(self.exchange, self.routing_key), *((b.exchange, b.routing_key) for b in self.also or ())]


def routed_queue(name: str, usual: Iterable[tuple[Exchange, str]], arguments: dict[str, Any] | None) -> RoutedQueue:
    """Queue `name` in quorum mode: on `bus.queues` by name, and on its `usual` exchanges."""
    also = [binding(router(), routing_key=f"#.{name}"), *(binding(x, routing_key=key) for x, key in usual)]
    return RoutedQueue(name, router(), routing_key=name, durable=True, queue_arguments=arguments, also=also)


def routes(queue: Queue) -> list[tuple[Exchange, str]]:
    """Every (exchange, routing key) of a bus queue, in either mode."""
    return queue.routes() if isinstance(queue, RoutedQueue) else [(queue.exchange, queue.routing_key)]


def arguments(dead_letter_exchange: str | None, settings: Settings | None = None) -> dict[str, Any]:
    """The queue arguments of a bus queue in quorum mode (the delivery limit: this process's settings by default)."""
    found: dict[str, Any] = {"x-queue-type": "quorum"}
    if dead_letter_exchange:
        limit = (settings or current()).delivery_limit
        found.update({"x-dead-letter-exchange": dead_letter_exchange, "x-delivery-limit": limit,
                      # at-least-once: RabbitMQ keeps the message until bus.dead_letter confirms it
                      # (it requires the reject-publish overflow mode)
                      "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"})
    return found
