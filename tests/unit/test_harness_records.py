"""What `bus_harness` hands back for assertions are records with named fields, not database rows.

A newcomer wrote `dead["reason"]` and got a TypeError from SQLAlchemy's Row (a tuple):
a dead letter is a frozen `DeadLetter` that reads both ways, `dead.reason` and
`dead["reason"]`, and says which fields it has when asked for another.
"""
from __future__ import annotations

import dataclasses
from datetime import datetime

import pytest

from handlers.messages import PlaceOrder
from project.store.tables import dead_letters
from project.testing.records import DeadLetter

ITEMS = [{"sku": "book", "quantity": 1, "unit_price": "1.00"}]


@pytest.fixture
def conflict(bus_harness) -> DeadLetter:
    """The dead letter of an order sent again with its key and another customer."""
    bus_harness.send(PlaceOrder(order_id="o-1", customer_id="c-1", items=ITEMS), idempotency_key="k")
    bus_harness.send(PlaceOrder(order_id="o-1", customer_id="c-2", items=ITEMS), idempotency_key="k")
    bus_harness.run_until_idle()
    [dead] = bus_harness.dead_letters("orders.place_order")
    return dead


def test_a_dead_letter_reads_by_attribute_and_by_key(conflict):
    # Then both spellings give the stored values, typed
    assert isinstance(conflict, DeadLetter)
    assert conflict["reason"] == conflict.reason == "conflict"
    assert conflict["task"] == "orders.place_order" and "customer_id" in conflict["error"]
    assert isinstance(conflict.id, int) and isinstance(conflict.last_failed_at, datetime)
    assert isinstance(conflict.body, bytes) and conflict.attempts >= 1


def test_a_dead_letter_is_frozen_and_names_its_fields_when_asked_for_another(conflict):
    with pytest.raises(dataclasses.FrozenInstanceError):
        conflict.reason = "other"  # type: ignore[misc]
    with pytest.raises(KeyError, match="'raison' is not a field of DeadLetter; its fields: id, message_id, task"):
        conflict["raison"]


def test_dead_letters_of_another_name_and_of_all_names(bus_harness, conflict):
    assert bus_harness.dead_letters("billing.charge_payment") == []
    assert bus_harness.dead_letters() == [conflict]


def test_a_dead_letter_has_every_column_of_the_store():
    # Then a column added to bus_dead_letters is added to the record too
    assert [f.name for f in dataclasses.fields(DeadLetter)] == [c.name for c in dead_letters.columns]
