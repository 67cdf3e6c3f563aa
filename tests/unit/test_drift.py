"""`bus check`'s broker comparison as pure logic: the declared topology against snapshots of a broker.

The snapshots are what project/observe/drift.py reads from RabbitMQ (passive declares and
rabbitmqctl) and Redis (kombu's binding sets); tests/integration/test_drift.py reads
real ones.
"""
from __future__ import annotations

import io
from typing import Iterator

import pytest
from celery import Celery
from rich.console import Console

from handlers import accounts, billing, notifications, orders
from handlers.messages import OrderPlaced, PlaceOrder, RegisterUser
from project.core import Bus
from project.observe.drift import (
    MISSING,
    Binding,
    Declared,
    Finding,
    Report,
    Snapshot,
    compare,
    declared,
)

SUBSCRIBER = "billing.charge_payment"


@pytest.fixture(scope="module")
def want() -> Iterator[Declared]:
    """Two commands; OrderPlaced with two subscribers; the maintenance queue."""
    app = Celery("drift-test", set_as_current=False)
    bus = Bus(app)
    bus.command(PlaceOrder)(orders.place_order)
    bus.command(RegisterUser)(accounts.register_user)
    bus.subscriber(OrderPlaced, boundary="billing")(billing.charge_payment)
    bus.subscriber(OrderPlaced, boundary="notifications")(notifications.send_order_confirmation)
    yield declared(bus.topology)
    app.close()


def rabbitmq(want: Declared, **changes) -> Snapshot:
    """A vhost where a worker declared everything, as rabbitmqctl lists it (fanout bindings keep their key)."""
    bindings = {Binding(b.exchange, b.queue, b.routing_key or b.queue) for b in want.bindings}
    bindings.add(Binding("", SUBSCRIBER, SUBSCRIBER))  # the default exchange binds every queue
    types = {**want.exchanges, "": "direct", "celery.pidbox": "fanout"}
    snapshot = Snapshot("RabbitMQ vhost v", True, {q: True for q in want.kinds}, dict(want.exchanges), bindings,
                        types=types)
    for name, value in changes.items():
        setattr(snapshot, name, value)
    return snapshot


def redis(want: Declared) -> Snapshot:
    """A Redis db where a worker declared everything: empty queues are no keys, exchanges are not stored."""
    return Snapshot("Redis db 3", False, {q: False for q in want.kinds}, {x: None for x in want.exchanges},
                    {Binding(b.exchange, b.queue, b.routing_key or b.queue) for b in want.bindings})


def kinds(findings) -> list[tuple[str, str, bool]]:
    return [(f.kind, f.subject, f.drift) for f in findings]


def test_the_declared_topology_names_every_queue_exchange_and_binding(want):
    assert want.kinds == {"orders.place_order": "command", "accounts.register_user": "command",
                          SUBSCRIBER: "subscriber", "notifications.send_order_confirmation": "subscriber",
                          "bus.maintenance": "maintenance"}
    assert want.exchanges["events.order_placed"] == "fanout"
    assert want.exchanges["orders.place_order"] == "direct"
    assert Binding("events.order_placed", SUBSCRIBER) in want.bindings  # a fanout binding has no key
    assert Binding("orders.place_order", "orders.place_order", "orders.place_order") in want.bindings


@pytest.mark.parametrize("broker", [rabbitmq, redis])
def test_a_broker_a_worker_declared_and_consumes_is_clean(want, broker):
    assert compare(want, broker(want), consumed=want.kinds) == []


def test_on_redis_an_empty_queue_is_no_key_yet_a_bound_or_consumed_one_is_there(want):
    # Given Redis where billing's queue is consumed but was unbound, and nothing else is consumed
    snapshot = redis(want)
    snapshot.bindings = {b for b in snapshot.bindings if b.queue != SUBSCRIBER}
    findings = compare(want, snapshot, consumed={SUBSCRIBER})
    # Then the binding is missing (drift); the other bound queues are unconsumed (warnings), not undeclared
    assert kinds(findings) == [
        ("missing-binding", f"events.order_placed -> {SUBSCRIBER}", True),
        ("unconsumed", "bus.maintenance", False),
        ("unconsumed", "notifications.send_order_confirmation", False),
    ]
    # And a queue that is neither bound, consumed nor holding messages is only "not declared yet"
    assert ("undeclared", SUBSCRIBER, False) in kinds(compare(want, snapshot, consumed=()))


def test_extra_bindings_on_bus_exchanges_and_queues_are_drift_the_rest_of_the_broker_is_not_ours(want):
    snapshot = rabbitmq(want)
    snapshot.bindings = snapshot.bindings | {
        Binding("events.order_placed", "shipping.old_listener", "x"),       # a removed subscriber's queue
        Binding("events.order_cancelled", "billing.refund", "billing.refund"),  # an event no contract declares
        Binding("amq.topic", SUBSCRIBER, "#"),                               # our queue on a foreign exchange
        Binding("celery.pidbox", "w1.celery.pidbox", ""),                    # Celery's own: not ours
        Binding("", "shipping.old_listener", "shipping.old_listener"),       # the default exchange: never
    }
    findings = compare(want, snapshot, consumed=want.kinds)
    assert kinds(findings) == [
        ("extra-binding", f"amq.topic -> {SUBSCRIBER}", True),
        ("extra-binding", "events.order_cancelled -> billing.refund", True),
        ("extra-binding", "events.order_placed -> shipping.old_listener", True),
    ]
    assert findings[0].message.startswith(f"extra binding: queue {SUBSCRIBER} is bound to amq.topic (routing key #)")
    assert "subscriber's handler gets whatever is sent there too" in findings[0].message


def test_a_missing_exchange_is_one_finding_and_a_wrong_type_another(want):
    exchanges = {**want.exchanges, "events.order_placed": MISSING, "orders.place_order": "fanout"}
    snapshot = rabbitmq(want, exchanges=exchanges)
    snapshot.bindings = {b for b in snapshot.bindings if b.exchange != "events.order_placed"}
    findings = compare(want, snapshot, consumed=want.kinds)
    # Then the missing exchange is named once (its queues' missing bindings follow from it), and the type
    assert kinds(findings) == [("missing-exchange", "events.order_placed", True),
                               ("exchange-type", "orders.place_order", True)]
    assert "orders.place_order is fanout on RabbitMQ vhost v, declared direct" in findings[1].message


def test_rabbitmq_queues_deleted_under_a_worker_or_never_declared(want):
    queues = {**{q: True for q in want.kinds}, SUBSCRIBER: False, "accounts.register_user": False}
    findings = compare(want, rabbitmq(want, queues=queues), consumed=set(want.kinds) - {"accounts.register_user"})
    # Then a consumed queue that is gone is drift; one nobody declared yet is a warning naming the worker to start
    assert kinds(findings) == [("missing-queue", SUBSCRIBER, True), ("undeclared", "accounts.register_user", False)]
    assert findings[1].message.endswith("start one: celery -A project worker --boundary accounts")


def test_without_a_list_of_bindings_only_queues_and_exchanges_are_compared(want):
    snapshot = rabbitmq(want, bindings=None, types=None, unchecked="rabbitmqctl is not on PATH")
    snapshot.queues = {**snapshot.queues, SUBSCRIBER: False}
    report = Report(snapshot.where, compare(want, snapshot, consumed=()), unchecked=snapshot.unchecked)
    # Then no binding is called missing or extra, and the report says they were not checked
    assert {f.kind for f in report.findings} == {"undeclared", "unconsumed"}
    console = Console(record=True, width=300, file=io.StringIO())
    report.print(console)
    text = console.export_text()
    assert "note: bindings not checked: rabbitmqctl is not on PATH" in text
    assert "RabbitMQ vhost v: 0 drift(s) from the declared topology; 3 warning(s)" in text


def test_warnings_pass_unless_strict_drift_and_an_unreadable_broker_fail():
    warning = Report("b", [Finding("unconsumed", "q", "m", False)])
    drift = Report("b", [Finding("extra-binding", "x -> q", "m", True)])
    assert warning.ok() and not warning.ok(strict=True)
    assert not drift.ok()
    assert not Report("the broker", [], error="ConnectionRefusedError").ok()
