"""The reference domain's flows, tested with the package's own in-process harness (dogfood).

No broker, no Celery: the real registry, contracts, idempotency claims, outbox, inbox
and retry policies run against a fresh SQLite database, on a fake clock.
"""
from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import func, select

from adapters.orm import audit_log, port_calls
from handlers.accounts import EmailAlreadyRegistered
from handlers.messages import (
    OrderPlaced,
    PaymentProcessed,
    PlaceOrder,
    RegisterUser,
    UserAccountCreated,
)
from project.errors import IdempotencyConflict, InvalidMessage

ITEMS = [{"sku": "book", "quantity": 2, "unit_price": "12.50"}, {"sku": "pen", "quantity": 1, "unit_price": "1.99"}]


def order(order_id: str = "o-1", customer_id: str = "c-1") -> PlaceOrder:
    return PlaceOrder(order_id=order_id, customer_id=customer_id, items=ITEMS)


def effects(harness, port: str) -> int:
    with harness.bus.engine().connect() as conn:
        return conn.execute(select(func.count()).where(port_calls.c.port == port)).scalar_one()


def test_placing_an_order_twice_with_one_key_charges_and_thanks_once(bus_harness):
    # Given the same order sent twice with one idempotency key
    first = bus_harness.send(order(), idempotency_key="checkout-1")
    second = bus_harness.send(order(), idempotency_key="checkout-1")
    # When the bus runs until idle
    bus_harness.run_until_idle()
    # Then both sends share one id and the first result; the order was placed once
    assert first == second
    assert bus_harness.result(first) == {"order_id": "o-1", "total": "26.99"}
    assert bus_harness.outcomes("orders.place_order") == ["ran", "duplicate"]
    # ... one fact was published, and each subscriber handled it once
    assert bus_harness.published(OrderPlaced) == [OrderPlaced(order_id="o-1", customer_id="c-1",
                                                              total=Decimal("26.99"), quantities={"book": 2, "pen": 1})]
    assert bus_harness.handled("billing.charge_payment") == 1
    assert bus_harness.handled("notifications.send_order_confirmation") == 1
    assert effects(bus_harness, "gateway") == 1
    assert [p.order_id for p in bus_harness.published(PaymentProcessed)] == ["o-1"]


def test_a_failing_gateway_is_retried_alone_on_the_fake_clock(bus_harness):
    # Given a payment gateway that fails its next three calls
    bus_harness.fail("gateway", times=3)
    # When an order is placed
    bus_harness.send(order())
    bus_harness.run_until_idle()
    # Then billing retried three times and charged once; the confirmation ran once
    assert bus_harness.outcomes("billing.charge_payment") == ["retried"] * 3 + ["ran"]
    assert bus_harness.outcomes("notifications.send_order_confirmation") == ["ran"]
    assert effects(bus_harness, "gateway") == 1
    # ... and the backoff advanced the fake clock instead of sleeping
    assert bus_harness.clock.now > 0


def test_a_subscriber_that_never_recovers_is_dead_lettered(bus_harness):
    # Given an SMS port that keeps failing past the default policy (5 retries)
    bus_harness.fail("sms", times=100)
    # When a user registers
    bus_harness.send(RegisterUser(user_id="u-1", email="ada@example.com", name="Ada"))
    bus_harness.run_until_idle()
    # Then the SMS subscriber gave up after 6 attempts and its message is dead-lettered
    assert bus_harness.outcomes("notifications.send_welcome_sms") == ["retried"] * 5 + ["dead-lettered"]
    [dead] = bus_harness.dead_letters("notifications.send_welcome_sms")
    assert dead.reason == "retries-exhausted" and "ConnectionError" in dead.error and dead.traceback
    # ... while the welcome e-mail and the audit entry each happened once
    assert bus_harness.handled("notifications.send_welcome_email") == 1
    assert bus_harness.handled("audit.record_user_created") == 1
    with bus_harness.bus.engine().connect() as conn:
        assert conn.execute(select(func.count()).select_from(audit_log)).scalar_one() == 1


def test_registering_a_taken_email_is_refused_and_publishes_nothing(bus_harness):
    # Given a registered user
    bus_harness.send(RegisterUser(user_id="u-1", email="ada@example.com", name="Ada"))
    # When another account asks for the same e-mail address
    refused = bus_harness.send(RegisterUser(user_id="u-2", email="ada@example.com", name="Ada B"))
    bus_harness.run_until_idle()
    # Then it is refused with the domain error, and only the first account's event exists
    with pytest.raises(EmailAlreadyRegistered):
        bus_harness.result(refused)
    assert [e.user_id for e in bus_harness.published(UserAccountCreated)] == ["u-1"]


class CheckedBeforeTheOtherCommitted:
    """The users port as a transaction sees it when another one registers the same e-mail between the
    handler's check and its insert: the first `email_taken` answers False (the other had not committed);
    the insert then meets the other's row, as the database's unique constraint sees it."""

    def __init__(self, users, stale: list[int]) -> None:
        self.users, self.stale = users, stale

    def email_taken(self, email: str) -> bool:
        if self.stale[0] > 0:
            self.stale[0] -= 1
            return False
        return self.users.email_taken(email)

    def add(self, user_id: str, email: str, name: str) -> None:
        self.users.add(user_id, email, name)


@pytest.fixture
def racing_registration(bus_harness):
    """`stale(n)`: the next n e-mail checks miss a registration another transaction is committing."""
    original, stale = bus_harness.bus.provider("users"), [0]
    bus_harness.bus.provide("users", lambda uow: CheckedBeforeTheOtherCommitted(original(uow), stale))
    yield lambda n: stale.__setitem__(0, n)
    bus_harness.bus.provide("users", original)


def test_a_registration_that_loses_the_race_for_an_email_is_refused_not_dead_lettered(bus_harness,
                                                                                       racing_registration):
    # Given a registered user, and a second registration whose check ran before the first one committed
    bus_harness.send(RegisterUser(user_id="u-1", email="ada@example.com", name="Ada"))
    bus_harness.run_until_idle()
    racing_registration(1)
    # When the second one's insert meets the first one's row (a unique-constraint violation)
    refused = bus_harness.send(RegisterUser(user_id="u-2", email="ada@example.com", name="Ada B"))
    bus_harness.run_until_idle()
    # Then it ran once more, saw the row and was refused like any taken e-mail: stored, not dead-lettered
    assert bus_harness.outcomes("accounts.register_user") == ["ran", "retried", "refused"]
    with pytest.raises(EmailAlreadyRegistered):
        bus_harness.result(refused)
    assert bus_harness.dead_letters("accounts.register_user") == []


def test_a_second_unique_violation_in_a_row_is_a_bug_and_goes_to_the_policy(bus_harness, racing_registration):
    # Given a registered user, and a check that misses it twice in a row (not a race: a handler bug)
    bus_harness.send(RegisterUser(user_id="u-1", email="ada@example.com", name="Ada"))
    bus_harness.run_until_idle()
    racing_registration(2)
    # When a second registration of the e-mail is sent
    bus_harness.send(RegisterUser(user_id="u-2", email="ada@example.com", name="Ada B"))
    bus_harness.run_until_idle()
    # Then the one retry of a lost race is spent, and the command policy (no retry of IntegrityError) dead-letters it
    assert bus_harness.outcomes("accounts.register_user") == ["ran", "retried", "dead-lettered"]
    [dead] = bus_harness.dead_letters("accounts.register_user")
    assert dead.reason == "retries-exhausted" and "IntegrityError" in dead.error and "2 attempt(s)" in dead.error


def test_the_same_key_with_another_payload_is_a_conflict(bus_harness):
    # Given an order placed with key k
    bus_harness.send(order(customer_id="c-1"), idempotency_key="k")
    # When the same key comes with another customer
    conflicting = bus_harness.send(order(customer_id="c-2"), idempotency_key="k")
    bus_harness.run_until_idle()
    # Then the caller gets the conflict naming the differing field; nothing runs twice
    with pytest.raises(IdempotencyConflict, match="customer_id"):
        bus_harness.result(conflicting)
    assert [d.reason for d in bus_harness.dead_letters("orders.place_order")] == ["conflict"]
    assert len(bus_harness.published(OrderPlaced)) == 1


def test_an_invalid_foreign_message_is_dead_lettered_not_run(bus_harness):
    # Given a message whose fields do not fit the contract (as a foreign sender could send it)
    from project.messaging.execution import Delivery
    binding = bus_harness.bus.registry.commands["orders.place_order"]
    # When the bus executes it
    with pytest.raises(InvalidMessage, match="customer_id"):
        bus_harness.bus.execution.command(binding, {"order_id": "o-9", "items": []}, Delivery(binding.name, "m-1"))
    # Then nothing was placed or published, and the field errors are kept
    [dead] = bus_harness.dead_letters("orders.place_order")
    assert dead.reason == "invalid" and "items" in dead.error
    assert bus_harness.published(OrderPlaced) == []
