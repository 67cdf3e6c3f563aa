"""The bare-Celery side of `bus bench`: a plain Celery app with no bus code in it.

`celery -A project.bench.bare worker` is the baseline the bus is compared with. It
shares with the bus only what makes the comparison fair:
- the broker (the same URL, kombu's own transports: no bus transport is installed),
- the delivery semantics the bus's settings choose (project/config.py: JSON, late acks, reject on a
  lost worker, the prefetch multiplier, the Redis transport options), and the pool and
  concurrency, which `bus bench` passes to both workers.
Everything else is Celery's default: no result backend (results ignored), no task
events, no STARTED state. With BUS_BENCH_BARE_RESULTS=on (`bus bench --bare-results`)
the baseline stores results too, with Celery's own backend at the bus's result backend
URL: Celery as most teams run it, results kept for `.get()`. What the bus adds on top
(validation, idempotency claim, result storage, events for Flower, the outbox, the
inbox) is what the bench measures.

Tasks: `bench_bare.noop` (its own queue `bench_bare.noop`) and `bench_bare.fan`,
published to the fanout exchange `bench_bare.fanout`, which binds
BUS_BENCH_SUBSCRIBERS queues `bench_bare.fan_000`, ... On RabbitMQ that is durable
fan-out; on Redis kombu's fanout is PUB/SUB (a copy for a queue whose consumer is not
listening at that moment is lost), which the bench reports as such.
"""
from __future__ import annotations

import os

from celery import Celery
from kombu import Exchange, Queue

from project import config as bus_config
from project.bench import probe as bench_probe
from project.settings import load

NOOP_QUEUE = "bench_bare.noop"
FANOUT = Exchange("bench_bare.fanout", type="fanout", durable=True)
#: the routing key of every fanned-out message and of every binding: kombu's Redis fanout
#: (fanout_patterns) delivers a message only to bindings with its routing key
FAN_KEY = "bench_bare.fan"
#: the bus's delivery settings, shared with the baseline (see the module docstring)
SHARED_SETTINGS = ("task_serializer", "accept_content", "task_acks_late", "task_reject_on_worker_lost",
                   "task_acks_on_failure", "worker_prefetch_multiplier", "broker_transport_options",
                   "broker_connection_retry_on_startup")


def fan_queues(count: int) -> list[Queue]:
    """The `count` queues bound to the bare fanout exchange."""
    return [Queue(f"bench_bare.fan_{i:03d}", FANOUT, routing_key=FAN_KEY, durable=True) for i in range(count)]


def publish_fan(seq: int) -> None:
    """Publish one `fan` message to the fanout exchange (every bound queue gets a copy)."""
    # exchange_type: otherwise Celery takes the default queue's (direct) and sends to `celery`
    fan.apply_async(kwargs={"seq": seq}, exchange=FANOUT, routing_key=FAN_KEY, exchange_type="fanout",
                    declare=[FANOUT])


#: `bus bench --bare-results`: the baseline stores results as well (Celery's own backend class)
STORE_RESULTS = os.environ.get("BUS_BENCH_BARE_RESULTS", "") == "on"

_settings = load()
app = Celery("bench_bare")
app.conf.update({name: getattr(bus_config, name) for name in SHARED_SETTINGS if hasattr(bus_config, name)})
app.conf.update(
    broker_url=_settings.broker_url,
    result_backend=_settings.result_backend if STORE_RESULTS else None,
    task_ignore_result=not STORE_RESULTS,
    task_queues=[Queue(NOOP_QUEUE, Exchange(NOOP_QUEUE, type="direct", durable=True), routing_key=NOOP_QUEUE,
                       durable=True), *fan_queues(int(os.environ.get("BUS_BENCH_SUBSCRIBERS", "0")))],
    task_routes={"bench_bare.noop": {"queue": NOOP_QUEUE}},
)


@app.task(name="bench_bare.noop")
def noop(seq: int = 0, sent_at: float = 0.0) -> None:
    """Does nothing; with `sent_at`, records its latency first (as the bus's bench handler does)."""
    if sent_at:
        bench_probe.started(seq, sent_at)


@app.task(name="bench_bare.fan")
def fan(seq: int = 0) -> None:
    """One copy of a fanned-out message: does nothing."""


__all__ = ["app", "bench_probe", "fan", "noop"]
