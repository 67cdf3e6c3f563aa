"""Events end to end (issue 4, "Done when"): real brokers, real `celery worker` processes.

What each test shows, and where it runs (SQLite unless named; time on 2 cores decides):
- every subscriber gets every event, exactly once: on the shared `cluster` of
  embedded, redis and amqp, and amqp with PostgreSQL;
- a subscriber offline at publish time gets the event when it starts: own workers,
  on redis (kombu's own fanout would lose it), embedded and amqp;
- a failing subscriber is retried alone: own worker with BUS_FAIL_PORTS=sms=3, on
  redis, embedded, and amqp with PostgreSQL;
- a subscriber that exhausts its retries is dead-lettered alone: own worker whose
  notifications subscribers have a short policy (clients/notifications_fast_retry.py;
  the default policy may wait ~31 s), on redis and amqp;
- a plain kombu consumer with its own queue bound to the event's exchange receives it;
- relay after a crash between commit and publish; a redelivered event runs a
  subscriber once: clients/events_driver.py writes and publishes outbox rows;
- `bus topology --json` lists every event with exchange, type, owner and subscribers.

The test process never imports `project.celery`: it reads the scenario's database and
broker directly, and asks processes started with the scenario's environment to act.
Counts are exact: a test waits until the expected effects exist, waits SETTLE seconds
more for anything that should not come (a duplicate, a sibling re-run), then compares.
"""
from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from kombu import Connection, Exchange, Queue
from kombu.exceptions import ChannelError
from kombu.transport import redis as plain_redis
from sqlalchemy import func, or_, select, update

from adapters.orm import audit_log, port_calls
from project.store.tables import dead_letters, inbox, outbox, utcnow
from project.testing.processes import WorkerProcess
from project.transport.dispatch import copy_task_id
from tests.integration.conftest import opened
from tests.integration.support.helpers import (
    ITEMS_TOTAL,
    PLACE_ORDER,
    REGISTER_USER,
    order,
)
from tests.integration.support.scenarios import Driver, Scenario

pytestmark = pytest.mark.integration

ORDER_PLACED = "events.order_placed"
USER_CREATED = "events.user_account_created"
PAYMENT_PROCESSED = "events.payment_processed"
CHARGE = "billing.charge_payment"
CONFIRM = "notifications.send_order_confirmation"
WELCOME_EMAIL = "notifications.send_welcome_email"
WELCOME_SMS = "notifications.send_welcome_sms"
AUDIT = "audit.record_user_created"
#: the fulfilment process manager's step on OrderPlaced (handlers/fulfilment.py)
FULFIL = "fulfilment.fulfilment.order_placed"
ORDER_SUBSCRIBERS = {CHARGE, CONFIRM, FULFIL}
USER_SUBSCRIBERS = {WELCOME_EMAIL, WELCOME_SMS, AUDIT}
EVERY_BOUNDARY_BUT_BILLING = "orders,accounts,notifications,audit,bus,fulfilment,inventory,shipping"
ORDER_PLACED_CONTRACT = "handlers.messages.OrderPlaced"
#: seconds to wait, after the expected effects exist, for effects that must not come
SETTLE = 1.0
#: a stopped worker gets this long to exit before SIGKILL (they stop in about 2 s; the
#: scenario's default grace of 10 s only matters for a worker that hangs).
STOP_GRACE = 4.0
FAST_RETRY_MODULES = ("tasks.orders,tasks.accounts,tasks.billing,tasks.audit,"
                      "tests.integration.support.clients.notifications_fast_retry")


def pair(broker: str, database: str = "sqlite") -> Any:
    """A (broker, database) parameter; equal to the conftest MATRIX's, so `cluster` is shared."""
    return pytest.param((broker, database), id=f"{broker}-{database}")


def on_cluster(*pairs: Any) -> pytest.MarkDecorator:
    """Run on the shared `cluster` of these pairs only."""
    return pytest.mark.parametrize("cluster", pairs, indirect=True)


# ---- fixtures -------------------------------------------------------------------------------
@pytest.fixture
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Scenario]]:
    """`own(broker, database)`: a scenario of this test alone, closed (processes stopped) at its end."""
    with ExitStack() as stack:
        def open_(broker: str, database: str = "sqlite") -> Scenario:
            return stack.enter_context(opened(broker, database, tmp_path_factory, "ev"))
        yield open_


def start_worker(scenario: Scenario, request: pytest.FixtureRequest, **options: Any) -> WorkerProcess:
    """`scenario.start_worker(...)`, stopped with STOP_GRACE at the end of the test (also on failure)."""
    worker = scenario.start_worker(**options)
    request.addfinalizer(lambda: worker.stop(grace=STOP_GRACE))
    return worker


@pytest.fixture(scope="module")
def events_drivers() -> Iterator[Callable[[Scenario], Driver]]:
    """`get(scenario)`: a clients/events_driver.py process with the scenario's environment."""
    running: dict[Path, Driver] = {}

    def get(scenario: Scenario) -> Driver:
        if scenario.home not in running:
            for home in list(running):  # one at a time: the shared pairs run one after another
                running.pop(home).close()
            running[scenario.home] = start_events_driver(scenario)
        return running[scenario.home]

    yield get
    for driver in running.values():
        driver.close()


def start_events_driver(scenario: Scenario) -> Driver:
    return Driver(scenario.env, scenario.logdir, script="events_driver.py")


# ---- what the scenario's database and broker hold ----------------------------------------------
def fetch(scenario: Scenario, statement: Any) -> list[Any]:
    with scenario.engine().connect() as conn:
        return list(conn.execute(statement))


def events_of(scenario: Scenario, exchange: str, **fields: str) -> list[Any]:
    """Outbox rows of one event type whose payload has these field values."""
    rows = fetch(scenario, select(outbox).where(outbox.c.name == exchange))
    return [r for r in rows if all(r.payload.get(k) == v for k, v in fields.items())]


def one_event(scenario: Scenario, exchange: str, **fields: str) -> Any:
    rows = events_of(scenario, exchange, **fields)
    assert len(rows) == 1, f"expected one {exchange} row with {fields}, found {len(rows)}"
    return rows[0]


def deliveries(scenario: Scenario, event_id: str) -> dict[str, int]:
    """{subscriber: duplicates absorbed} from the inbox claims of one event."""
    rows = fetch(scenario, select(inbox.c.subscriber, inbox.c.duplicates).where(inbox.c.event_id == event_id))
    return {r.subscriber: r.duplicates for r in rows}


def calls(scenario: Scenario, port: str, target: str) -> list[Any]:
    """What the recording fake of `port` was asked to do for `target` (committed effects)."""
    return fetch(scenario, select(port_calls).where(port_calls.c.port == port, port_calls.c.target == target))


def audits(scenario: Scenario, subject: str) -> int:
    return fetch(scenario, select(func.count()).where(audit_log.c.subject == subject))[0][0]


def unpublished(scenario: Scenario) -> list[str]:
    """Ids of the outbox rows nobody has published yet, but for timers not due (fulfilment's payment timeouts)."""
    return [r.id for r in fetch(scenario, select(outbox.c.id).where(
        outbox.c.published_at.is_(None), or_(outbox.c.due_at.is_(None), outbox.c.due_at <= utcnow())))]


def queue_length(scenario: Scenario, queue: str) -> int:
    """Messages ready in `queue`, by a passive queue_declare (a plain kombu connection)."""
    with Connection(scenario.broker_url) as conn:
        try:
            return conn.default_channel.queue_declare(queue=queue, passive=True).message_count
        except ChannelError:
            if scenario.rabbitmq:
                raise
            return 0  # Redis has no empty queues: an empty list is no key at all


def received(worker: WorkerProcess, task: str) -> int:
    """How many messages of `task` the worker received (its log: `Task <name>[<id>] received`)."""
    return len(re.findall(rf"Task {re.escape(task)}\[[0-9a-f-]+\] received", worker.logfile.read_text()))


def injected_failures(scenario: Scenario, port: str) -> list[int]:
    """Failures injected into `port` so far, per key (BUS_FAIL_PORTS counter files)."""
    return sorted(int(p.read_text() or 0) for p in (scenario.home / "injected-failures").glob(f"{port}-*"))


def user(uid: str, n: int = 0) -> dict[str, str]:
    return {"user_id": f"u-{uid}-{n}", "email": f"u-{uid}-{n}@example.com", "name": f"Ada {n}"}


def order_mail(customer_id: str) -> str:
    return f"{customer_id}@customers.example"


# ---- every subscriber gets every event ---------------------------------------------------------
@on_cluster(pair("embedded"), pair("redis"), pair("amqp"), pair("amqp", "postgresql"), pair("amqp-quorum", "postgresql"))
def test_every_subscriber_gets_every_event_exactly_once(cluster: Scenario, uid: str):
    # Given a worker for every boundary
    # When three orders are placed and two users register
    orders = {f"o-{uid}-{n}": f"c-{uid}-{n}" for n in range(3)}
    users = [user(uid, n) for n in range(2)]
    sent = [cluster.client.delay(PLACE_ORDER, idempotency_key=f"checkout-{o}", **order(o, c))
            for o, c in orders.items()]
    sent += [cluster.client.delay(REGISTER_USER, **u) for u in users]
    for task_id in sent:
        cluster.client.get(task_id)

    # Then each OrderPlaced reaches charge_payment and send_order_confirmation, and each
    # UserAccountCreated reaches the welcome e-mail, the welcome SMS and the audit log
    placed = {o: one_event(cluster, ORDER_PLACED, order_id=o).id for o in orders}
    created = {u["user_id"]: one_event(cluster, USER_CREATED, user_id=u["user_id"]).id for u in users}
    expected = {**{e: {s: 0 for s in ORDER_SUBSCRIBERS} for e in placed.values()},
                **{e: {s: 0 for s in USER_SUBSCRIBERS} for e in created.values()}}
    cluster.wait_for("every subscriber to handle every event",
                     lambda: sum(len(deliveries(cluster, e)) for e in expected) == 3 * 3 + 2 * 3)
    time.sleep(SETTLE)
    # ... exactly once each (one inbox claim, no duplicate delivery)
    assert {e: deliveries(cluster, e) for e in expected} == expected
    # ... with exactly one effect each
    for order_id, customer in orders.items():
        charges = calls(cluster, "gateway", customer)
        assert [c.payload["amount"] for c in charges] == [ITEMS_TOTAL]
        assert charges[0].key == f"{CHARGE}:{placed[order_id]}"  # stable key per (event, subscriber)
        assert len(calls(cluster, "mail", order_mail(customer))) == 1
    for u in users:
        assert len(calls(cluster, "mail", u["email"])) == 1
        assert len(calls(cluster, "sms", u["user_id"])) == 1
        assert audits(cluster, u["user_id"]) == 1


@on_cluster(pair("redis"), pair("amqp", "postgresql"), pair("amqp-quorum", "postgresql"))
def test_a_subscriber_publishes_its_own_event_caused_by_the_one_it_handled(cluster: Scenario, uid: str):
    # Given a worker for every boundary
    # When an order is placed
    order_id, customer = f"o-{uid}", f"c-{uid}"
    command_id = cluster.client.delay(PLACE_ORDER, idempotency_key=f"checkout-{uid}", **order(order_id, customer))
    cluster.client.get(command_id)

    # Then billing, charging it, publishes one PaymentProcessed (choreography), which was
    # caused by billing's copy of OrderPlaced and is in the conversation the command began
    paid = cluster.wait_for("PaymentProcessed to be published", lambda: [
        r for r in events_of(cluster, PAYMENT_PROCESSED, order_id=order_id) if r.published_at is not None])
    placed = one_event(cluster, ORDER_PLACED, order_id=order_id)
    assert len(paid) == 1
    [charge] = calls(cluster, "gateway", customer)
    assert paid[0].payload["charge_id"] == charge.payload["charge_id"]
    assert paid[0].payload["amount"] == ITEMS_TOTAL
    assert (placed.causation_id, placed.correlation_id) == (command_id, command_id)
    assert paid[0].causation_id == copy_task_id(placed.id, CHARGE)
    assert paid[0].correlation_id == command_id


# ---- a subscriber offline at publish time ------------------------------------------------------
@pytest.mark.parametrize("broker", ["redis", "embedded", "amqp", "amqp-quorum"])
def test_event_published_while_subscriber_is_offline_is_handled_when_it_starts(
        own, broker: str, uid: str, request: pytest.FixtureRequest):
    # Given workers for every boundary but billing
    scenario = own(broker)
    start_worker(scenario, request, boundaries=[EVERY_BOUNDARY_BUT_BILLING], name="no-billing")
    client = scenario.driver()

    # When an order is placed
    order_id, customer = f"o-{uid}", f"c-{uid}"
    client.get(client.delay(PLACE_ORDER, idempotency_key=f"checkout-{uid}", **order(order_id, customer)))
    event_id = one_event(scenario, ORDER_PLACED, order_id=order_id).id
    scenario.wait_for("the online subscriber to handle the event",
                      lambda: deliveries(scenario, event_id) == {CONFIRM: 0, FULFIL: 0})
    time.sleep(SETTLE)

    # Then billing's copy waits in billing's durable queue, and nothing was charged
    assert queue_length(scenario, CHARGE) == 1
    assert calls(scenario, "gateway", customer) == []
    assert deliveries(scenario, event_id) == {CONFIRM: 0, FULFIL: 0}

    # When a billing worker starts
    billing = start_worker(scenario, request, boundaries=["billing"], name="billing")

    # Then it charges the order exactly once and drains the queue
    scenario.wait_for("the charge", lambda: calls(scenario, "gateway", customer))
    scenario.wait_for("billing's queue to drain", lambda: queue_length(scenario, CHARGE) == 0)
    time.sleep(SETTLE)
    assert len(calls(scenario, "gateway", customer)) == 1
    assert deliveries(scenario, event_id) == {CONFIRM: 0, CHARGE: 0, FULFIL: 0}
    assert received(billing, CHARGE) == 1
    assert len(calls(scenario, "mail", order_mail(customer))) == 1


# ---- independent retries -----------------------------------------------------------------------
@pytest.mark.parametrize("broker, database", [("redis", "sqlite"), ("embedded", "sqlite"), ("amqp", "postgresql"),
                                              ("amqp-quorum", "postgresql")],
                         ids=["redis-sqlite", "embedded-sqlite", "amqp-postgresql", "amqp-quorum-postgresql"])
def test_failing_subscriber_is_retried_on_its_own_queue_while_siblings_run_once(
        own, broker: str, database: str, uid: str, request: pytest.FixtureRequest):
    # Given a worker whose SMS port fails its first 3 calls per message
    scenario = own(broker, database)
    worker = start_worker(scenario, request, env={"BUS_FAIL_PORTS": "sms=3"}, name="flaky-sms")
    client = scenario.driver()

    # When a user registers (UserAccountCreated: welcome e-mail, welcome SMS, audit)
    new = user(uid)
    client.get(client.delay(REGISTER_USER, **new))
    event_id = one_event(scenario, USER_CREATED, user_id=new["user_id"]).id

    # Then the SMS is sent after 3 retries: 4 deliveries of send_welcome_sms, 3 failures
    scenario.wait_for("the SMS after its retries", lambda: calls(scenario, "sms", new["user_id"]), timeout=60)
    time.sleep(SETTLE)
    assert injected_failures(scenario, "sms") == [3]
    assert received(worker, WELCOME_SMS) == 4
    assert len(calls(scenario, "sms", new["user_id"])) == 1
    # ... while its siblings were delivered, and ran, exactly once
    assert received(worker, WELCOME_EMAIL) == 1
    assert received(worker, AUDIT) == 1
    assert len(calls(scenario, "mail", new["email"])) == 1
    assert audits(scenario, new["user_id"]) == 1
    assert deliveries(scenario, event_id) == {s: 0 for s in USER_SUBSCRIBERS}


@pytest.mark.parametrize("broker", ["redis", "amqp", "amqp-quorum"])
def test_subscriber_that_exhausts_its_retries_is_dead_lettered_alone(
        own, broker: str, uid: str, request: pytest.FixtureRequest):
    # Given a worker whose SMS port always fails, and whose notifications subscribers
    # give up after 2 retries (the same handlers, names and queues; a shorter policy)
    retries = 2
    scenario = own(broker)
    worker = start_worker(scenario, request, name="dead-sms", env={
        "BUS_FAIL_PORTS": "sms=99", "BUS_TASK_MODULES": FAST_RETRY_MODULES,
        "BUS_TEST_SUBSCRIBER_RETRIES": str(retries)})
    client = scenario.driver()

    # When a user registers
    new = user(uid)
    client.get(client.delay(REGISTER_USER, **new))
    event_id = one_event(scenario, USER_CREATED, user_id=new["user_id"]).id

    # Then send_welcome_sms is dead-lettered after 1 + 2 attempts, with the event, the
    # subscriber, the last error and its traceback
    scenario.wait_for("the dead letter", lambda: fetch(scenario, select(dead_letters)), timeout=60)
    time.sleep(SETTLE)
    [row] = fetch(scenario, select(dead_letters))  # one dead letter, not one per attempt or per sibling
    assert (row.reason, row.task, row.queue, row.boundary, row.attempts) == (
        "retries-exhausted", WELCOME_SMS, WELCOME_SMS, "notifications", 1)
    assert row.message_id == copy_task_id(event_id, WELCOME_SMS)
    assert row.error.startswith(f"PortUnavailable: sms failure {retries + 1} of 99 injected")
    assert row.error.endswith(f"(after {retries + 1} attempt(s))")
    assert row.traceback.startswith("Traceback (most recent call last)")
    assert "PortUnavailable: sms failure" in row.traceback and "send_welcome_sms" in row.traceback
    assert json.loads(row.body) == {**new, "_event_id": event_id}
    assert received(worker, WELCOME_SMS) == retries + 1
    assert injected_failures(scenario, "sms") == [retries + 1]
    assert calls(scenario, "sms", new["user_id"]) == []
    # ... while its siblings ran exactly once, unaffected
    assert received(worker, WELCOME_EMAIL) == 1
    assert received(worker, AUDIT) == 1
    assert len(calls(scenario, "mail", new["email"])) == 1
    assert audits(scenario, new["user_id"]) == 1
    assert deliveries(scenario, event_id) == {WELCOME_EMAIL: 0, AUDIT: 0}


# ---- other systems subscribe with plain kombu ----------------------------------------------------
def consume_foreign(scenario: Scenario, uid: str, receive: Callable[[Connection, Queue, float], list],
                    transport: Any = None) -> tuple:
    """Bind a queue of a foreign system to events.order_placed, place an order; (messages, event row).

    The foreign side is a kombu Connection with no Celery app. On Redis `transport` names
    the kombu transport explicitly (kombu's own, or the bus's), in case something in this
    process installed the bus's.
    """
    order_id, customer = f"o-{uid}", f"c-{uid}"
    exchange = Exchange(ORDER_PLACED, type="fanout", durable=True)
    plain = {"transport": transport or plain_redis.Transport} if scenario.broker == "redis" else {}
    with Connection(scenario.broker_url, **plain) as conn:
        queue = Queue(f"foreign-shop.{uid}", exchange, durable=True)(conn.default_channel)
        queue.declare()
        try:
            # When an order is placed
            scenario.client.delay(PLACE_ORDER, idempotency_key=f"checkout-{uid}", **order(order_id, customer))
            event = scenario.wait_for("OrderPlaced", lambda: events_of(scenario, ORDER_PLACED, order_id=order_id))[0]
            scenario.wait_for("the bus's subscribers to handle it",
                              lambda: len(deliveries(scenario, event.id)) == len(ORDER_SUBSCRIBERS))
            messages = receive(conn, queue, 3.0)
        finally:
            queue.delete()
    return [m for m in messages if m.payload[1].get("order_id") == order_id], event


def drain(conn: Connection, queue: Queue, seconds: float) -> list:
    """A kombu Consumer on `queue` (what a foreign service runs); the messages within `seconds`."""
    got: list = []
    with conn.Consumer(queue, callbacks=[lambda body, message: (got.append(message), message.ack())],
                       accept=["json"]):
        deadline = time.monotonic() + seconds
        while not got and time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=0.5)
            except socket.timeout:
                pass
    return got


def poll(conn: Connection, queue: Queue, seconds: float) -> list:
    """basic_get on `queue` until a message arrives or `seconds` pass."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        message = queue.get(no_ack=True, accept=["json"])
        if message is not None:
            return [message]
        time.sleep(0.1)
    return []


def assert_celery_event_message(message: Any, event: Any) -> None:
    """A Celery protocol-2 task message: headers name the event; body is [args, kwargs, embed]."""
    assert message.content_type == "application/json"
    assert message.headers["task"] == ORDER_PLACED
    assert message.headers["id"] == event.id
    args, kwargs, embed = message.payload
    assert args == []
    assert kwargs == event.payload
    assert {"order_id", "customer_id", "total", "_event_id"} <= set(kwargs)
    assert kwargs["total"] == ITEMS_TOTAL
    assert set(embed) >= {"callbacks", "errbacks", "chain", "chord"}


#: On Redis, kombu's own transport consumes a fanout-bound queue with SUBSCRIBE (PUB/SUB),
#: which is exactly what loses events; the bus's durable copies are in the queue's list.
#: Another system therefore subscribes with the bus's transport (documented in the README).
BUS_REDIS_TRANSPORT = "project.transport.redis_transport:Transport"


@pytest.mark.parametrize("cluster", [pair("amqp"), pair("redis"), pair("amqp-quorum", "postgresql")], indirect=True)
def test_plain_kombu_consumer_of_another_system_receives_events(cluster: Scenario, uid: str):
    # Given another system's queue, bound to events.order_placed with kombu (on Redis through
    # the bus's transport), consumed
    # When an order is placed (see consume_foreign)
    messages, event = consume_foreign(cluster, uid, drain, transport=BUS_REDIS_TRANSPORT)
    # Then the foreign consumer receives the event once, as a Celery task message
    assert len(messages) == 1
    assert_celery_event_message(messages[0], event)


@on_cluster(pair("redis"))
def test_plain_kombu_queue_bound_on_redis_gets_a_durable_copy(cluster: Scenario, uid: str):
    # Given another system's queue, bound to events.order_placed with plain kombu on Redis
    # When an order is placed
    messages, event = consume_foreign(cluster, uid, poll)
    # Then the bus pushed a copy into that queue too: basic_get finds it
    assert len(messages) == 1
    assert_celery_event_message(messages[0], event)


@on_cluster(pair("amqp"), pair("amqp-quorum", "postgresql"))
def test_rabbitmq_holds_a_real_fanout_exchange_per_event(cluster: Scenario, topology: dict, uid: str):
    # Given a worker for every boundary (it declared every subscriber queue and its exchange)
    # When RabbitMQ lists the exchanges of the scenario's vhost
    vhost = cluster.broker_url.rsplit("/", 1)[1]
    done = subprocess.run(["rabbitmqctl", "-q", "list_exchanges", "-p", vhost, "name", "type"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    listed = dict(line.split()[:2] for line in done.stdout.splitlines() if len(line.split()) >= 2)
    # Then every event with subscribers has a fanout exchange named after it
    expected = {e["exchange"] for e in topology["events"] if e["subscribers"]}
    assert {ORDER_PLACED, USER_CREATED} <= expected
    assert {name: listed.get(name) for name in expected} == {name: "fanout" for name in expected}


# ---- outbox relay and inbox ---------------------------------------------------------------------
@on_cluster(pair("redis"), pair("amqp", "postgresql"), pair("amqp-quorum", "postgresql"))
def test_relay_publishes_events_a_crash_left_in_the_outbox(cluster: Scenario, events_drivers, uid: str):
    # Given an OrderPlaced committed to the outbox by a worker that died before publishing it
    order_id, customer = f"o-{uid}", f"c-{uid}"
    fields = {"order_id": order_id, "customer_id": customer, "total": ITEMS_TOTAL}
    [event_id] = events_drivers(cluster).call("write_event", contract=ORDER_PLACED_CONTRACT, fields=fields,
                                              boundary="orders", origin=f"orders.place_order:crash-{uid}")
    # ... nothing happens: it is not published, so nobody handles it
    time.sleep(3)
    assert calls(cluster, "gateway", customer) == []
    assert deliveries(cluster, event_id) == {}
    pending = unpublished(cluster)
    assert event_id in pending

    # When the relay runs once
    done = cluster.bus("relay", "--once", "--grace", "0")

    # Then it publishes what was pending (that row; the cluster is shared, so count them),
    assert done.returncode == 0, done.stderr
    assert f"relayed {len(pending)} outbox row(s)" in done.stdout
    # ... and each subscriber handles the event exactly once
    cluster.wait_for("the subscribers", lambda: len(deliveries(cluster, event_id)) == len(ORDER_SUBSCRIBERS))
    time.sleep(SETTLE)
    assert deliveries(cluster, event_id) == {CHARGE: 0, CONFIRM: 0, FULFIL: 0}
    assert len(calls(cluster, "gateway", customer)) == 1
    assert len(calls(cluster, "mail", order_mail(customer))) == 1
    assert fetch(cluster, select(outbox.c.published_at).where(outbox.c.id == event_id))[0][0] is not None


@on_cluster(pair("embedded"), pair("redis"), pair("amqp", "postgresql"), pair("amqp-quorum", "postgresql"))
def test_event_published_twice_runs_each_subscriber_once(cluster: Scenario, events_drivers, uid: str):
    # Given an OrderPlaced in the outbox, published once and handled by both subscribers
    driver = events_drivers(cluster)
    order_id, customer = f"o-{uid}", f"c-{uid}"
    fields = {"order_id": order_id, "customer_id": customer, "total": ITEMS_TOTAL}
    [event_id] = driver.call("write_event", contract=ORDER_PLACED_CONTRACT, fields=fields,
                             boundary="orders", origin=f"orders.place_order:twice-{uid}")
    assert driver.call("publish_outbox", ids=[event_id]) == 1
    cluster.wait_for("the first delivery", lambda: deliveries(cluster, event_id) == {CHARGE: 0, CONFIRM: 0, FULFIL: 0})
    cluster.wait_for("billing's PaymentProcessed to be published", lambda: [
        r for r in events_of(cluster, PAYMENT_PROCESSED, order_id=order_id) if r.published_at is not None])
    # ... and the order's fulfilment (out of stock here: cancel and refund) done, all it sent published
    cluster.wait_for("the order's fulfilment to complete", lambda: [tuple(r) for r in cluster.rows(
        "SELECT status FROM bus_process_instances WHERE manager = 'fulfilment' AND instance_id = :o",
        o=order_id)] == [("completed",)] and unpublished(cluster) == [])

    # When the row is published again (a crash between publish and mark: once the crashed
    # publisher's claim has expired, the relay re-sends it)
    with cluster.engine().begin() as conn:
        conn.execute(update(outbox).where(outbox.c.id == event_id)
                     .values(published_at=None, claimed_until=utcnow() - timedelta(seconds=1)))
    pending = unpublished(cluster)
    assert event_id in pending
    assert driver.call("relay") == len(pending)

    # Then both subscribers absorb the second delivery: one charge, one e-mail, one duplicate each
    cluster.wait_for("the duplicate to be absorbed",
                     lambda: deliveries(cluster, event_id) == {CHARGE: 1, CONFIRM: 1, FULFIL: 1})
    time.sleep(SETTLE)
    assert deliveries(cluster, event_id) == {CHARGE: 1, CONFIRM: 1, FULFIL: 1}
    assert len(calls(cluster, "gateway", customer)) == 1
    assert len(calls(cluster, "mail", order_mail(customer))) == 1
    assert len(events_of(cluster, PAYMENT_PROCESSED, order_id=order_id)) == 1


# ---- the catalog ----------------------------------------------------------------------------------
def test_topology_lists_every_event_with_exchange_type_owner_and_subscribers(topology: dict):
    # Given the reference domain's tasks modules
    # When `bus topology --json` runs (the `topology` fixture)
    events = {e["event"]: e for e in topology["events"]}

    # Then every event is listed with its fanout exchange, owner and subscribers (task = queue)
    def subscribers(event: str) -> list[tuple[str, str, str]]:
        return [(s["task"], s["queue"], s["boundary"]) for s in events[event]["subscribers"]]

    assert sorted(events) == ["OrderPlaced", "OutOfStock", "PaymentProcessed", "StockReserved", "UserAccountCreated"]
    assert {name: (e["exchange"], e["type"], e["owner"]) for name, e in events.items()} == {
        "OrderPlaced": (ORDER_PLACED, "fanout", "orders"),
        "PaymentProcessed": (PAYMENT_PROCESSED, "fanout", "billing"),
        "UserAccountCreated": (USER_CREATED, "fanout", "accounts"),
        "StockReserved": ("events.stock_reserved", "fanout", "inventory"),
        "OutOfStock": ("events.out_of_stock", "fanout", "inventory"),
    }
    assert subscribers("OrderPlaced") == [(CHARGE, CHARGE, "billing"), (FULFIL, FULFIL, "fulfilment"),
                                          (CONFIRM, CONFIRM, "notifications")]
    assert subscribers("UserAccountCreated") == [
        (AUDIT, AUDIT, "audit"), (WELCOME_EMAIL, WELCOME_EMAIL, "notifications"),
        (WELCOME_SMS, WELCOME_SMS, "notifications")]
    assert subscribers("PaymentProcessed") == [("fulfilment.fulfilment.payment_processed",
                                                "fulfilment.fulfilment.payment_processed", "fulfilment")]
    assert events["OrderPlaced"]["subscribers"][0]["handler"] == "handlers.billing.charge_payment"
