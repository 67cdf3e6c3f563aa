"""Publishing an event on Redis is one round trip, whatever the number of subscribers (issue 9).

The bus's Redis transport makes the K copies of an event inside Redis, in one Lua
script (project/redis_transport.py): the publisher sends one EVALSHA per event, and
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

from project import isolation, redis_transport
from tests.integration.bus_services import require

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


def calls(client: redis.Redis) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): stats["calls"] for name, stats in client.info("commandstats").items()}


@pytest.mark.parametrize("k", [1, 16])
def test_given_k_subscriber_queues_when_events_are_published_then_each_is_one_evalsha(redis_url: str, k: int):
    redis_transport.install()
    admin = redis.Redis.from_url(redis_url)
    # Given a durable event exchange with K bound queues, and the script loaded by a first publish
    with Connection(redis_url) as connection:
        channel = connection.channel()
        exchange = Exchange(f"events.round_trip_{k}", type="fanout", durable=True)
        queues = [Queue(f"round_trip_{k}.sub_{i}", exchange, durable=True) for i in range(k)]
        for queue in queues:
            queue(channel).declare()
        producer = Producer(channel, exchange=exchange, serializer="json")
        producer.publish({"n": -1})
        before = calls(admin)
        # When N events are published
        for n in range(EVENTS):
            producer.publish({"n": n}, delivery_mode=2)
        after = calls(admin)
    # Then the publisher sent one EVALSHA per event; the K copies were pushed inside it
    delta = {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}
    delta.pop("info", None)
    assert delta == {"evalsha": EVENTS, "smembers": EVENTS, "lpush": EVENTS * k}
    # And every queue holds every event once, each copy with a delivery tag of its own
    tags = set()
    for queue in queues:
        items = [json.loads(item) for item in admin.lrange(queue.name, 0, -1)]
        assert sorted(json.loads(base64.b64decode(item["body"]))["n"] for item in items) == list(range(-1, EVENTS))
        tags |= {item["properties"]["delivery_tag"] for item in items}
    assert len(tags) == (EVENTS + 1) * k
