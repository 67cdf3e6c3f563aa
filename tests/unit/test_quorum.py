"""Quorum queues (BUS_RABBITMQ_QUEUE_TYPE=quorum): the queues' declaration, settings and their errors."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
from kombu.transport.native_delayed_delivery import calculate_routing_key
from sqlalchemy import select

from project import settings
from project.dead_letters import dlx
from project.errors import ConfigurationError
from project.messaging.runtime import whole_seconds
from project.messaging.topology import maintenance_queue, named_command_queue
from project.settings import load
from project.store.tables import dead_letters
from project.transport import quorum

QUORUM = {"BUS_RABBITMQ_QUEUE_TYPE": "quorum"}


@pytest.fixture
def quorum_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUS_RABBITMQ_QUEUE_TYPE", "quorum")
    monkeypatch.delenv("BUS_RABBITMQ_DEAD_LETTERS", raising=False)
    monkeypatch.delenv("BUS_RABBITMQ_DELIVERY_LIMIT", raising=False)
    monkeypatch.setattr(settings, "_current", None)  # this process's settings, read afresh


def routes(queue) -> set[tuple[str, str, str]]:
    return {(exchange.name, exchange.type, key) for exchange, key in quorum.routes(queue)}


# ---- declaration ------------------------------------------------------------------------------------
def test_classic_queues_are_declared_as_before(monkeypatch):
    # Given no queue type set
    monkeypatch.delenv("BUS_RABBITMQ_QUEUE_TYPE", raising=False)
    monkeypatch.setattr(settings, "_current", None)
    # Then a command queue has its own direct exchange and no arguments
    queue = named_command_queue("orders.place_order")
    assert not isinstance(queue, quorum.RoutedQueue)
    assert routes(queue) == {("orders.place_order", "direct", "orders.place_order")}
    assert queue.queue_arguments is None


def test_a_quorum_command_queue_is_reached_by_its_name_through_a_topic_exchange(quorum_mode):
    # When a command queue is built in quorum mode
    queue = named_command_queue("orders.place_order")
    # Then its main exchange is the topic `bus.queues` with its name as routing key: what
    # Celery publishes to, and what its native delayed delivery supports
    assert (queue.exchange.name, queue.exchange.type, queue.routing_key) == ("bus.queues", "topic",
                                                                              "orders.place_order")
    # And it is bound by name, by delayed name (`#.<name>`) and to its usual direct exchange,
    # so a plain Celery sender's `queue="orders.place_order"` still reaches it
    assert routes(queue) == {("bus.queues", "topic", "orders.place_order"),
                             ("bus.queues", "topic", "#.orders.place_order"),
                             ("orders.place_order", "direct", "orders.place_order")}
    # And it is a quorum queue that dead-letters past 20 deliveries, at least once
    assert queue.queue_arguments == {
        "x-queue-type": "quorum", "x-dead-letter-exchange": "bus.dead_letter", "x-delivery-limit": 20,
        "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}


def test_a_quorum_subscriber_queue_keeps_its_fanout_binding_beside_the_topic_one(quorum_mode):
    from handlers.messages import OrderPlaced
    from project.messaging.registry import SubscriberBinding
    from project.messaging.topology import subscriber_queue

    # Given a subscriber of OrderPlaced
    def charge_payment(event):  # pragma: no cover - never run
        return None
    binding = SubscriberBinding(OrderPlaced, charge_payment, "billing")
    # When its queue is built in quorum mode
    queue = subscriber_queue(binding)
    # Then events still come through the fanout, and retries through `bus.queues` only:
    # the fanout is not the main exchange, so Celery never binds it to its delayed delivery
    assert queue.exchange.name == "bus.queues"
    assert ("events.order_placed", "fanout", queue.name) in routes(queue)
    # And a delayed retry's routing key (Celery's, for 5 s) matches this queue's topic binding only
    key = calculate_routing_key(5, queue.routing_key)
    assert key.endswith(f".{queue.name}")


def test_a_bound_copy_keeps_the_extra_bindings(quorum_mode):
    # kombu copies a queue when it binds it to a channel: the extra bindings must survive
    queue = maintenance_queue()
    assert routes(copy.copy(queue)) == routes(queue)
    assert len(routes(queue)) == 3


# ---- settings and their errors -----------------------------------------------------------------------
def test_quorum_mode_dead_letters_by_arguments_unless_policy_is_chosen():
    assert dlx.mode(load(QUORUM)) == "arguments"
    assert dlx.mode(load({**QUORUM, "BUS_RABBITMQ_DEAD_LETTERS": "policy"})) == "policy"


def test_quorum_mode_refuses_dead_lettering_off():
    with pytest.raises(ConfigurationError, match="drops a message past its delivery limit.*unset BUS_RABBITMQ_DEAD"):
        load({**QUORUM, "BUS_RABBITMQ_DEAD_LETTERS": "off"})


@pytest.mark.parametrize("env, message", [
    ({"BUS_RABBITMQ_QUEUE_TYPE": "quorom"}, "BUS_RABBITMQ_QUEUE_TYPE='quorom': use classic .* or quorum"),
    ({"BUS_RABBITMQ_QUEUE_TYPE": "stream"}, "use classic .* or quorum"),
])
def test_an_unknown_queue_type_is_refused_with_the_accepted_ones(env, message):
    with pytest.raises(ConfigurationError, match=message):
        load(env)


@pytest.mark.parametrize("value", ["0", "-3", "many", "2.5"])
def test_a_bad_delivery_limit_is_refused_naming_the_variable(value):
    with pytest.raises(ConfigurationError, match="BUS_RABBITMQ_DELIVERY_LIMIT"):
        load({"BUS_RABBITMQ_DELIVERY_LIMIT": value})


@pytest.mark.parametrize("broker, url", [("redis", "redis://h:6379/0"), ("embedded", "")])
def test_quorum_mode_on_a_broker_without_quorum_queues_is_refused(broker, url):
    with pytest.raises(ConfigurationError, match=f"needs RabbitMQ, but the broker is {broker}.*CELERY_BROKER_URL=amqp"):
        quorum.check(load({**QUORUM, "CELERY_BROKER_URL": url}))
    quorum.check(load({**QUORUM, "CELERY_BROKER_URL": "amqp://h//"}))
    quorum.check(load({"CELERY_BROKER_URL": url}))


# ---- retries and the poison guard ----------------------------------------------------------------------
@pytest.mark.parametrize("delay, sent", [(0, 0), (0.01, 1), (0.99, 1), (1, 1), (2.5, 2.5), (60, 60)])
def test_a_retry_delay_under_a_second_is_sent_as_one_second(delay, sent):
    # RabbitMQ's delayed delivery counts whole seconds and refuses 0 < countdown < 1
    assert whole_seconds(delay) == sent


def test_a_message_past_the_delivery_limit_is_kept_as_a_delivery_limit_dead_letter(engine):
    # Given what RabbitMQ dead-letters from a quorum queue past its delivery limit
    message = SimpleNamespace(
        headers={"id": "m-poison", "task": "orders.place_order",
                 "x-death": [{"queue": "orders.place_order", "reason": "delivery_limit", "count": 1}]},
        properties={}, body=b'[[], {"order_id": "o-1"}, {}]', content_type="application/json",
        content_encoding="utf-8")
    # When the drain keeps it
    dlx.keep(message, str(engine.url))
    # Then it is stored as a delivery-limit dead letter that says what happened
    with engine.connect() as conn:
        [row] = conn.execute(select(dead_letters)).all()
    assert (row.reason, row.queue, row.message_id) == ("delivery-limit", "orders.place_order", "m-poison")
    assert "more than its delivery limit" in row.error and "BUS_RABBITMQ_DELIVERY_LIMIT" in row.error
