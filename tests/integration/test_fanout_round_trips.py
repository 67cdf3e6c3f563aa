"""Publishing an event on Redis is one round trip, whatever the number of subscribers (issue 9).

The bus's Redis transport makes the K copies of an event inside Redis, in one Lua
script (project/transport/redis_transport.py): the publisher sends one EVALSHA per event, and
the script reads the binding table and pushes one copy per bound queue. Redis's own
counters (INFO commandstats) show it on a real server.
"""
from __future__ import annotations

import base64
import json
from typing import Iterator

import pytest
import redis
from kombu import Connection, Exchange, Producer, Queue

from project.testing import isolation
from project.transport import redis_transport
from tests.integration.support.bus_services import require

pytestmark = pytest.mark.integration
EVENTS = 40


@pytest.fixture
def redis_url() -> Iterator[str]:
    require("redis")
    cleanups: list = []
    number = isolation.claim_redis_db(cleanups, "redis://127.0.0.1:6379")
    url = f"redis://127.0.0.1:6379/{number}"
    try:
        yield url
    finally:
        redis.Redis.from_url(url).flushdb()
        for step in reversed(cleanups):
            step()


@pytest.fixture
def bus_redis(redis_url: str) -> Iterator[tuple[redis.Redis, object]]:
    """A client for Redis's counters, and a channel of the bus's transport, on the claimed database."""
    redis_transport.install()
    with Connection(redis_url) as connection:
        yield redis.Redis.from_url(redis_url), connection.channel()


def calls(client: redis.Redis) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): stats["calls"] for name, stats in client.info("commandstats").items()}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The commands Redis ran between two `calls()` readings (the INFO reading itself left out)."""
    changed = {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}
    changed.pop("info", None)
    return changed


def event_exchange(channel, name: str, k: int) -> tuple[list[Queue], Producer]:
    """`events.<name>` with K durable queues `<name>.sub_<i>` bound to it, and a JSON producer for it."""
    exchange = Exchange(f"events.{name}", type="fanout", durable=True)
    queues = [Queue(f"{name}.sub_{i}", exchange, durable=True) for i in range(k)]
    for queue in queues:
        queue(channel).declare()
    return queues, Producer(channel, exchange=exchange, serializer="json")


@pytest.mark.parametrize("k", [1, 16])
def test_given_k_subscriber_queues_when_events_are_published_then_each_is_one_evalsha(bus_redis, k: int):
    admin, channel = bus_redis
    # Given a durable event exchange with K bound queues, and the script loaded by a first publish
    queues, producer = event_exchange(channel, f"round_trip_{k}", k)
    producer.publish({"n": -1})
    before = calls(admin)
    # When N events are published
    for n in range(EVENTS):
        producer.publish({"n": n}, delivery_mode=2)
    after = calls(admin)
    # Then the publisher sent one EVALSHA per event; the K copies were pushed inside it
    assert delta(before, after) == {"evalsha": EVENTS, "smembers": EVENTS, "lpush": EVENTS * k}
    # And every queue holds every event once, each copy with a delivery tag of its own
    tags = set()
    for queue in queues:
        items = [json.loads(item) for item in admin.lrange(queue.name, 0, -1)]
        assert sorted(json.loads(base64.b64decode(item["body"]))["n"] for item in items) == list(range(-1, EVENTS))
        tags |= {item["properties"]["delivery_tag"] for item in items}
    assert len(tags) == (EVENTS + 1) * k


def test_given_a_fanout_batch_when_it_ends_then_its_events_arrive_together_in_order(bus_redis):
    admin, channel = bus_redis
    queues, producer = event_exchange(channel, "batched", 3)
    # Given a batch in which events are published
    with channel.fanout_batch():
        for n in range(EVENTS):
            producer.publish({"n": n}, delivery_mode=2)
        # Then nothing has been sent while the batch is open
        assert [admin.llen(q.name) for q in queues] == [0, 0, 0]
    # When it ends, Then every queue holds every event, in the order published (LPUSH: newest first)
    for queue in queues:
        bodies = [json.loads(base64.b64decode(json.loads(item)["body"]))["n"]
                  for item in admin.lrange(queue.name, 0, -1)]
        assert bodies == list(reversed(range(EVENTS)))


def test_given_a_fanout_batch_when_its_block_raises_then_nothing_is_sent(bus_redis):
    admin, channel = bus_redis
    [queue], producer = event_exchange(channel, "batched_failing", 1)
    # Given a batch whose block fails after publishing (the outbox then marks nothing published)
    with pytest.raises(RuntimeError):
        with channel.fanout_batch():
            producer.publish({"n": 1}, delivery_mode=2)
            raise RuntimeError("the relay failed mid-batch")
    # Then none of its events was sent, and the channel publishes at once again
    assert admin.llen(queue.name) == 0
    producer.publish({"n": 2}, delivery_mode=2)
    assert admin.llen(queue.name) == 1


def test_given_a_batch_of_one_event_when_it_ends_then_it_is_one_evalsha_and_nothing_else(bus_redis):
    # (a worker's publish after commit is usually one event: no pipeline, no SCRIPT EXISTS)
    admin, channel = bus_redis
    _, producer = event_exchange(channel, "batch_of_one", 4)
    producer.publish({"n": 0})
    before = calls(admin)
    with channel.fanout_batch():
        producer.publish({"n": 1}, delivery_mode=2)
    after = calls(admin)
    assert delta(before, after) == {"evalsha": 1, "smembers": 1, "lpush": 4}
