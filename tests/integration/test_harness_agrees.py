"""The in-process harness and real workers on a real broker agree on one scenario.

Scenario: an order sent twice with one idempotency key while the payment gateway fails
its first two calls, and one user registration. Both runs are summarised from their
own database with the same queries; the summaries must be equal.
"""
from __future__ import annotations

from typing import Iterator

import pytest
from sqlalchemy import text

from tests.integration.conftest import opened
from tests.integration.scenarios import Scenario

ITEMS = [{"sku": "book", "quantity": 2, "unit_price": "12.50"}]
EXPECTED_DELIVERIES = 5  # billing, order confirmation, welcome e-mail, welcome SMS, audit

SUMMARY = {
    "commands": "select task, status, duplicates from bus_commands order by task",
    "deliveries": "select subscriber, count(*) from bus_inbox group by subscriber order by subscriber",
    "events": "select name, count(*) from bus_outbox where kind = 'event' group by name order by name",
    "effects": "select port, count(*) from port_calls group by port order by port",
    "dead_letters": "select task, reason from bus_dead_letters order by task",
}


@pytest.fixture
def redis_scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    with opened("redis", "sqlite", tmp_path_factory, "agree") as scenario:
        yield scenario


def summary(connect) -> dict:
    with connect() as conn:
        return {name: [tuple(row) for row in conn.execute(text(sql))] for name, sql in SUMMARY.items()}


def test_harness_and_redis_workers_agree(bus_harness, redis_scenario: Scenario):
    # Given the scenario run in process by the harness
    from handlers.messages import PlaceOrder, RegisterUser
    bus_harness.fail("gateway", times=2)
    for _ in range(2):
        bus_harness.send(PlaceOrder(order_id="o-1", customer_id="c-1", items=ITEMS), idempotency_key="k-1")
    bus_harness.send(RegisterUser(user_id="u-1", email="ada@example.com", name="Ada"))
    bus_harness.run_until_idle()
    in_process = summary(bus_harness.bus.engine().connect)

    # When the same scenario runs on Redis with a real worker whose gateway fails twice
    scenario = redis_scenario
    scenario.start_worker(env={"BUS_FAIL_PORTS": "gateway=2"}, concurrency=2)
    client = scenario.driver()
    ids = [client.send("handlers.messages.PlaceOrder", idempotency_key="k-1", order_id="o-1",
                       customer_id="c-1", items=ITEMS) for _ in range(2)]
    ids.append(client.send("handlers.messages.RegisterUser", user_id="u-1", email="ada@example.com", name="Ada"))
    for task_id in ids:
        client.get(task_id)
    scenario.wait_for("every subscriber to handle its event",
                      lambda: scenario.rows("select count(*) from bus_inbox")[0][0] >= EXPECTED_DELIVERIES, 60)
    scenario.wait_for("PaymentProcessed in the outbox",
                      lambda: scenario.rows("select count(*) from bus_outbox where name = 'events.payment_processed'"
                                            )[0][0] == 1, 30)
    on_redis = summary(scenario.engine().connect)

    # Then both runs placed, charged, notified and published the same, and both retried billing twice
    assert in_process == on_redis
    assert in_process["effects"] == [("gateway", 1), ("mail", 2), ("sms", 1)]
    assert bus_harness.retries("billing.charge_payment") == 2
    injected = sorted((scenario.home / "injected-failures").glob("gateway-*"))
    assert [p.read_text() for p in injected] == ["2"]
