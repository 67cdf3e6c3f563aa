"""Events without a broker: outbox, registry rules, naming, dispatch ids, Redis fan-out rule, retry maths.

The outbox tests use a real SQLite database with the real schema (the Alembic
migrations), the real UnitOfWork and OutboxSink: nothing is mocked.
"""
from __future__ import annotations

import dataclasses
import uuid
from decimal import Decimal

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from handlers import billing, notifications
from handlers.messages import (
    OrderPlaced,
    PaymentProcessed,
    PlaceOrder,
    UserAccountCreated,
)
from project.contracts import DomainError
from project.errors import DuplicateCommandHandler, NotACommand, WrongBoundary
from project.messaging.outbox import OutboxSink, kwargs_repr
from project.messaging.registry import Registry
from project.messaging.retry import DEFAULT_SUBSCRIBER_POLICY, Backoff
from project.messaging.subscribers import SubscriberTask
from project.messaging.topology import Topology, subscriber_queue
from project.store.tables import outbox
from project.store.uow import UnitOfWork
from project.transport.dispatch import COPY_ID_NAMESPACE, copy_task_id, own_queue
from project.transport.redis_transport import is_durable_fanout

ORIGIN = "orders.place_order:checkout-77"



def placed(order_id: str = "o-1") -> OrderPlaced:
    return OrderPlaced(order_id=order_id, customer_id="c-1", total=Decimal("26.99"))


def outbox_rows(engine: Engine) -> list:
    with engine.connect() as conn:
        return list(conn.execute(select(outbox).order_by(outbox.c.created_at)))


def write(engine: Engine, origin: str, *events, commit: bool) -> list[str]:
    """One handler execution of boundary `orders` that publishes `events`; its outbox ids."""
    with UnitOfWork(engine) as uow:
        sink = OutboxSink(uow.session, "orders", origin)
        for event in events:
            sink.publish(event)
        if commit:
            uow.commit()
    return sink.written


# ---- outbox ------------------------------------------------------------------------------------
def test_committed_events_are_in_the_outbox_unpublished(engine):
    # Given a handler execution that publishes two events
    # When its transaction commits
    ids = write(engine, ORIGIN, placed("o-1"), placed("o-2"), commit=True)
    # Then both rows are in the outbox, in order, waiting for publication
    rows = outbox_rows(engine)
    assert [r.id for r in rows] == ids and len(set(ids)) == 2
    assert [(r.kind, r.name, r.published_at) for r in rows] == [("event", "events.order_placed", None)] * 2
    assert rows[0].payload == {"order_id": "o-1", "customer_id": "c-1", "total": "26.99", "quantities": {},
                               "_event_id": ids[0]}


def test_rolled_back_transaction_leaves_nothing_to_publish(engine):
    # Given a handler execution that publishes two events
    # When its transaction ends without commit (the handler raised)
    ids = write(engine, ORIGIN, placed("o-1"), placed("o-2"), commit=False)
    # Then the outbox is empty: nothing will be published
    assert len(ids) == 2
    assert outbox_rows(engine) == []


def test_explicit_rollback_discards_the_events(engine):
    # Given events written in a unit of work
    with UnitOfWork(engine) as uow:
        OutboxSink(uow.session, "orders", ORIGIN).publish(placed())
        # When it rolls back
        uow.rollback()
    # Then no outbox row exists
    assert outbox_rows(engine) == []


def test_a_boundary_cannot_publish_an_event_it_does_not_own(engine):
    # Given a billing handler's sink
    with UnitOfWork(engine) as uow:
        sink = OutboxSink(uow.session, "billing", ORIGIN)
        # When it publishes OrderPlaced (owned by orders)
        with pytest.raises(WrongBoundary) as refused:
            sink.publish(placed())
        # Then it is refused with the owner and the way out, and nothing is written
        assert "OrderPlaced is owned by boundary 'orders'" in str(refused.value)
        assert "send a command to 'orders'" in str(refused.value)
        assert sink.written == []
        # ... while billing's own event is accepted
        sink.publish(PaymentProcessed(order_id="o-1", amount=Decimal("1.00"), charge_id="ch_1"))
        uow.commit()
    assert [r.name for r in outbox_rows(engine)] == ["events.payment_processed"]


def test_events_and_commands_are_not_interchangeable_in_the_sink(engine):
    with UnitOfWork(engine) as uow:
        sink = OutboxSink(uow.session, "orders", ORIGIN)
        # When a command is published as an event, Then the error says how to send it
        with pytest.raises(TypeError, match=r"send commands with commands\.send"):
            sink.publish(PlaceOrder(order_id="o-1", customer_id="c-1",
                                    items=[{"sku": "a", "quantity": 1, "unit_price": "1.00"}]))
        # When an event is sent as a command, Then it is refused
        with pytest.raises(NotACommand):
            sink.send(placed())
        assert sink.written == []


def test_event_ids_are_deterministic_per_execution(engine):
    # Given one execution's origin, and its events written once
    first = write(engine, ORIGIN, placed("o-1"), placed("o-2"), commit=False)
    # When the same execution runs again (a redelivered command)
    again = write(engine, ORIGIN, placed("o-1"), placed("o-2"), commit=False)
    # Then it produces the same ids; another execution produces others
    other = write(engine, "orders.place_order:checkout-78", placed("o-1"), placed("o-2"), commit=False)
    assert first == again
    assert len(set(first)) == 2 and not set(first) & set(other)
    # ... and the ids never change across releases (inboxes hold the old ones)
    assert first[0] == str(uuid.uuid5(uuid.UUID("0c6b2f5e-93d1-4a57-8a0b-6e3f4f1d2a77"), f"{ORIGIN}:0"))


# ---- registry and naming -----------------------------------------------------------------------
def test_a_command_cannot_have_subscribers():
    # When a command contract is given to add_subscriber, Then the error points to bus.command()
    with pytest.raises(TypeError, match=r"takes an Event contract class.*use bus\.command\(\)"):
        Registry().add_subscriber(PlaceOrder, billing.charge_payment, "billing")


@pytest.mark.parametrize("not_an_event", [placed(), "OrderPlaced", dict, None])
def test_only_event_classes_take_subscribers(not_an_event):
    with pytest.raises(TypeError, match="takes an Event contract class"):
        Registry().add_subscriber(not_an_event, billing.charge_payment, "billing")


def test_subscriber_task_and_queue_are_named_boundary_dot_handler():
    # Given two subscribers of OrderPlaced in two boundaries, and one of UserAccountCreated
    registry = Registry()
    charge = registry.add_subscriber(OrderPlaced, billing.charge_payment, "billing")
    confirm = registry.add_subscriber(OrderPlaced, notifications.send_order_confirmation, "notifications")
    sms = registry.add_subscriber(UserAccountCreated, notifications.send_welcome_sms, "notifications")

    def NotifyCRM(event):  # noqa: N802 - a CamelCase handler name is snake_cased
        pass

    crm = registry.add_subscriber(OrderPlaced, NotifyCRM, "crm")
    # Then each is named <boundary>.<handler>, and the events are known by exchange name
    assert [charge.name, confirm.name, sms.name, crm.name] == [
        "billing.charge_payment", "notifications.send_order_confirmation",
        "notifications.send_welcome_sms", "crm.notify_crm"]
    assert registry.events == {"events.order_placed": OrderPlaced, "events.user_account_created": UserAccountCreated}
    # ... and each queue of that name is bound to the event's durable fanout exchange
    queue = subscriber_queue(charge)
    assert (queue.name, queue.durable, queue.exchange.name, queue.exchange.type, queue.exchange.durable) == (
        "billing.charge_payment", True, "events.order_placed", "fanout", True)
    assert sorted(q.name for q in Topology(registry).subscriber_queues("events.order_placed")) == [
        "billing.charge_payment", "crm.notify_crm", "notifications.send_order_confirmation"]


def test_a_subscriber_name_belongs_to_one_handler():
    # Given billing.charge_payment registered
    registry = Registry()
    registry.add_subscriber(OrderPlaced, billing.charge_payment, "billing")
    registry.add_subscriber(OrderPlaced, billing.charge_payment, "billing")  # the same binding again: fine

    def charge_payment(event):  # another function with the same name
        pass

    # When another handler would get the same queue, Then it is refused
    with pytest.raises(DuplicateCommandHandler, match="queue billing.charge_payment already belongs to"):
        registry.add_subscriber(PaymentProcessed, charge_payment, "billing")


# ---- dispatch ----------------------------------------------------------------------------------
def test_copy_task_id_is_deterministic_per_event_and_queue():
    event = "6f1c0d1e-0000-4000-8000-000000000001"
    copy = copy_task_id(event, "billing.charge_payment")
    # Then a redelivered copy keeps its id, every queue gets its own, none is the event's
    assert copy == copy_task_id(event, "billing.charge_payment")
    assert copy != copy_task_id(event, "notifications.send_order_confirmation")
    assert copy != copy_task_id("6f1c0d1e-0000-4000-8000-000000000002", "billing.charge_payment")
    assert copy != event and uuid.UUID(copy).version == 5
    # ... and never changes across releases (inboxes and dead letters hold these ids)
    assert COPY_ID_NAMESPACE == uuid.UUID("0f6c2f4e-3b8a-4d55-8f57-6d1d2a9c7e31")
    assert copy == "c036b519-b98f-5e00-907a-12cc3121e849"


def test_a_subscriber_retries_through_the_default_exchange_to_its_own_queue():
    task = SubscriberTask()
    task.name = "notifications.send_welcome_sms"
    assert task.retry_options() == own_queue("notifications.send_welcome_sms") == {
        "queue": "notifications.send_welcome_sms", "exchange": "",
        "routing_key": "notifications.send_welcome_sms"}


# ---- Redis durable fan-out rule ----------------------------------------------------------------
@pytest.mark.parametrize("exchange, declaration, durable_fanout", [
    ("events.order_placed", {"type": "fanout", "durable": True}, True),
    ("events.order_placed", {"type": "fanout", "durable": False}, False),  # kombu's PUB/SUB
    ("events.order_placed", {"type": "direct", "durable": True}, False),
    ("events.order_placed", None, False),                                  # not declared here
    ("celery.pidbox", {"type": "fanout", "durable": True}, False),         # remote control stays PUB/SUB
    ("celeryev", {"type": "topic", "durable": True}, False),
    ("reply.celery.pidbox", {"type": "direct", "durable": False}, False),
    ("orders.events.x", {"type": "fanout", "durable": True}, False),       # the prefix, not a substring
])
def test_only_durable_event_fanouts_are_pushed_into_every_bound_queue(exchange, declaration, durable_fanout):
    assert is_durable_fanout(exchange, declaration) is durable_fanout


# ---- the subscriber retry policy ---------------------------------------------------------------
def bound_task(binding) -> type[SubscriberTask]:
    """A subscriber task class bound to `binding`, as the bus makes one (the policy is read from the class)."""
    return type("BoundSubscriber", (SubscriberTask,), {"binding": binding})


def test_default_subscriber_policy_gives_up_after_five_retries():
    # Given a subscriber bound without a policy of its own
    task = bound_task(Registry().add_subscriber(OrderPlaced, notifications.send_order_confirmation, "notifications"))
    policy = task.retry_policy()
    # Then it has the default policy: a failure is retried after attempts 1..5, the 6th is final
    assert policy is DEFAULT_SUBSCRIBER_POLICY
    failure = ConnectionError("smtp down")
    assert [policy.should_retry(failure, n) for n in range(7)] == [True] * 5 + [False] * 2
    # ... and a domain refusal is never retried
    assert policy.should_retry(DomainError("no"), 0) is False


def test_default_subscriber_policy_dead_letters_within_31_seconds():
    # Given the default policy's ceiling per retry (its delays without jitter): 1, 2, 4, 8, 16 s
    ceilings = [dataclasses.replace(DEFAULT_SUBSCRIBER_POLICY, jitter=False).delay(n) for n in range(5)]
    assert ceilings == [1.0, 2.0, 4.0, 8.0, 16.0]
    # Then every jittered delay lies under its ceiling: the dead letter comes within ~31 s
    # (which is why the integration test binds a shorter policy)
    for n, ceiling in enumerate(ceilings):
        assert all(0 <= DEFAULT_SUBSCRIBER_POLICY.delay(n) <= ceiling for _ in range(200))
    assert sum(ceilings) == 31.0
    # ... and the cap bounds any later retry
    assert all(DEFAULT_SUBSCRIBER_POLICY.delay(20) <= 60.0 for _ in range(200))


def test_a_subscriber_policy_of_its_own_replaces_the_default():
    task = bound_task(Registry().add_subscriber(OrderPlaced, billing.charge_payment, "billing",
                                                retry=Backoff(max_retries=8, base=0.5, cap=30.0)))
    assert task.retry_policy().max_retries == 8
    assert [task.retry_policy().should_retry(TimeoutError(), n) for n in (7, 8)] == [True, False]


@pytest.mark.parametrize("payload", [
    {"order_id": "o-1", "amount": "12.50", "items": [{"sku": "book", "quantity": 2}], "paid": True, "note": None},
    {"text": "quotes ' and \" and unicode é ✓", "n": -3.5},
    {},
])
def test_an_events_kwargs_repr_is_what_celery_would_show(payload):
    from celery.utils.saferepr import saferepr
    # Given a JSON payload, Then the relay's cheap repr is Celery's saferepr of it
    assert kwargs_repr(payload) == saferepr(payload, 1024)


def test_a_long_payloads_kwargs_repr_is_cut_at_the_limit():
    text = kwargs_repr({"blob": "x" * 5000})
    assert len(text) == 1024 and text.endswith("...")
