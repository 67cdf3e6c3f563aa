"""The send path and Celery's Redis result backend, on a real Redis (no worker: results are stored as a worker does).

A `.delay()` no longer subscribes to its result's channel (Celery does on every send, and
unsubscribes when the AsyncResult is dropped: two more Redis commands per send). A caller
that waits subscribes then, and reads the stored result after subscribing, so a result
stored before or while it waits reaches it.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import redis
from celery import Celery, states

from handlers.messages import PlaceOrder
from project.core import Bus
from project.settings import Settings
from project.store import results
from project.testing import isolation
from tests.integration.support.bus_services import require

pytestmark = pytest.mark.integration
REDIS = "redis://127.0.0.1:6379"
FIELDS = {"order_id": "o-1", "customer_id": "c-1", "items": [{"sku": "book", "quantity": 2, "unit_price": "12.50"}]}


def place_order(cmd: PlaceOrder) -> dict:
    return {"order_id": cmd.order_id}


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[Bus]:
    """A bus whose results are in a Redis database of this test's own; messages go to kombu's memory transport."""
    require("redis")
    cleanups: isolation.Cleanups = []
    url = f"{REDIS}/{isolation.claim_redis_db(cleanups, REDIS)}"
    app = Celery(f"send-path-{tmp_path.name}", broker="memory://", backend=results.backend_url(url),
                 set_as_current=False)
    app.conf.task_routes = ("project.messaging.routing.route_by_name",)
    bus = Bus(app)
    bus.settings = Settings(home=tmp_path, broker_url="memory://", database_url=f"sqlite:///{tmp_path}/bus.db",
                            result_backend=url, embedded=False)
    bus.place_order = bus.command(PlaceOrder)(place_order)
    bus.redis = redis.Redis.from_url(url)
    try:
        yield bus
    finally:
        app.close()
        bus.redis.close()
        for cleanup in reversed(cleanups):
            cleanup()


def subscribers(bus: Bus, task_id: str) -> int:
    """How many Redis clients listen on the channel a result of `task_id` is published to."""
    channel = bus.app.backend.get_key_for_task(task_id)
    return dict(bus.redis.pubsub_numsub(channel))[channel]


def test_a_send_does_not_subscribe_to_its_result(bus: Bus):
    # Given a command sent with .delay(), its AsyncResult kept by the caller
    result = bus.place_order.delay(**FIELDS, idempotency_key="k-1")
    # Then nobody listens on its result's channel (Celery's backend would subscribe at the send)
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        assert subscribers(bus, result.id) == 0
        time.sleep(0.05)


def test_get_returns_a_result_stored_before_the_caller_waits(bus: Bus):
    # Given a sent command whose result a worker stored (SET and PUBLISH) before anyone waited
    result = bus.place_order.delay(**FIELDS, idempotency_key="k-2")
    bus.app.backend.store_result(result.id, {"order_id": "o-1"}, states.SUCCESS)
    # When the caller waits, Then it gets the stored result
    assert result.get(timeout=5) == {"order_id": "o-1"}


def test_get_is_woken_by_a_result_stored_while_it_waits(bus: Bus):
    # Given a caller already waiting on a sent command's result
    result = bus.place_order.delay(**FIELDS, idempotency_key="k-3")
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(result.get(timeout=20)))
    waiter.start()
    deadline = time.monotonic() + 10
    while subscribers(bus, result.id) == 0:  # it subscribes as it starts to wait
        assert time.monotonic() < deadline, "the waiting get() never subscribed to its result"
        time.sleep(0.02)
    # When the worker stores the result, Then the waiter is woken with it (by the PUBLISH: nothing polls)
    started = time.monotonic()
    bus.app.backend.store_result(result.id, {"order_id": "o-1"}, states.SUCCESS)
    waiter.join(timeout=10)
    assert got == [{"order_id": "o-1"}]
    assert time.monotonic() - started < 5
