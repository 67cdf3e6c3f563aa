"""Commands end to end: every way of sending reaches the one handler, once per key.

Runs on every (broker, database) pair, against the shared worker of the pair (see
conftest.py); each test uses ids and keys of its own.
"""
from __future__ import annotations

import pytest

from tests.integration.support.helpers import (
    ITEMS,
    ITEMS_TOTAL,
    PLACE_ORDER,
    PLACE_ORDER_CONTRACT,
    REGISTER_USER,
    REGISTER_USER_CONTRACT,
    order,
)
from tests.integration.support.scenarios import RemoteError, Scenario

pytestmark = pytest.mark.integration


def orders_rows(cluster: Scenario, order_id: str) -> list:
    return cluster.rows("SELECT order_id, customer_id, total FROM orders WHERE order_id = :id", id=order_id)


def claim(cluster: Scenario, task: str, key: str):
    """The idempotency claim of (task, key): status, absorbed duplicates, result."""
    rows = cluster.rows("SELECT status, duplicates, result, error_type FROM bus_commands "
                        "WHERE task = :t AND key = :k", t=task, k=key)
    return rows[0] if rows else None


def absorbed(cluster: Scenario, task: str, key: str) -> int:
    found = claim(cluster, task, key)
    return found.duplicates if found else 0


def dead_letters(cluster: Scenario, message_id: str) -> list:
    return cluster.rows("SELECT reason, error, attempts, task FROM bus_dead_letters WHERE message_id = :id",
                        id=message_id)


def test_delay_twice_with_one_key_runs_the_handler_once_and_shares_the_first_result(cluster: Scenario, uid: str):
    # Given an order sent with .delay() and an idempotency key, and its result
    fields, key = order(f"o-{uid}"), f"checkout-{uid}"
    first = cluster.client.delay(PLACE_ORDER, idempotency_key=key, **fields)
    assert cluster.client.get(first) == {"order_id": f"o-{uid}", "total": ITEMS_TOTAL}

    # When the same command is sent again with the same key
    second = cluster.client.delay(PLACE_ORDER, idempotency_key=key, **fields)

    # Then both sends share one AsyncResult id, whose .get() is the first result,
    assert second == first
    assert cluster.client.get(second) == {"order_id": f"o-{uid}", "total": ITEMS_TOTAL}
    # and the worker absorbed the second delivery: one order row, the handler ran once
    cluster.wait_for("the duplicate to be absorbed", lambda: absorbed(cluster, PLACE_ORDER, key) == 1)
    assert claim(cluster, PLACE_ORDER, key).status == "succeeded"
    assert len(orders_rows(cluster, f"o-{uid}")) == 1


def test_without_a_key_the_contracts_natural_key_dedupes(cluster: Scenario, uid: str):
    # Given PlaceOrder declares order_id as its natural key, and an order sent without a key
    fields = order(f"o-{uid}")
    first = cluster.client.delay(PLACE_ORDER, **fields)
    cluster.client.get(first)

    # When the same order is sent again, still without a key
    second = cluster.client.delay(PLACE_ORDER, **fields)

    # Then the key is "order_id=<id>": the same task id, and the handler ran once
    assert second == first
    cluster.wait_for("the duplicate to be absorbed", lambda: absorbed(cluster, PLACE_ORDER, f"order_id=o-{uid}") == 1)
    assert len(orders_rows(cluster, f"o-{uid}")) == 1


def test_delay_bus_send_plain_send_task_and_a_foreign_app_reach_the_same_handler(cluster: Scenario, uid: str):
    # Given four senders: the task's .delay(), bus.send(contract), our app's plain
    # send_task, and a foreign bare Celery() app that knows only the broker URL
    delayed = cluster.client.delay(PLACE_ORDER, idempotency_key=f"k1-{uid}", **order(f"o1-{uid}"))
    sent = cluster.client.send(PLACE_ORDER_CONTRACT, idempotency_key=f"k2-{uid}", **order(f"o2-{uid}"))
    plain = cluster.client.send_task(PLACE_ORDER, order(f"o3-{uid}"))
    [foreign] = cluster.foreign_send([{"kind": "task", "name": PLACE_ORDER, "kwargs": order(f"o4-{uid}"),
                                       "queue": PLACE_ORDER}])

    # When the worker has handled them
    results = [cluster.client.get(task_id) for task_id in (delayed, sent, plain, foreign)]

    # Then each reached handlers.orders.place_order: its result and one order row each
    assert results == [{"order_id": f"o{n}-{uid}", "total": ITEMS_TOTAL} for n in (1, 2, 3, 4)]
    for n in (1, 2, 3, 4):
        assert orders_rows(cluster, f"o{n}-{uid}") == [(f"o{n}-{uid}", "c-1", ITEMS_TOTAL)]


def test_delay_and_bus_send_with_one_key_share_one_result(cluster: Scenario, uid: str):
    # Given an order sent with .delay() and a key
    fields, key = order(f"o-{uid}"), f"checkout-{uid}"
    delayed = cluster.client.delay(PLACE_ORDER, idempotency_key=key, **fields)
    cluster.client.get(delayed)

    # When another service sends the same command with bus.send() and the same key
    sent = cluster.client.send(PLACE_ORDER_CONTRACT, idempotency_key=key, **fields)

    # Then it is the same AsyncResult, and the handler did not run again
    assert sent == delayed
    cluster.wait_for("the duplicate to be absorbed", lambda: absorbed(cluster, PLACE_ORDER, key) == 1)
    assert len(orders_rows(cluster, f"o-{uid}")) == 1


def test_same_key_with_another_payload_is_refused_with_a_conflict(cluster: Scenario, uid: str):
    # Given an order placed by customer c-1 with key K
    key = f"checkout-{uid}"
    first = cluster.client.delay(PLACE_ORDER, idempotency_key=key, **order(f"o-{uid}", "c-1"))
    cluster.client.get(first)

    # When K is reused for a different payload (other customer, other items)
    other_items = [{"sku": "lamp", "quantity": 1, "unit_price": "30.00"}]
    conflicting = cluster.client.delay(PLACE_ORDER, idempotency_key=key, **order(f"o-{uid}", "c-2", other_items))

    # Then it gets a result of its own, whose .get() raises IdempotencyConflict naming
    # the key and the fields that differ
    assert conflicting != first
    with pytest.raises(RemoteError) as refused:
        cluster.client.get(conflicting)
    assert refused.value.type == "project.errors.IdempotencyConflict"
    assert repr(key) in refused.value.message
    assert "fields that differ: customer_id, items" in refused.value.message
    # and the handler did not run: the order is still the first customer's
    assert orders_rows(cluster, f"o-{uid}") == [(f"o-{uid}", "c-1", ITEMS_TOTAL)]
    # and the refused message is kept as a dead letter with reason 'conflict'
    [dead] = dead_letters(cluster, conflicting)
    assert (dead.reason, dead.task) == ("conflict", PLACE_ORDER)
    assert "customer_id" in dead.error
    # while the first caller's result is untouched
    assert cluster.client.get(first) == {"order_id": f"o-{uid}", "total": ITEMS_TOTAL}


def test_domain_error_reaches_the_caller_and_a_duplicate_gets_it_without_a_rerun(cluster: Scenario, uid: str):
    # Given ada@ is registered, and a second registration of ada@ with key K was refused
    email = f"ada-{uid}@example.com"
    cluster.client.get(cluster.client.send(REGISTER_USER_CONTRACT, user_id=f"u1-{uid}", email=email, name="Ada"))
    key, second = f"signup-{uid}", {"user_id": f"u2-{uid}", "email": email, "name": "Ada B"}
    refused = cluster.client.delay(REGISTER_USER, idempotency_key=key, **second)
    with pytest.raises(RemoteError) as error:
        cluster.client.get(refused)
    assert error.value.type == "handlers.accounts.EmailAlreadyRegistered"
    assert f"{email} is already registered" in error.value.message

    # When the address becomes free, and the refused command is sent again with K
    with cluster.engine().begin() as conn:
        conn.exec_driver_sql("DELETE FROM users WHERE user_id = ?" if cluster.database == "sqlite"
                             else "DELETE FROM users WHERE user_id = %s", (f"u1-{uid}",))
    duplicate = cluster.client.delay(REGISTER_USER, idempotency_key=key, **second)

    # Then the duplicate replays the stored refusal instead of running the handler again:
    assert duplicate == refused
    cluster.wait_for("the duplicate to be absorbed", lambda: absorbed(cluster, REGISTER_USER, key) == 1)
    assert claim(cluster, REGISTER_USER, key).error_type == "handlers.accounts.EmailAlreadyRegistered"
    with pytest.raises(RemoteError) as again:
        cluster.client.get(duplicate)
    assert again.value.type == "handlers.accounts.EmailAlreadyRegistered"
    assert cluster.rows("SELECT user_id FROM users WHERE user_id = :u", u=f"u2-{uid}") == []


def test_caller_side_validation_raises_and_publishes_nothing(cluster: Scenario, uid: str):
    # Given a PlaceOrder with an empty customer id and no items
    bad = {"order_id": f"o-{uid}", "customer_id": "", "items": []}

    # When it is sent with .delay() or bus.send()
    with pytest.raises(RemoteError) as by_delay:
        cluster.client.delay(PLACE_ORDER, idempotency_key=f"k-{uid}", **bad)
    with pytest.raises(RemoteError) as by_send:
        cluster.client.send(PLACE_ORDER_CONTRACT, **bad)

    # Then the caller gets pydantic's ValidationError naming the fields
    for raised in (by_delay.value, by_send.value):
        assert raised.type == "pydantic_core._pydantic_core.ValidationError"
        assert "customer_id" in raised.message and "items" in raised.message
    # and nothing was published: once a valid order sent after them is done, the worker
    # has seen no message of them (no claim, no dead letter, no order)
    cluster.client.get(cluster.client.delay(PLACE_ORDER, **order(f"after-{uid}")))
    assert claim(cluster, PLACE_ORDER, f"k-{uid}") is None
    assert not any(f"o-{uid}".encode() in bytes(row.body) for row in cluster.rows(
        "SELECT body FROM bus_dead_letters WHERE task = :t", t=PLACE_ORDER))
    assert orders_rows(cluster, f"o-{uid}") == []


@pytest.mark.parametrize("how, arguments, expected", [
    ("delay_positional", {"task": PLACE_ORDER, "args": ["o-1", "c-1", ITEMS]},
     "takes the fields of PlaceOrder as keywords"),
    ("apply_async", {"task": PLACE_ORDER, "kwargs": order("o-1"), "options": {"queue": REGISTER_USER}},
     "it goes to its own queue 'orders.place_order' and nowhere else"),
    ("apply_async", {"task": PLACE_ORDER, "kwargs": order("o-1"), "options": {"exchange": "events.order_placed"}},
     "publish an event from the handler instead"),
    ("send_object", {"value": {"order_id": "o-1"}}, "not a dict"),
    ("send_class", {"contract": PLACE_ORDER_CONTRACT}, "not the class PlaceOrder"),
    ("send", {"contract": "handlers.messages.OrderPlaced",
              "fields": {"order_id": "o-1", "customer_id": "c-1", "total": "1.00"}},
     "is an event, not a command"),
], ids=["positional-args", "other-queue", "event-exchange", "dict", "class", "event"])
def test_wrong_sends_fail_in_the_caller_with_a_hint(cluster: Scenario, how: str, arguments: dict, expected: str):
    # Given a sender that gets the API wrong
    # When it sends
    with pytest.raises(RemoteError) as raised:
        cluster.client.call(how, **arguments)
    # Then it gets an error that says what to do instead
    assert expected in raised.value.message


#: the race needs a database whose insert waits on another transaction's uncommitted row (SQLite has one writer)
on_postgresql = pytest.mark.parametrize("cluster", [pytest.param(pair, id=f"{pair[0]}-{pair[1]}")
                                                    for pair in (("redis", "postgresql"), ("amqp", "postgresql"))],
                                        indirect=True)


def insert_waiting_on_a_lock(cluster: Scenario) -> bool:
    return bool(cluster.rows("SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
                             "AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO users%'"))


@on_postgresql
def test_a_registration_that_loses_the_race_for_an_email_is_refused_not_dead_lettered(cluster: Scenario, uid: str):
    from adapters.orm import users
    from project.store.tables import utcnow
    email = f"race-{uid}@example.com"
    # Given another transaction that registered the e-mail and has not committed yet
    with cluster.engine().connect() as other:
        other.execute(users.insert().values(user_id=f"first-{uid}", email=email, name="First", created_at=utcnow()))
        # When a registration of the same e-mail runs: its check cannot see that row, its INSERT waits on it,
        refused = cluster.client.delay(REGISTER_USER, user_id=f"second-{uid}", email=email, name="Second")
        cluster.wait_for("the registration's INSERT to wait on the other transaction",
                         lambda: insert_waiting_on_a_lock(cluster))
        # ... and the other transaction commits (the INSERT fails on the unique e-mail)
        other.commit()

    # Then the registration is refused like any taken e-mail: the refusal reaches the caller and is stored
    with pytest.raises(RemoteError) as error:
        cluster.client.get(refused)
    assert error.value.type == "handlers.accounts.EmailAlreadyRegistered"
    [(status, error_type)] = cluster.rows("SELECT status, error_type FROM bus_commands WHERE message_id = :m",
                                          m=refused)
    assert (status, error_type) == ("failed", "handlers.accounts.EmailAlreadyRegistered")
    # ... after one retry of the lost race, and nothing was dead-lettered
    assert cluster.rows("SELECT state, attempts FROM bus_executions WHERE message_id = :m",
                        m=refused) == [("refused", 2)]
    assert dead_letters(cluster, refused) == []
    assert cluster.rows("SELECT user_id FROM users WHERE email = :e", e=email) == [(f"first-{uid}",)]
