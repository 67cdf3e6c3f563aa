"""FastStream's side of `bus bench --peers`: `faststream run project.bench.peer_faststream:app --workers C`.

A no-op subscriber on `bench_peer.noop`, and BUS_BENCH_SUBSCRIBERS no-op subscribers
`bench_peer.fan_000`, ... of one fanned-out message; each counts itself
(project/bench/peer_probe.py). The broker is FastStream's own for BUS_BENCH_PEER_URL:
- RabbitMQ (`amqp://`): durable queues; the fan-out is a durable fanout exchange
  `bench_peer.fanout` bound to the K queues, as for bare Celery and the bus;
- Redis (`redis://`, `unix://`): streams with consumer groups, the structure in which
  FastStream acks after the handler (its lists are popped, at-most-once): the no-op
  stream has one group, the fan-out stream K groups, one per subscriber (durable fan-out).
Everything else is FastStream's default for a subscriber (ack after the handler; on
RabbitMQ no prefetch limit; on Redis each read takes what is there), except what makes
delivery comparable with Celery's: persistent messages, publisher confirms only when
BUS_BENCH_PEER_CONFIRM=1 (as the bench sets it where the bus and bare Celery publish
with them); and a blocking read of 100 ms on Redis streams (FastStream's default polls
without blocking, a busy loop that would take CPU from the other processes).
"""
from __future__ import annotations

import os
from typing import Any

from faststream import FastStream

from project.bench import peer_probe as bench_peer_probe

NOOP = "bench_peer.noop"
FANOUT = "bench_peer.fanout"
FAN_QUEUE = "bench_peer.fan_{:03d}"
STREAM_BLOCK_MS = 100


def _subscribers() -> int:
    return int(os.environ.get("BUS_BENCH_SUBSCRIBERS", "0"))


async def _noop(body: Any) -> None:  # async: FastStream runs a plain function in a thread pool
    """Does nothing; counted."""
    bench_peer_probe.completed(0)


async def _fan(body: Any) -> None:
    """One copy of a fanned-out message: does nothing; counted."""
    bench_peer_probe.completed(1)


def _rabbit(url: str) -> tuple[Any, tuple[Any, Any, Any]]:
    from faststream.rabbit import (
        Channel,
        ExchangeType,
        RabbitBroker,
        RabbitExchange,
        RabbitQueue,
    )
    confirms = os.environ.get(bench_peer_probe.CONFIRM_ENV) == "1"
    broker = RabbitBroker(url, default_channel=Channel(publisher_confirms=confirms))
    fanout = RabbitExchange(FANOUT, type=ExchangeType.FANOUT, durable=True)
    noop_queue = RabbitQueue(NOOP, durable=True)
    broker.subscriber(noop_queue)(_noop)
    for i in range(_subscribers()):
        broker.subscriber(RabbitQueue(FAN_QUEUE.format(i), durable=True), fanout)(_fan)

    async def noop(seq: int) -> None:
        await broker.publish({"seq": seq}, queue=noop_queue, persist=True)

    async def fan(seq: int) -> None:
        await broker.publish({"seq": seq}, exchange=fanout, persist=True)

    async def declare() -> None:
        await broker.declare_exchange(fanout)
        await broker.declare_queue(noop_queue)
    return broker, (noop, fan, declare)


def _redis(url: str) -> tuple[Any, tuple[Any, Any, Any]]:
    from faststream.redis import RedisBroker, StreamSub
    broker = RedisBroker(url)
    consumer = f"c{os.getpid()}"
    broker.subscriber(stream=StreamSub(NOOP, group=NOOP, consumer=consumer, polling_interval=STREAM_BLOCK_MS))(_noop)
    for i in range(_subscribers()):
        broker.subscriber(stream=StreamSub(FANOUT, group=FAN_QUEUE.format(i), consumer=consumer,
                                           polling_interval=STREAM_BLOCK_MS))(_fan)

    async def noop(seq: int) -> None:
        await broker.publish({"seq": seq}, stream=NOOP)

    async def fan(seq: int) -> None:
        await broker.publish({"seq": seq}, stream=FANOUT)

    async def declare() -> None:
        await broker.ping(timeout=5)
    return broker, (noop, fan, declare)


class Side:
    """How `project.bench.peer_sender faststream` sends: each call runs on the sender's own event loop."""

    def __init__(self, broker: Any, noop: Any, fan: Any, declare: Any) -> None:
        import asyncio
        self.broker = broker
        self._noop, self._fan, self._declare = noop, fan, declare
        self._loop = asyncio.new_event_loop()
        self._connected = False

    def _run(self, make: Any) -> None:
        if not self._connected:
            self._loop.run_until_complete(self.broker.connect())
            self._connected = True
        self._loop.run_until_complete(make())

    def burst(self, kind: str, seqs: range) -> None:
        """Send one message per seq, one after the other, on one loop turn."""
        send = self._noop if kind == "noop" else self._fan

        async def all_of_them() -> None:
            for seq in seqs:
                await send(seq)
        self._run(all_of_them)

    def warm(self) -> None:
        """Connect (and declare) before anything is timed."""
        self._run(self._declare)


_url = os.environ.get(bench_peer_probe.URL_ENV, "redis://127.0.0.1:6379/0")
broker, _senders = _rabbit(_url) if _url.startswith("amqp") else _redis(_url)  # no connection until started
app = FastStream(broker, after_startup=[bench_peer_probe.ready])


def sender() -> Side:
    """The sending side, for project/bench/peer_sender.py."""
    return Side(broker, *_senders)
