"""The in-process harness and real workers on a real broker agree, scenario by scenario.

Each scenario runs twice: in process by the harness (project/testing/harness.py), and on Redis
with a real worker whose ports fail the same way (BUS_FAIL_PORTS). Both runs are
summarised from their own database with the same queries; the summaries must be equal.
- an order sent twice with one key while the payment gateway fails twice, and a registration;
- retries past three and exhaustion: the welcome SMS fails 4 times and then succeeds (the
  default subscriber policy allows 5 retries), the welcome e-mail always fails and is
  dead-lettered after 1 + 5 attempts;
- refusals: a registration refused by a domain rule (a duplicate of it gets the same
  error) and an order whose key was first used with another payload (a conflict).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest
from sqlalchemy import text

from tests.integration.conftest import opened
from tests.integration.support.scenarios import RemoteError, Scenario

pytestmark = pytest.mark.integration

ORDER, USER = "handlers.messages.PlaceOrder", "handlers.messages.RegisterUser"
ITEMS = [{"sku": "book", "quantity": 2, "unit_price": "12.50"}]
OTHER_ITEMS = [{"sku": "pen", "quantity": 1, "unit_price": "2.00"}]
ADA = {"user_id": "u-1", "email": "ada@example.com", "name": "Ada"}
#: billing, order confirmation, fulfilment's OrderPlaced, StockReserved and PaymentProcessed steps, welcome
#: e-mail, welcome SMS, audit
EXPECTED_DELIVERIES = 8
#: books for the order: fulfilment reserves them and ships (the charge comes ~1.5 s after the reservation,
#: after its two injected failures, so the two fulfilment steps do not race into a version conflict)
SHELVES = {"book": 10}

SUMMARY = {
    "commands": "select task, status, duplicates from bus_commands order by task, status, duplicates",
    "deliveries": "select subscriber, count(*) from bus_inbox group by subscriber order by subscriber",
    "events": "select name, count(*) from bus_outbox where kind = 'event' group by name order by name",
    "effects": "select port, count(*) from port_calls group by port order by port",
    "dead_letters": "select task, reason from bus_dead_letters order by task, reason",
    "executions": "select task, state, attempts from bus_executions order by task, state, attempts",
}


@pytest.fixture
def redis_scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    with opened("redis", "sqlite", tmp_path_factory, "agree") as scenario:
        yield scenario


def summary(connect) -> dict:
    with connect() as conn:
        return {name: [tuple(row) for row in conn.execute(text(sql))] for name, sql in SUMMARY.items()}


def count(scenario: Scenario, sql: str) -> int:
    return scenario.rows(sql)[0][0]


def restocked(engine) -> None:
    from adapters.repositories import restock
    with engine.begin() as conn:
        restock(conn, SHELVES)


def wait_until_shipped(scenario: Scenario) -> None:
    scenario.wait_for("fulfilment to ship the order", lambda: count(
        scenario, "select count(*) from bus_commands where task = 'shipping.ship_order' and status = 'succeeded'"), 30)


def error_type(outcome: Callable[[], Any]) -> str:
    """The qualified name of the exception `outcome()` raises (a worker's arrives as RemoteError)."""
    try:
        outcome()
    except RemoteError as exc:
        return exc.type
    except Exception as exc:  # noqa: BLE001 - the harness raises the error itself
        return f"{type(exc).__module__}.{type(exc).__qualname__}"
    raise AssertionError("expected an error, got a result")


def test_harness_and_redis_workers_agree(bus_harness, redis_scenario: Scenario):
    # Given the scenario run in process by the harness
    from handlers.messages import PlaceOrder, RegisterUser
    restocked(bus_harness.bus.engine())
    bus_harness.fail("gateway", times=2)
    for _ in range(2):
        bus_harness.send(PlaceOrder(order_id="o-1", customer_id="c-1", items=ITEMS), idempotency_key="k-1")
    bus_harness.send(RegisterUser(**ADA))
    bus_harness.run_until_idle()
    in_process = summary(bus_harness.bus.engine().connect)

    # When the same scenario runs on Redis with a real worker whose gateway fails twice
    scenario = redis_scenario
    restocked(scenario.engine())
    scenario.start_worker(env={"BUS_FAIL_PORTS": "gateway=2"}, concurrency=2)
    client = scenario.driver()
    ids = [client.send(ORDER, idempotency_key="k-1", order_id="o-1", customer_id="c-1", items=ITEMS)
           for _ in range(2)]
    ids.append(client.send(USER, **ADA))
    for task_id in ids:
        client.get(task_id)
    scenario.wait_for("every subscriber to handle its event",
                      lambda: count(scenario, "select count(*) from bus_inbox") >= EXPECTED_DELIVERIES, 60)
    scenario.wait_for("PaymentProcessed in the outbox", lambda: count(
        scenario, "select count(*) from bus_outbox where name = 'events.payment_processed'") == 1, 30)
    wait_until_shipped(scenario)
    on_redis = summary(scenario.engine().connect)

    # Then both runs placed, charged, notified and published the same, and both retried billing twice
    assert in_process == on_redis
    assert in_process["effects"] == [("gateway", 1), ("mail", 2), ("sms", 1)]
    assert bus_harness.retries("billing.charge_payment") == 2
    injected = sorted((scenario.home / "injected-failures").glob("gateway-*"))
    assert [p.read_text() for p in injected] == ["2"]


def test_harness_and_redis_workers_agree_on_retries_past_three_and_exhaustion(
        bus_harness, redis_scenario: Scenario):
    # Given a registration run in process while the SMS port fails 4 times and the mailer always
    from handlers.messages import RegisterUser
    bus_harness.fail("sms", times=4)
    bus_harness.fail("mailer", times=99)
    bus_harness.send(RegisterUser(**ADA))
    bus_harness.run_until_idle()
    in_process = summary(bus_harness.bus.engine().connect)

    # When the same registration runs on Redis with a real worker whose ports fail the same way
    scenario = redis_scenario
    scenario.start_worker(env={"BUS_FAIL_PORTS": "sms=4,mail=99"}, concurrency=2)
    client = scenario.driver()
    client.get(client.send(USER, **ADA))
    scenario.wait_for("the SMS and the audit entry", lambda: count(
        scenario, "select count(*) from bus_inbox") >= 2, 60)
    scenario.wait_for("the e-mail's dead letter", lambda: count(
        scenario, "select count(*) from bus_dead_letters") >= 1, 90)
    on_redis = summary(scenario.engine().connect)

    # Then both retried the SMS past three times to success, and gave the e-mail up after
    # 1 + 5 attempts with one dead letter
    assert in_process == on_redis
    assert in_process["executions"] == [
        ("accounts.register_user", "succeeded", 1), ("audit.record_user_created", "succeeded", 1),
        ("notifications.send_welcome_email", "dead-lettered", 6), ("notifications.send_welcome_sms", "succeeded", 5)]
    assert in_process["dead_letters"] == [("notifications.send_welcome_email", "retries-exhausted")]
    assert in_process["effects"] == [("sms", 1)]  # no e-mail sent
    assert bus_harness.outcomes("notifications.send_welcome_email") == ["retried"] * 5 + ["dead-lettered"]


def test_harness_and_redis_workers_agree_on_domain_refusals_and_conflicts(bus_harness, redis_scenario: Scenario):
    # Given, in process: Ada registers; another user with her e-mail is refused, twice with
    # one key; an order is placed, then its key is reused for another order
    from handlers.messages import PlaceOrder, RegisterUser
    taken = {**ADA, "user_id": "u-2", "name": "Eve"}
    restocked(bus_harness.bus.engine())
    harness_errors = []
    for command, key, expect_error in [
            (RegisterUser(**ADA), None, False), (RegisterUser(**taken), "k-eve", True),
            (RegisterUser(**taken), "k-eve", True),
            (PlaceOrder(order_id="o-1", customer_id="c-1", items=ITEMS), "k-1", False),
            (PlaceOrder(order_id="o-2", customer_id="c-1", items=OTHER_ITEMS), "k-1", True)]:
        message_id = bus_harness.send(command, idempotency_key=key)
        bus_harness.run_until_idle()
        if expect_error:
            harness_errors.append(error_type(lambda: bus_harness.result(message_id)))
    in_process = summary(bus_harness.bus.engine().connect)

    # When the same commands are sent, one after the other, to a real worker on Redis
    scenario = redis_scenario
    restocked(scenario.engine())
    # one pool process: fulfilment's steps of the order (its charge is not slowed here) cannot race into a
    # version conflict, whose retry the sequential harness would not have
    scenario.start_worker(concurrency=1)
    client = scenario.driver()
    worker_errors = []
    for contract, key, fields, expect_error in [
            (USER, None, ADA, False), (USER, "k-eve", taken, True), (USER, "k-eve", taken, True),
            (ORDER, "k-1", {"order_id": "o-1", "customer_id": "c-1", "items": ITEMS}, False),
            (ORDER, "k-1", {"order_id": "o-2", "customer_id": "c-1", "items": OTHER_ITEMS}, True)]:
        message_id = client.send(contract, idempotency_key=key, **fields)
        if expect_error:
            worker_errors.append(error_type(lambda: client.get(message_id)))
        else:
            client.get(message_id)
    scenario.wait_for("the refused duplicate to be counted", lambda: count(
        scenario, "select count(*) from bus_commands where status = 'failed' and duplicates = 1") == 1, 30)
    scenario.wait_for("every subscriber to handle its event",
                      lambda: count(scenario, "select count(*) from bus_inbox") >= EXPECTED_DELIVERIES, 60)
    scenario.wait_for("PaymentProcessed in the outbox", lambda: count(
        scenario, "select count(*) from bus_outbox where name = 'events.payment_processed'") == 1, 30)
    wait_until_shipped(scenario)
    on_redis = summary(scenario.engine().connect)

    # Then both refused the taken e-mail (its duplicate with the same error, the handler ran
    # once) and the reused key (dead-lettered as a conflict), and changed the same state
    assert worker_errors == harness_errors == [
        "handlers.accounts.EmailAlreadyRegistered", "handlers.accounts.EmailAlreadyRegistered",
        "project.errors.IdempotencyConflict"]
    assert in_process == on_redis
    assert ("accounts.register_user", "failed", 1) in in_process["commands"]
    assert in_process["dead_letters"] == [("orders.place_order", "conflict")]
    assert ("accounts.register_user", "refused", 1) in in_process["executions"]
