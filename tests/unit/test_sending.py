"""The caller side of a command: validate, derive the task id, refuse wrong routes, then publish.

The bus here wraps a Celery app on kombu's in-memory transport, configured like
project/celery.py (routing by name). The transport is a fake broker that records what
was published, so "publishes nothing" is observed, not assumed.
"""
from __future__ import annotations

import string
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from celery import Celery
from celery.utils.saferepr import saferepr
from hypothesis import given, settings
from hypothesis import strategies as st
from kombu import Exchange
from pydantic import ValidationError

from handlers.messages import OrderPlaced, PlaceOrder, RegisterUser
from project.core import Bus
from project.errors import MisroutedCommand, NotACommand
from project.messaging.sending import body_of, check_route, prepare
from project.settings import Settings
from project.store.idempotency import TASK_ID_NAMESPACE, task_id_for
from project.transport.dispatch import own_queue

ITEMS = [{"sku": "book", "quantity": 2, "unit_price": "12.50"}]
FIELDS = {"order_id": "o-1", "customer_id": "c-1", "items": ITEMS}


def place_order(cmd: PlaceOrder) -> dict:
    return {"order_id": cmd.order_id}


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[Bus]:
    """A bus on the in-memory transport, with PlaceOrder bound."""
    yield from memory_bus(f"unit-{tmp_path.name}", tmp_path, f"sqlite:///{tmp_path}/bus.db")


def memory_bus(name: str, home: Path, database_url: str) -> Iterator[Bus]:
    """The app `name`'s bus on kombu's memory:// transport, its store at `database_url`, PlaceOrder bound;
    the queue drained before and after, the app closed."""
    app = Celery(name, broker="memory://", set_as_current=False)
    app.conf.task_routes = ("project.messaging.routing.route_by_name",)
    bus = Bus(app)
    bus.settings = Settings(home=home, broker_url="memory://", database_url=database_url,
                            result_backend="", embedded=False)
    bus.place_order = bus.command(PlaceOrder)(place_order)
    drain(bus)  # kombu's memory:// broker is one per process: what another test left there is not ours
    yield bus
    drain(bus)
    app.close()


def drain(bus: Bus, queue: str = "orders.place_order") -> list[dict]:
    """Take every message published to `queue`: (headers, body) of each."""
    taken = []
    with bus.app.connection_for_read() as conn:
        simple = conn.SimpleQueue(queue, no_ack=True)
        while simple.qsize():
            message = simple.get(timeout=1)
            taken.append({"headers": message.headers, "body": message.payload})
        simple.close()
    return taken


def test_same_key_and_payload_give_the_same_task_id():
    body, task_id = prepare(PlaceOrder, FIELDS, "checkout-77")
    again, same_id = prepare(PlaceOrder, dict(reversed(FIELDS.items())), "checkout-77")
    assert task_id == same_id
    assert body == again == {**PlaceOrder(**FIELDS).payload(), "idempotency_key": "checkout-77"}


def test_task_id_is_uuid5_of_task_key_and_payload_hash():
    _, task_id = prepare(PlaceOrder, FIELDS, "checkout-77")
    digest = PlaceOrder(**FIELDS).payload_hash()
    assert task_id == task_id_for("orders.place_order", "checkout-77", digest)
    assert task_id == str(uuid.uuid5(TASK_ID_NAMESPACE, f"orders.place_order:checkout-77:{digest}"))


@settings(max_examples=200, deadline=None)
@given(task=st.text(), key=st.text(), digest=st.text(string.hexdigits, max_size=64))
def test_the_task_id_is_uuid5_of_its_name_for_every_task_key_and_hash(task, key, digest):
    # Given any task name, key and hash (keys are the caller's: any text, any length)
    # Then the task id is the uuid5 the bus has always derived (ids stored before stay the same)
    assert task_id_for(task, key, digest) == str(uuid.uuid5(TASK_ID_NAMESPACE, f"{task}:{key}:{digest}"))


def test_another_payload_or_key_gives_another_task_id():
    _, first = prepare(PlaceOrder, FIELDS, "checkout-77")
    _, other_payload = prepare(PlaceOrder, {**FIELDS, "customer_id": "c-2"}, "checkout-77")
    _, other_key = prepare(PlaceOrder, FIELDS, "checkout-78")
    assert len({first, other_payload, other_key}) == 3


def test_key_rule_explicit_key_then_natural_key_then_none():
    # explicit key (argument or the reserved field) wins over the natural key
    assert prepare(PlaceOrder, FIELDS, "k")[0]["idempotency_key"] == "k"
    assert prepare(PlaceOrder, {**FIELDS, "idempotency_key": "k"}, None)[0]["idempotency_key"] == "k"
    # without one, the contract's natural key fields are the key
    body, task_id = prepare(PlaceOrder, FIELDS, None)
    assert body["idempotency_key"] == "order_id=o-1"
    assert task_id == prepare(PlaceOrder, FIELDS, None)[1]
    # with neither, no key travels: the worker uses the message id (dedupes redelivery only)
    user = {"user_id": "u-1", "email": "ada@example.com", "name": "Ada"}
    body, task_id = prepare(RegisterUser, user, None)
    assert "idempotency_key" not in body
    assert task_id != prepare(RegisterUser, user, None)[1]


def test_invalid_fields_raise_validation_error_naming_them():
    with pytest.raises(ValidationError) as error:
        prepare(PlaceOrder, {"order_id": "o-1", "customer_id": "", "items": []}, "k")
    assert {e["loc"][0] for e in error.value.errors()} == {"customer_id", "items"}


def test_delay_with_invalid_fields_raises_and_publishes_nothing(bus: Bus):
    # Given a bound command on a recording broker
    # When .delay() gets fields that do not fit the contract
    with pytest.raises(ValidationError):
        bus.place_order.delay(order_id="o-1", customer_id="", items=[], idempotency_key="k")
    # Then nothing was published
    assert drain(bus) == []
    # (while a valid one is: the check above can see a message)
    result = bus.place_order.delay(**FIELDS, idempotency_key="k")
    [message] = drain(bus)
    assert message["headers"]["id"] == result.id == prepare(PlaceOrder, FIELDS, "k")[1]
    assert message["headers"]["task"] == "orders.place_order"
    assert message["body"][1] == {**PlaceOrder(**FIELDS).payload(), "idempotency_key": "k"}


def test_delay_twice_and_bus_send_share_one_task_id(bus: Bus):
    first = bus.place_order.delay(**FIELDS, idempotency_key="k")
    second = bus.place_order.apply_async(kwargs=FIELDS, idempotency_key="k")
    sent = bus.send(PlaceOrder(**FIELDS), idempotency_key="k")
    assert first.id == second.id == sent.id
    assert [m["headers"]["id"] for m in drain(bus)] == [first.id] * 3


@pytest.mark.parametrize("send", ["delay", "bus.send"])
def test_a_sent_command_shows_its_body_as_celery_would(bus: Bus, send: str):
    # Given a command sent by .delay() or bus.send (Celery's saferepr of the body is not called: it was slow)
    {"delay": lambda: bus.place_order.delay(**FIELDS, idempotency_key="k"),
     "bus.send": lambda: bus.send(PlaceOrder(**FIELDS), idempotency_key="k")}[send]()
    # Then the message shows its kwargs as Celery's saferepr writes them (Flower, worker logs)
    [message] = drain(bus)
    assert message["headers"]["argsrepr"] == "()"
    assert message["headers"]["kwargsrepr"] == saferepr(message["body"][1], 1024)


def test_a_callers_own_kwargsrepr_is_kept(bus: Bus):
    # Given a caller that hides its fields from Flower and the logs (Celery's option for secrets)
    bus.place_order.apply_async(kwargs=FIELDS, idempotency_key="k", kwargsrepr="{hidden}")
    # Then its text is shown, not the body
    [message] = drain(bus)
    assert message["headers"]["kwargsrepr"] == "{hidden}"


def test_positional_arguments_are_refused_with_a_hint(bus: Bus):
    with pytest.raises(TypeError) as error:
        bus.place_order.delay("o-1", "c-1", ITEMS)
    assert "takes the fields of PlaceOrder as keywords" in str(error.value)
    assert ".si(**fields)" in str(error.value)
    assert drain(bus) == []


@pytest.mark.parametrize("options", [
    {"queue": "accounts.register_user"},
    {"exchange": Exchange("events.order_placed", type="fanout")},
    {"exchange": Exchange("orders.place_order", type="fanout")},
    {"exchange": "events.order_placed"},
], ids=["other-queue", "event-fanout", "fanout-named-like-the-command", "other-exchange"])
def test_a_command_cannot_be_routed_elsewhere(bus: Bus, options):
    # When a command is aimed at another queue or at a fanout exchange
    with pytest.raises(MisroutedCommand) as error:
        bus.place_order.apply_async(kwargs=FIELDS, **options)
    # Then it is refused before publishing, with the fix
    assert "orders.place_order is a command: it goes to its own queue 'orders.place_order'" in str(error.value)
    assert "publish an event from the handler instead" in str(error.value)
    assert drain(bus) == []
    with pytest.raises(MisroutedCommand):
        bus.send(PlaceOrder(**FIELDS), **options)


@pytest.mark.parametrize("options", [{}, {"queue": "orders.place_order"}, {"exchange": ""},
                                     {"exchange": "orders.place_order"}, own_queue("orders.place_order")])
def test_its_own_queue_is_accepted(options):
    check_route("orders.place_order", options)


@pytest.mark.parametrize("options", [
    {"routing_key": "billing.charge_payment"},
    {"exchange": "", "routing_key": "accounts.register_user"},
    {"exchange": "bus.queues", "routing_key": "orders.place_order"},
], ids=["other-routing-key", "default-exchange-to-another-queue", "quorum-router-by-hand"])
def test_routing_options_of_a_caller_that_lead_elsewhere_are_refused(bus: Bus, options):
    # When a caller routes a command by routing key, or through an exchange it should not name
    with pytest.raises(MisroutedCommand) as error:
        bus.place_order.apply_async(kwargs=FIELDS, **options)
    # Then it is refused before publishing, naming what it got
    assert f"routing_key={options['routing_key']!r}" in str(error.value)
    assert drain(bus) == []


def test_a_command_retries_to_its_own_queue_by_the_default_exchange(bus: Bus):
    # Given a command task, Then its retry goes to its queue only, on a route its own check accepts
    # (not to the exchange the message came from: on quorum queues that is bus.queues)
    options = bus.place_order.retry_options()
    assert options == {"queue": "orders.place_order", "exchange": "", "routing_key": "orders.place_order"}
    check_route("orders.place_order", options)


@pytest.mark.parametrize("value, hint", [
    (OrderPlaced(order_id="o-1", customer_id="c-1", total="1.00"), "is an event, not a command"),
    ({"order_id": "o-1"}, "not a dict; build it first"),
    (PlaceOrder, "not the class PlaceOrder: bus.send(PlaceOrder(...))"),
    ("orders.place_order", "takes a Command contract instance, got str"),
], ids=["event", "dict", "class", "str"])
def test_bus_send_refuses_what_is_not_a_command_instance(bus: Bus, value, hint):
    with pytest.raises(NotACommand) as error:
        bus.send(value)
    assert hint in str(error.value)
    assert drain(bus) == []


def test_body_of_keeps_the_explicit_key_over_the_natural_one():
    body, task_id = body_of(PlaceOrder(**FIELDS), "mine")
    assert body["idempotency_key"] == "mine"
    assert task_id == prepare(PlaceOrder, FIELDS, "mine")[1]


def test_bus_send_accepts_its_own_queue_named_explicitly(bus: Bus):
    # Given a sender that names the command's own queue, When it sends, Then it is published there once
    sent = bus.send(PlaceOrder(**FIELDS), idempotency_key="k", queue="orders.place_order")
    assert [m["headers"]["id"] for m in drain(bus)] == [sent.id]


# ---- idempotency keys longer than the store's key column --------------------------------
KEY_LIMIT = 500  # bus_commands.key is String(500)


@pytest.mark.parametrize("length", [KEY_LIMIT - 1, KEY_LIMIT])
def test_a_key_up_to_the_column_limit_is_accepted(bus: Bus, length: int):
    # Given a key as long as the store keeps, When it is sent, Then it is published with it
    sent = bus.place_order.delay(**FIELDS, idempotency_key="k" * length)
    [message] = drain(bus)
    assert message["headers"]["id"] == sent.id
    assert message["body"][1]["idempotency_key"] == "k" * length


@pytest.mark.parametrize("send", ["delay", "apply_async", "bus.send", "body_of"])
def test_a_key_longer_than_the_column_is_refused_at_the_caller_and_nothing_is_published(bus: Bus, send: str):
    # Given a caller key one character over the key column's limit
    key = "k" * (KEY_LIMIT + 1)

    # When it is sent by any of the caller's ways
    with pytest.raises(ValueError) as error:
        {"delay": lambda: bus.place_order.delay(**FIELDS, idempotency_key=key),
         "apply_async": lambda: bus.place_order.apply_async(kwargs=FIELDS, idempotency_key=key),
         "bus.send": lambda: bus.send(PlaceOrder(**FIELDS), idempotency_key=key),
         "body_of": lambda: body_of(PlaceOrder(**FIELDS), key)}[send]()

    # Then it is refused naming the command, the length, the limit and the fix; nothing is published
    assert str(error.value) == (
        f"the idempotency key of orders.place_order is {KEY_LIMIT + 1} characters long; the bus stores at most "
        f"{KEY_LIMIT} (column bus_commands.key). Use a shorter key, e.g. a digest of this one: "
        f"hashlib.sha256(key.encode()).hexdigest()"
    )
    assert drain(bus) == []


def test_a_natural_key_longer_than_the_column_is_refused_too():
    # Given a contract whose natural key (order_id=...) comes out longer than the limit
    fields = {**FIELDS, "order_id": "o" * KEY_LIMIT}
    # When it is prepared without an explicit key, Then the derived key is refused
    with pytest.raises(ValueError, match=f"is {KEY_LIMIT + len('order_id=')} characters long"):
        prepare(PlaceOrder, fields, None)
