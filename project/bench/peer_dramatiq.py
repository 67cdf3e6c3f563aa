"""dramatiq's side of `bus bench --peers`: `dramatiq project.bench.peer_dramatiq --processes C --threads 1`.

One actor, `bench_peer_noop` on the queue `bench_peer.noop`, that does nothing and
counts itself (project/bench/peer_probe.py). The broker is dramatiq's own for
BUS_BENCH_PEER_URL (`redis://...`, `unix://...` or `amqp://...`), with its default
middleware and its defaults for delivery (the message is acked after the actor
returns, persistent on RabbitMQ), except publisher confirms: on when
BUS_BENCH_PEER_CONFIRM=1, as the bench sets it where the bus and bare Celery publish with them.
dramatiq has no fan-out (a message goes to one actor), so there is no fan actor.
"""
from __future__ import annotations

import os

import dramatiq

from project.bench import peer_probe as bench_peer_probe

NOOP_QUEUE = "bench_peer.noop"


class Ready(dramatiq.Middleware):
    """Marks the process ready once its consumers run."""

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        bench_peer_probe.ready()


def _broker(url: str) -> dramatiq.Broker:
    if url.startswith("amqp"):
        from dramatiq.brokers.rabbitmq import RabbitmqBroker
        return RabbitmqBroker(url=url, confirm_delivery=os.environ.get(bench_peer_probe.CONFIRM_ENV) == "1")
    from dramatiq.brokers.redis import RedisBroker
    return RedisBroker(url=url)


# builds the clients; connects on first use
broker = _broker(os.environ.get(bench_peer_probe.URL_ENV, "redis://127.0.0.1:6379/0"))
broker.add_middleware(Ready())
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name="bench_peer_noop", queue_name=NOOP_QUEUE)
def noop(seq: int = 0) -> None:
    """Does nothing; counted."""
    bench_peer_probe.completed(0)


class Side:
    """How `project.bench.peer_sender dramatiq` sends."""

    def burst(self, kind: str, seqs: range) -> None:
        """Send one message per seq, one after the other."""
        if kind != "noop":
            raise NotImplementedError("dramatiq has no fan-out: a message goes to one actor")
        for seq in seqs:
            noop.send(seq=seq)

    def warm(self) -> None:
        """Open the broker connection before anything is timed."""
        if hasattr(broker, "client"):
            broker.client.ping()
        else:
            broker.connection  # noqa: B018 - the property connects


def sender() -> Side:
    """The sending side, for project/bench/peer_sender.py."""
    return Side()
