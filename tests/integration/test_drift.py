"""`bus check` compares the declared topology with the live broker (issue 7, "Done when").

On Redis and RabbitMQ, one scenario each with a worker that consumed (so declared)
every queue: the clean broker passes; a drift injected behind the bus's back fails the
check, naming it. The drift is made with the broker's own means, not the bus's: on
Redis a member taken out of (or put into) kombu's binding set `_kombu.binding.<exchange>`,
on RabbitMQ `queue.unbind` / `queue.bind` over AMQP. Each test puts the broker back.

The test process never imports `project.celery`; `bus check` runs as the CLI does.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import pytest
import redis
from kombu import Connection

from tests.integration.conftest import opened
from tests.integration.support.scenarios import Scenario

pytestmark = pytest.mark.integration
EXCHANGE = "events.order_placed"
SUBSCRIBER = "billing.charge_payment"
SEP = "\x06\x16"  # kombu's separator inside a Redis binding-set member


@pytest.fixture(scope="module", params=["redis", "amqp"])
def scenario(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    """A broker namespace of its own, and a worker that consumes (and so declared) every queue."""
    with opened(request.param, "sqlite", tmp_path_factory, "drift") as scenario:
        scenario.start_worker(name="all")
        yield scenario


def check(scenario: Scenario, *args: str) -> tuple[int, list[str], str]:
    """`bus check`: its exit code, its drift lines, its whole output."""
    done = scenario.bus("check", "--timeout", "1", *args)
    output = done.stdout + done.stderr
    return done.returncode, [line for line in done.stdout.splitlines() if line.startswith("drift:")], output


# ---- injecting drift with the broker's own means ----------------------------------------------
@contextmanager
def binding_removed(scenario: Scenario, exchange: str, queue: str) -> Iterator[None]:
    if scenario.broker == "redis":
        client = redis.Redis.from_url(scenario.broker_url)
        key = f"_kombu.binding.{exchange}"
        members = [m for m in client.smembers(key) if m.decode().endswith(SEP + queue)]
        assert members, f"{queue} is not in {key}: {client.smembers(key)}"
        client.srem(key, *members)
        try:
            yield
        finally:
            client.sadd(key, *members)
            client.close()
    else:
        with Connection(scenario.broker_url) as conn:
            conn.default_channel.queue_unbind(queue=queue, exchange=exchange, routing_key=queue)
            try:
                yield
            finally:
                conn.default_channel.queue_bind(queue=queue, exchange=exchange, routing_key=queue)


@contextmanager
def extra_queue_bound(scenario: Scenario, exchange: str, queue: str, routing_key: str | None = None) -> Iterator[None]:
    routing_key = queue if routing_key is None else routing_key
    if scenario.broker == "redis":
        client = redis.Redis.from_url(scenario.broker_url)
        member = SEP.join([routing_key, "", queue])
        client.sadd(f"_kombu.binding.{exchange}", member)
        try:
            yield
        finally:
            client.srem(f"_kombu.binding.{exchange}", member)
            client.close()
    else:
        with Connection(scenario.broker_url) as conn:
            channel = conn.default_channel
            channel.queue_declare(queue=queue, durable=True, auto_delete=False)
            channel.queue_bind(queue=queue, exchange=exchange, routing_key=routing_key)
            try:
                yield
            finally:
                channel.queue_delete(queue=queue)


# ---- the tests ------------------------------------------------------------------------------
def test_a_topology_a_worker_declared_passes(scenario):
    # Given the worker declared every queue, exchange and binding
    # When `bus check` compares the broker with the topology
    code, drift, output = check(scenario)
    # Then nothing differs and it exits 0; the bindings really were read (not skipped)
    assert code == 0, output
    assert drift == [], output
    assert " 0 drift(s) from the declared topology; 0 warning(s)" in output
    assert "bindings not checked" not in output
    assert "1 worker(s) answered; 0 conflict(s); 0 unconsumed command queue(s)" in output


def test_a_subscriber_queue_unbound_from_its_exchange_is_drift(scenario):
    # Given billing's queue was unbound from OrderPlaced's exchange behind the bus's back
    with binding_removed(scenario, EXCHANGE, SUBSCRIBER):
        # When `bus check` runs
        code, drift, output = check(scenario)
    # Then it exits 1 naming exactly that binding and the worker that restores it
    assert code == 1, output
    assert len(drift) == 1, output
    assert drift[0].startswith(f"drift: missing binding: subscriber queue {SUBSCRIBER} is not bound to {EXCHANGE}: "
                               f"the events published there do not reach it; restart a worker of boundary billing")
    # and once it is bound again the check passes
    assert check(scenario)[0] == 0


def test_an_extra_queue_bound_to_an_event_exchange_is_drift(scenario):
    # Given a queue no subscriber declares, bound to OrderPlaced's exchange (a removed subscriber's leftover)
    with extra_queue_bound(scenario, EXCHANGE, "shipping.old_listener"):
        code, drift, output = check(scenario)
    # Then `bus check` exits 1 naming the queue and the exchange
    assert code == 1, output
    assert len(drift) == 1, output
    assert drift[0].startswith(f"drift: extra binding: queue shipping.old_listener is bound to {EXCHANGE}, "
                               f"which the topology does not declare")


def test_a_queue_bound_to_a_command_exchange_is_drift(scenario):
    # Given a second queue bound to PlaceOrder's direct exchange with its routing key: commands would be copied
    with extra_queue_bound(scenario, "orders.place_order", "orders.place_order_copy", "orders.place_order"):
        code, drift, output = check(scenario)
    # Then `bus check` names it
    assert code == 1, output
    assert [line.split(", which")[0] for line in drift] == [
        "drift: extra binding: queue orders.place_order_copy is bound to orders.place_order "
        "(routing key orders.place_order)"], output
    assert "a command has exactly one queue and one handler; unbind it" in drift[0]
