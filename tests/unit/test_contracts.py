"""Contracts: names derive from the class and its boundary; the caller's key is reserved."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from handlers.messages import OrderPlaced, PlaceOrder, RegisterUser
from project.contracts import Command, Event, payload_hash, snake_case

ITEMS = [{"sku": "book", "quantity": 2, "unit_price": "12.50"}]


@pytest.mark.parametrize("name, snake", [
    ("PlaceOrder", "place_order"), ("RegisterUser", "register_user"), ("SendSMS", "send_sms"),
    ("UserAccountCreated", "user_account_created"), ("Charge2Card", "charge2_card"), ("X", "x"),
])
def test_snake_case(name, snake):
    assert snake_case(name) == snake


def test_command_task_and_queue_name_is_boundary_dot_snake_name():
    # Given the reference contracts, Then their task (= queue) names follow <boundary>.<snake_command>
    assert PlaceOrder.task_name() == "orders.place_order"
    assert RegisterUser.task_name() == "accounts.register_user"


def test_event_exchange_name_is_events_dot_snake_name():
    assert OrderPlaced.exchange_name() == "events.order_placed"


@pytest.mark.parametrize("base", [Command, Event])
def test_a_contract_must_name_its_boundary(base):
    # When a contract is declared without a boundary
    with pytest.raises(TypeError) as error:
        type("ShipParcel", (base,), {"__annotations__": {"parcel_id": str}})
    # Then the error shows how to declare it
    assert f'class ShipParcel({base.__name__}, boundary="orders")' in str(error.value)


@pytest.mark.parametrize("boundary", ["Orders", "orders-eu", "1orders", "", "orders.eu"])
def test_a_boundary_is_lowercase_letters_digits_and_underscores(boundary):
    with pytest.raises(TypeError) as error:
        class ShipParcel(Command, boundary=boundary):
            parcel_id: str
    assert f"got {boundary!r} (lowercase letters, digits and _ only)" in str(error.value)


def test_idempotency_key_is_reserved_for_the_caller():
    # When a contract declares a field named idempotency_key
    with pytest.raises(TypeError) as error:
        class ShipParcel(Command, boundary="shipping"):
            parcel_id: str
            idempotency_key: str
    # Then it is refused with the reason
    assert "`idempotency_key` is reserved for the caller's key; rename the field" in str(error.value)


def test_natural_key_must_name_fields_of_the_contract():
    with pytest.raises(TypeError) as error:
        class ShipParcel(Command, boundary="shipping", natural_key=("parcel",)):
            parcel_id: str
    assert "natural_key names unknown fields ['parcel']" in str(error.value)
    assert "['parcel_id']" in str(error.value)


def test_natural_key_value_joins_the_named_fields():
    class ShipParcel(Command, boundary="shipping", natural_key=("parcel_id", "carrier")):
        parcel_id: str
        carrier: str
        weight: int

    assert ShipParcel(parcel_id="p-1", carrier="ups", weight=3).natural_key_value() == "parcel_id=p-1|carrier=ups"
    assert RegisterUser(user_id="u", email="a@example.com", name="A").natural_key_value() is None


def test_contracts_are_immutable_and_strict_about_unknown_fields():
    command = PlaceOrder(order_id="o-1", customer_id="c-1", items=ITEMS)
    with pytest.raises(ValidationError):
        command.order_id = "o-2"  # type: ignore[misc]
    with pytest.raises(ValidationError) as error:
        PlaceOrder(order_id="o-1", customer_id="c-1", items=ITEMS, coupon="FREE")
    assert "coupon" in str(error.value)


def test_payload_hash_is_independent_of_key_order_and_changes_with_any_value():
    assert payload_hash({"a": 1, "b": [1, 2]}) == payload_hash({"b": [1, 2], "a": 1})
    assert payload_hash({"a": 1, "b": [1, 2]}) != payload_hash({"a": 1, "b": [2, 1]})
    first = PlaceOrder(order_id="o-1", customer_id="c-1", items=ITEMS)
    same = PlaceOrder(items=[dict(reversed(ITEMS[0].items()))], customer_id="c-1", order_id="o-1")
    other = PlaceOrder(order_id="o-1", customer_id="c-2", items=ITEMS)
    assert first.payload_hash() == same.payload_hash()
    assert first.payload_hash() != other.payload_hash()


def test_one_amount_written_two_ways_is_one_payload():
    # Given the same order line with its price written "12.5" and "12.50"
    from handlers.messages import PlaceOrder
    short = PlaceOrder(order_id="o-1", customer_id="c-1", items=[{"sku": "a", "quantity": 1, "unit_price": "12.5"}])
    padded = PlaceOrder(order_id="o-1", customer_id="c-1", items=[{"sku": "a", "quantity": 1, "unit_price": "12.50"}])
    # Then both hash the same (a resend with the same key is a duplicate, not a conflict)
    assert short.payload_hash() == padded.payload_hash()
    # ... while another amount does not
    other = PlaceOrder(order_id="o-1", customer_id="c-1", items=[{"sku": "a", "quantity": 1, "unit_price": "12.51"}])
    assert other.payload_hash() != short.payload_hash()
