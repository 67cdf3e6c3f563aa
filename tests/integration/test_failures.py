"""Failures (issue 5): dead letters and replay, poison input, crash safety, the fault suite.

Real brokers, databases and `celery worker` processes; every scenario is a test's own
(fresh Redis database, RabbitMQ vhost, PostgreSQL database), closed at its end.
- replay of a dead-lettered subscriber reaches that subscriber only, keeps its ids, is
  absorbed by the inbox when repeated: redis, amqp (with the dead-letter exchange wired);
- a corpus of bad messages injected with redis-py / pika, each kept with its reason and
  its bytes, the worker serving on, and a byte-exact replay: redis, amqp, amqp-quorum;
- a bad message arriving while the database refuses connections waits, unacked, for its
  record; the worker keeps running: redis, amqp;
- RabbitMQ's dead-letter exchange (queue arguments, and the documented policy): a message
  rejected by other code is kept too;
- a pool process SIGKILLed mid-handler is redelivered at once; a whole worker SIGKILLed
  is redelivered at once on RabbitMQ, after the visibility timeout on Redis; applied once;
- PostgreSQL connections cut while commands run: retried with backoff, applied once;
- bench/faults.py at CI size: on amqp, nothing lost, nothing duplicated; on redis with
  --edges (charges failing past three retries, exhausted SMS, refused registrations,
  concurrent duplicates, conflicting payloads) the same, and every exhausted delivery
  dead-lettered.
"""
from __future__ import annotations

import base64
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterator

import pika
import pytest
import redis
from sqlalchemy import create_engine, text

from project.dead_letters.dlx import POLICY_PATTERN
from project.testing.processes import WorkerProcess
from project.transport.dispatch import copy_task_id
from project.transport.redis_transport import NOT_A_MESSAGE
from tests.conftest import REPO
from tests.integration.conftest import opened
from tests.integration.support.bus_services import require
from tests.integration.support.helpers import (
    ITEMS_TOTAL,
    PLACE_ORDER,
    REGISTER_USER,
    order,
)
from tests.integration.support.scenarios import PG_ADMIN_URL, Scenario

pytestmark = pytest.mark.integration

WELCOME_SMS = "notifications.send_welcome_sms"
WELCOME_EMAIL = "notifications.send_welcome_email"
AUDIT = "audit.record_user_created"
HOLD_JOB = "crashlab.hold_job"
DEFAULT_MODULES = "tasks.orders,tasks.accounts,tasks.billing,tasks.notifications,tasks.audit"
FAST_RETRY_MODULES = ("tasks.orders,tasks.accounts,tasks.billing,tasks.audit,"
                      "tests.integration.support.clients.notifications_fast_retry")
CRASH_MODULES = f"{DEFAULT_MODULES},tests.integration.support.crash_tasks"
#: seconds to wait, after the expected effects exist, for effects that must not come
SETTLE = 1.5
STOP_GRACE = 4.0


# ---- fixtures and helpers ------------------------------------------------------------------------
@pytest.fixture
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Scenario]]:
    """`own(broker, database, **env)`: a scenario of this test alone (its env extended), closed at the end."""
    with ExitStack() as stack:
        def open_(broker: str, database: str = "sqlite", **env: str) -> Scenario:
            scenario = stack.enter_context(opened(broker, database, tmp_path_factory, "fail"))
            scenario.env.update(env)
            return scenario
        yield open_


def start_worker(scenario: Scenario, request: pytest.FixtureRequest, **options: Any) -> WorkerProcess:
    worker = scenario.start_worker(**options)
    request.addfinalizer(lambda: worker.stop(grace=STOP_GRACE))
    return worker


def letters(scenario: Scenario, where: str = "1=1", **params: Any) -> list[Any]:
    return scenario.rows(f"SELECT * FROM bus_dead_letters WHERE {where} ORDER BY id", **params)


def json_of(value: Any) -> Any:
    """A JSON column read with plain SQL (text on SQLite, decoded on PostgreSQL)."""
    return json.loads(value) if isinstance(value, str) else value


def received(worker: WorkerProcess, task: str, task_id: str | None = None) -> int:
    """How many messages of `task` (with id `task_id`) the worker received, from its log."""
    ident = re.escape(task_id) if task_id else "[0-9a-f-]+"
    return len(re.findall(rf"Task {re.escape(task)}\[{ident}\] received", worker.logfile.read_text()))


def calls(scenario: Scenario, port: str, target: str) -> int:
    return len(scenario.rows("SELECT id FROM port_calls WHERE port = :p AND target = :t", p=port, t=target))


def inbox(scenario: Scenario, event_id: str) -> dict[str, int]:
    return {r.subscriber: r.duplicates for r in scenario.rows(
        "SELECT subscriber, duplicates FROM bus_inbox WHERE event_id = :e", e=event_id)}


def cli(scenario: Scenario, *args: str) -> subprocess.CompletedProcess:
    done = scenario.bus("dlq", *args)
    assert done.returncode == 0, f"bus dlq {' '.join(args)}: {done.stdout}\n{done.stderr}"
    return done


def cli_json(scenario: Scenario, *args: str) -> Any:
    return json.loads(cli(scenario, *args, "--json").stdout)


# ---- replay ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("broker", ["redis", "amqp", "amqp-quorum"])
def test_replayed_subscriber_dead_letter_reaches_that_subscriber_only_and_keeps_its_ids(
        own, broker: str, uid: str, request: pytest.FixtureRequest):
    # Given a worker whose SMS port fails 3 times per message, and whose notifications
    # subscribers give up after 1 + 2 attempts (on RabbitMQ with the dead-letter exchange wired)
    scenario = own(broker, BUS_RABBITMQ_DEAD_LETTERS="arguments")
    worker = start_worker(scenario, request, name="replay", env={
        "BUS_FAIL_PORTS": "sms=3", "BUS_TASK_MODULES": FAST_RETRY_MODULES, "BUS_TEST_SUBSCRIBER_RETRIES": "2"})
    client = scenario.driver()
    user = {"user_id": f"u-{uid}", "email": f"u-{uid}@example.com", "name": "Ada"}
    client.get(client.delay(REGISTER_USER, **user))
    [event] = scenario.rows("SELECT id FROM bus_outbox WHERE name = 'events.user_account_created'")
    sms_copy = copy_task_id(event.id, WELCOME_SMS)
    scenario.wait_for("the SMS dead letter", lambda: letters(scenario), timeout=60)
    scenario.wait_for("the siblings", lambda: len(inbox(scenario, event.id)) == 2)

    # When the operator lists the dead letters and shows the one there is
    [listed] = cli_json(scenario, "list", "--queue", WELCOME_SMS)
    shown = cli_json(scenario, "show", str(listed["id"]))
    # Then it names the subscriber, the reason, the event's copy and its fields
    assert (listed["reason"], listed["task"], listed["message_id"], listed["replays"]) == (
        "retries-exhausted", WELCOME_SMS, sms_copy, 0)
    assert json.loads(shown["body_text"]) == {**user, "_event_id": event.id}
    assert "PortUnavailable: sms failure 3 of 3" in shown["error"]

    # When it is replayed (the SMS port works by now: its 3 failures are spent)
    assert cli_json(scenario, "replay", str(listed["id"])) == {"replayed": [listed["id"]]}

    # Then the SMS goes out once, to that subscriber's queue only, under the same task id
    scenario.wait_for("the replayed SMS", lambda: calls(scenario, "sms", user["user_id"]) == 1)
    time.sleep(SETTLE)
    assert received(worker, WELCOME_SMS, sms_copy) == 3 + 1
    assert received(worker, WELCOME_EMAIL) == 1 and received(worker, AUDIT) == 1
    assert calls(scenario, "mail", user["email"]) == 1
    assert inbox(scenario, event.id) == {WELCOME_SMS: 0, WELCOME_EMAIL: 0, AUDIT: 0}
    # ... and the entry is kept, marked replayed, no longer pending
    [after] = cli_json(scenario, "list")
    assert (after["id"], after["replays"]) == (listed["id"], 1) and after["replayed_at"]
    assert cli_json(scenario, "list", "--pending") == []

    # When it is replayed again (an operator's double click)
    cli(scenario, "replay", "--queue", WELCOME_SMS, "--all")
    # Then the subscriber's inbox absorbs it: still one SMS
    scenario.wait_for("the duplicate to be absorbed", lambda: inbox(scenario, event.id)[WELCOME_SMS] == 1)
    time.sleep(SETTLE)
    assert calls(scenario, "sms", user["user_id"]) == 1
    assert received(worker, WELCOME_EMAIL) == 1 and received(worker, AUDIT) == 1


# ---- the bad-message corpus ------------------------------------------------------------------------
def celery_headers(task: str, message_id: str) -> dict[str, Any]:
    """The headers a Celery 5 client sends (protocol 2)."""
    return {"lang": "py", "task": task, "id": message_id, "root_id": message_id, "parent_id": None,
            "group": None, "retries": 0, "eta": None, "expires": None, "timelimit": [None, None],
            "shadow": None, "argsrepr": "()", "kwargsrepr": "{}", "origin": "corpus@test"}


def celery_body(kwargs: dict[str, Any]) -> bytes:
    return json.dumps([[], kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]).encode()


#: the limit the corpus's worker runs with (BUS_MAX_MESSAGE_BYTES)
CORPUS_LIMIT = 64 * 1024


def corpus(uid: str, broker: str) -> list[dict[str, Any]]:
    """Messages no worker can run: name, expected reason, headers (or None), body, content type."""
    def item(name: str, reason: str, body: bytes, content_type: str | None = "application/json",
             headers: dict | None = None, task: str | None = PLACE_ORDER, **extra: Any) -> dict[str, Any]:
        if headers is None and task is not None:
            headers = celery_headers(task, str(uuid.uuid4()))
        return {"name": name, "reason": reason, "body": body, "content_type": content_type,
                "content_encoding": "utf-8" if content_type == "application/json" else "binary",
                "headers": headers, **extra}

    items = [
        item("unknown-task", "unknown-task", celery_body({"order_id": f"o-{uid}-u"}), task="orders.no_such_command"),
        item("broken-json", "undecodable", f'{{"order_id": "o-{uid}-j", '.encode()),
        item("pickle", "refused-content-type", pickle.dumps(([], {"order_id": f"o-{uid}-p"}, {})),
             "application/x-python-serialize"),
        item("yaml", "refused-content-type", f"order_id: o-{uid}-y\n".encode(), "application/x-yaml"),
        item("msgpack", "refused-content-type", b"\x81\xa8order_id\xb0" + f"o-{uid}-m".ljust(16).encode()[:16],
             "application/x-msgpack"),
        item("oversized", "too-large", celery_body({**order(f"o-{uid}-big"), "note": "x" * (CORPUS_LIMIT + 1)})),
        item("schema-invalid", "invalid", celery_body({"order_id": f"o-{uid}-i", "items": "none"}),
             kwargs={"order_id": f"o-{uid}-i", "items": "none"}),
        item("missing-headers", "undecodable", celery_body(order(f"o-{uid}-h")), headers={}, task=None),
        item("not-celery", "undecodable", json.dumps({"hello": f"world-{uid}"}).encode(), headers={}, task=None),
        item("binary", "refused-content-type", os.urandom(64) + uid.encode(), "application/octet-stream",
             headers={}, task=None),
    ]
    if not broker.startswith("amqp"):  # a list item pushed by hand, not even a kombu message
        items.append(item("not-a-kombu-message", "undecodable", f"garbage-{uid}".encode(), None, headers={},
                          task=None, bare=True))
    return items


def fields_of(stored: dict[str, Any]) -> dict[str, Any]:
    """A command's fields as the execution stores them (with the idempotency key it had: none here)."""
    assert stored.get("idempotency_key") is None, stored
    return {k: v for k, v in stored.items() if k != "idempotency_key"}


class Injector:
    """Publishes raw messages to a queue of a scenario: pika on RabbitMQ, redis-py on Redis."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.scenario.broker_url)

    def pika(self) -> pika.BlockingConnection:
        return pika.BlockingConnection(pika.URLParameters(self.scenario.broker_url))

    def publish(self, queue: str, items: list[dict[str, Any]]) -> None:
        if self.scenario.rabbitmq:
            with self.pika() as conn:
                channel = conn.channel()
                for m in items:
                    channel.basic_publish("", queue, m["body"], pika.BasicProperties(
                        content_type=m["content_type"], content_encoding=m["content_encoding"],
                        headers=m["headers"] or None, delivery_mode=2))
            return
        client = self.redis()
        for m in items:
            if m.get("bare"):
                client.lpush(queue, m["body"])
                continue
            client.lpush(queue, json.dumps({  # kombu's envelope of a message on Redis
                "body": base64.b64encode(m["body"]).decode(), "content-encoding": m["content_encoding"],
                "content-type": m["content_type"], "headers": m["headers"] or {},
                "properties": {"delivery_mode": 2, "priority": 0, "body_encoding": "base64",
                               "delivery_tag": str(uuid.uuid4()),
                               "delivery_info": {"exchange": "", "routing_key": queue}}}))
        client.close()

    def take_all(self, queue: str) -> list[dict[str, Any]]:
        """Every message now in `queue`, removed: body, content type, headers."""
        taken = []
        if self.scenario.rabbitmq:
            with self.pika() as conn:
                channel = conn.channel()
                while True:
                    method, props, body = channel.basic_get(queue, auto_ack=True)
                    if method is None:
                        return taken
                    headers = dict(props.headers or {})
                    headers.pop("x-delivery-count", None)  # a quorum queue's, added when it delivers
                    taken.append({"body": body, "content_type": props.content_type, "headers": headers})
        client = self.redis()
        while (raw := client.rpop(queue)) is not None:
            envelope = json.loads(raw)
            taken.append({"body": base64.b64decode(envelope["body"]), "content_type": envelope["content-type"],
                          "headers": envelope.get("headers") or {}})
        client.close()
        return taken


# Not the embedded broker: it is a Redis server of the bus's own behind the same transport (test_bad_messages.py
# sends bad messages on its cluster pair)
@pytest.mark.parametrize("broker", ["redis", "amqp", "amqp-quorum"])
def test_every_bad_message_is_kept_with_its_reason_and_bytes_and_replays_byte_exact(
        own, broker: str, uid: str, request: pytest.FixtureRequest):
    # Given a worker for every boundary with a 64 KiB message limit
    scenario = own(broker)
    worker = start_worker(scenario, request, name="corpus", env={"BUS_MAX_MESSAGE_BYTES": str(CORPUS_LIMIT)})
    client = scenario.driver()
    inject = Injector(scenario)
    items = corpus(uid, broker)

    # When a foreign system pushes the corpus into orders.place_order with raw clients
    inject.publish(PLACE_ORDER, items)

    # Then every message is in the store, once, with its reason, its content type and its bytes
    scenario.wait_for("a dead letter per bad message", lambda: len(letters(scenario)) >= len(items), timeout=60)
    time.sleep(SETTLE)
    rows = letters(scenario)
    assert len(rows) == len(items), [(r.reason, r.error) for r in rows]
    by_body = {bytes(r.body): r for r in rows}
    for m in items:
        if m["reason"] == "invalid":
            [row] = [r for r in rows if r.message_id == m["headers"]["id"]]
            assert fields_of(json.loads(bytes(row.body))) == m["kwargs"], m["name"]
            assert "customer_id: Field required" in row.error
        else:
            row = by_body.get(m["body"])
            assert row is not None, f"{m['name']}: no dead letter with its bytes"
            assert row.content_type == (m["content_type"] or NOT_A_MESSAGE), m["name"]
            assert json_of(row.headers) == (m["headers"] or {}), m["name"]
        assert (row.reason, row.queue) == (m["reason"], PLACE_ORDER), m["name"]
    # ... nothing is left in the queue, the worker still runs and serves a valid command
    assert inject.take_all(PLACE_ORDER) == []
    assert worker.process.poll() is None, worker.log()
    assert client.get(client.delay(PLACE_ORDER, **order(f"o-{uid}-ok"))) == {"order_id": f"o-{uid}-ok",
                                                                               "total": ITEMS_TOTAL}

    # When the worker is gone and the queue's dead letters are replayed
    scenario.stop_worker(worker, grace=STOP_GRACE)
    done = cli(scenario, "replay", "--queue", PLACE_ORDER)  # 10 or more: behind a progress bar

    # Then the queue holds each of them again: the refused ones byte for byte with their
    # content type and headers, the invalid one as a task message with its id and fields
    assert f"replayed {len(rows)} dead letter(s) of {PLACE_ORDER}" in done.stdout
    assert [r["replays"] for r in cli_json(scenario, "list")] == [1] * len(rows)
    again = inject.take_all(PLACE_ORDER)
    assert len(again) == len(items)
    for m in items:
        if m["reason"] == "invalid":
            [copy] = [c for c in again if c["headers"].get("id") == m["headers"]["id"]]
            assert fields_of(json.loads(copy["body"])[1]) == m["kwargs"]
            assert copy["headers"]["task"] == PLACE_ORDER
            continue
        [copy] = [c for c in again if c["body"] == m["body"]]
        assert copy["content_type"] == (m["content_type"] or NOT_A_MESSAGE), m["name"]
        assert copy["headers"] == (m["headers"] or {}), m["name"]


# the record waits in the worker's consumer, whatever the queue type: classic RabbitMQ queues stand for quorum ones
@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_a_bad_message_waits_for_the_database_to_be_recorded_and_the_worker_keeps_running(
        own, broker: str, uid: str, request: pytest.FixtureRequest):
    # Given a worker on PostgreSQL, and a database that refuses every connection
    scenario = own(broker, "postgresql")
    worker = start_worker(scenario, request, name="store-down")
    client = scenario.driver()
    database = scenario.database_url.rsplit("/", 1)[1]
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")

    def connections(allowed: bool) -> None:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {str(allowed).lower()}'))
            if not allowed:
                conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"),
                             {"d": database})
    request.addfinalizer(admin.dispose)
    request.addfinalizer(lambda: connections(True))
    connections(False)

    # When a message that can never run arrives while the store is down
    body = f'{{"order_id": "o-{uid}", '.encode()
    message = {"name": "broken", "body": body, "content_type": "application/json", "content_encoding": "utf-8",
               "headers": celery_headers(PLACE_ORDER, str(uuid.uuid4()))}
    Injector(scenario).publish(PLACE_ORDER, [message])
    time.sleep(4)
    # Then the worker keeps running (the record is retried, the message is not acked without it)
    assert worker.process.poll() is None, worker.log()
    assert "could not dead-letter message" in worker.logfile.read_text()

    # When the database is back
    connections(True)
    # Then the message is recorded, byte for byte, once, and the worker serves commands
    [row] = scenario.wait_for("the dead letter", lambda: letters(scenario), timeout=60)
    assert (row.reason, bytes(row.body), row.message_id) == ("undecodable", body, message["headers"]["id"])
    assert client.get(client.delay(PLACE_ORDER, **order(f"o-{uid}-ok")))["order_id"] == f"o-{uid}-ok"
    assert len(letters(scenario)) == 1


# ---- RabbitMQ's dead-letter exchange ---------------------------------------------------------------
def rabbitmq_queue_arguments(scenario: Scenario) -> dict[str, str]:
    vhost = scenario.broker_url.rsplit("/", 1)[1]
    done = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "arguments"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return {line.split("\t")[0]: line.split("\t", 1)[1] for line in done.stdout.splitlines() if "\t" in line}


def reject_one(inject: Injector, queue: str, body: bytes, headers: dict, arguments: dict | None = None) -> None:
    """Publish to `queue` and reject it without requeue, as code outside the bus would."""
    with inject.pika() as conn:
        channel = conn.channel()
        channel.queue_declare(queue, durable=True, arguments=arguments or {"x-dead-letter-exchange": "bus.dead_letter"})
        channel.basic_publish("", queue, body, pika.BasicProperties(
            content_type="application/json", content_encoding="utf-8", headers=headers, delivery_mode=2))
        method = None
        while method is None:
            method, _, _ = channel.basic_get(queue)
        channel.basic_reject(method.delivery_tag, requeue=False)


def test_rabbitmq_keeps_what_other_code_rejects_and_the_bus_stores_it(own, uid: str, request: pytest.FixtureRequest):
    # Given a RabbitMQ vhost where the bus declares its queues with the dead-letter exchange
    scenario = own("amqp", BUS_RABBITMQ_DEAD_LETTERS="arguments")
    inject = Injector(scenario)
    first, second = (celery_body({**order(f"o-{uid}-{n}")}) for n in (1, 2))
    first_id, second_id = str(uuid.uuid4()), str(uuid.uuid4())
    cli(scenario, "drain")  # declares bus.dead_letter, as every worker does

    # When other code (not the bus) rejects a message of the audit subscriber's queue
    reject_one(inject, AUDIT, first, celery_headers(AUDIT, first_id))
    # Then `bus dlq drain` moves it into the store, byte for byte, naming the queue
    assert cli_json(scenario, "drain") == {"drained": 1}
    [row] = letters(scenario)
    assert (row.reason, row.queue, row.message_id, bytes(row.body)) == ("rejected-by-broker", AUDIT, first_id, first)
    assert "reason: rejected" in row.error

    # When a worker of the orders and bus boundaries runs
    start_worker(scenario, request, boundaries=["orders,bus"], name="dlx")
    # Then it declared its command queue with the dead-letter exchange
    assert "bus.dead_letter" in rabbitmq_queue_arguments(scenario)[PLACE_ORDER]
    # ... and moves what is rejected from then on into the store by itself
    reject_one(inject, AUDIT, second, celery_headers(AUDIT, second_id))
    scenario.wait_for("the worker to store the rejected message", lambda: len(letters(scenario)) == 2)
    assert letters(scenario)[1].message_id == second_id

    # When the first is replayed, it is back in that queue only, without the broker's x-death headers
    cli(scenario, "replay", str(row.id))
    [copy] = inject.take_all(AUDIT)
    assert copy["body"] == first
    assert copy["headers"] == celery_headers(AUDIT, first_id)


def test_rabbitmq_policy_mode_dead_letters_queues_declared_without_arguments(own, uid: str):
    # Given a vhost with the documented policy, where queues are declared without arguments
    # (as a plain Celery sender declares them)
    scenario = own("amqp", BUS_RABBITMQ_DEAD_LETTERS="policy")
    vhost = scenario.broker_url.rsplit("/", 1)[1]
    done = subprocess.run(["rabbitmqctl", "-q", "set_policy", "-p", vhost, "bus-dead-letters", POLICY_PATTERN,
                           '{"dead-letter-exchange":"bus.dead_letter"}', "--apply-to", "queues"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    cli(scenario, "drain")  # declares bus.dead_letter, as every worker does
    inject, body, message_id = Injector(scenario), celery_body(order(f"o-{uid}")), str(uuid.uuid4())

    # When other code rejects a message of a bus queue that has no arguments
    reject_one(inject, PLACE_ORDER, body, celery_headers(PLACE_ORDER, message_id), arguments={})

    # Then the policy dead-letters it and the bus stores it; bus.dead_letter itself is not looped
    assert scenario.wait_for("the dead-lettered message", lambda: cli_json(scenario, "drain")["drained"]) == 1
    [row] = letters(scenario)
    assert (row.reason, row.queue, row.message_id, bytes(row.body)) == (
        "rejected-by-broker", PLACE_ORDER, message_id, body)
    assert not re.match(POLICY_PATTERN, "bus.dead_letter")


# ---- crash safety ----------------------------------------------------------------------------------
def hold_marks(scenario: Scenario, job: str) -> list[tuple[int, float]]:
    """(pid, start time) of every run of hold job `job`, in start order."""
    runs = []
    for path in (scenario.home / "holds").glob(f"{job}.*"):
        _, pid, ns = path.name.rsplit(".", 2)
        runs.append((int(pid), int(ns) / 1e9))
    return sorted(runs, key=lambda run: run[1])


def audits(scenario: Scenario, job: str) -> int:
    return len(scenario.rows("SELECT id FROM audit_log WHERE what = 'hold-job' AND subject = :s", s=job))


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found |= {int(c) for c in (task / "children").read_text().split()}
        except FileNotFoundError:
            pass
    return found


@pytest.mark.parametrize("broker", ["redis", "amqp", "amqp-quorum"])
def test_killed_worker_processes_are_redelivered_and_applied_once(
        own, broker: str, uid: str, request: pytest.FixtureRequest):
    # Given a worker whose handler holds its transaction open 3 s (on Redis with a 60 s
    # visibility timeout: a redelivery within seconds is not the timeout's doing)
    scenario = own(broker, BUS_TASK_MODULES=CRASH_MODULES, BUS_UNACKED_RESTORE_INTERVAL="1")
    first = start_worker(scenario, request, name="crash-1", concurrency=2, env={"BUS_VISIBILITY_TIMEOUT": "60"})
    client = scenario.driver()

    # When the pool process running a job is SIGKILLed mid-handler
    job = f"pool-{uid}"
    task_id = client.delay(HOLD_JOB, job_id=job, hold=3)
    [(pid, _)] = scenario.wait_for("the job to start", lambda: hold_marks(scenario, job))
    assert pid in children(first.pid)
    os.kill(pid, signal.SIGKILL)
    killed = time.time()

    # Then the job runs again at once (not after the visibility timeout), in another process,
    # and its effect is committed once
    assert client.get(task_id, timeout=30) == {"job_id": job, "pid": hold_marks(scenario, job)[-1][0]}
    runs = hold_marks(scenario, job)
    assert len(runs) == 2 and runs[1][0] != pid
    assert runs[1][1] - killed < 10  # the worker notices its lost process within a few seconds
    time.sleep(SETTLE)
    assert audits(scenario, job) == 1
    assert first.process.poll() is None

    # When the whole worker (main process and pool) is SIGKILLed mid-handler, and another
    # starts (on Redis with an 11 s visibility timeout, swept every second). It serves the
    # crash lab only: a worker refuses a visibility timeout that a retry of its tasks can
    # wait out (the command policy waits up to 8 s, billing's up to 30 s, and a message
    # whose dead letter the store could not take is retried after 10 s).
    visibility = 11
    job = f"worker-{uid}"
    task_id = client.delay(HOLD_JOB, job_id=job, hold=3)
    [(_, started)] = scenario.wait_for("the job to start", lambda: hold_marks(scenario, job))
    first.kill()
    second = start_worker(scenario, request, name="crash-2", concurrency=2,
                          env={"BUS_VISIBILITY_TIMEOUT": str(visibility),
                               "BUS_TASK_MODULES": "tests.integration.support.crash_tasks"})
    ready = time.time()

    # Then the job runs again and commits once: on RabbitMQ as soon as the new worker
    # consumes, on Redis once the message is older than the visibility timeout
    assert client.get(task_id, timeout=60) == {"job_id": job, "pid": hold_marks(scenario, job)[-1][0]}
    [(_, _), (pid2, restarted)] = hold_marks(scenario, job)
    assert pid2 in children(second.pid)
    if broker == "redis":  # not before the visibility timeout; then within a sweep (1 s) and some slack
        earliest = started + visibility
        assert earliest - 0.5 <= restarted <= max(earliest, ready) + 1 + 3, (started, ready, restarted)
    else:
        assert restarted - ready < 2.5, (ready, restarted)
    time.sleep(SETTLE)
    assert audits(scenario, job) == 1


def test_database_connections_cut_while_commands_run_are_retried_not_failed(
        own, uid: str, request: pytest.FixtureRequest):
    # Given a worker on PostgreSQL whose handler holds each transaction open 0.3 s
    scenario = own("redis", "postgresql", BUS_TASK_MODULES=CRASH_MODULES)
    worker = start_worker(scenario, request, name="pg-cut", concurrency=2)
    client = scenario.driver()
    database = scenario.database_url.rsplit("/", 1)[1]
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    request.addfinalizer(admin.dispose)
    cut, stop = [], threading.Event()

    def cut_connections() -> None:  # the database drops every connection of the bus, again and again
        while not stop.is_set():
            with admin.connect() as conn:
                cut.extend(conn.execute(text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :d AND pid <> pg_backend_pid() AND state = 'idle in transaction'"),
                    {"d": database}).scalars())
            time.sleep(0.25)

    # When 12 commands run while their connections are cut for a few seconds
    jobs = [f"pg-{uid}-{n}" for n in range(12)]
    cutter = threading.Thread(target=cut_connections, daemon=True)
    cutter.start()
    try:
        task_ids = [client.delay(HOLD_JOB, job_id=job, hold=0.3) for job in jobs]
        time.sleep(4)
    finally:
        stop.set()
        cutter.join(10)

    # Then transactions were cut, the commands were retried with backoff, and every one
    # succeeded with its effect committed once, nothing dead-lettered
    assert [client.get(t, timeout=60)["job_id"] for t in task_ids] == jobs
    assert sum(cut) >= 1, "no transaction was cut: the test proved nothing"
    retries = re.findall(r"crashlab\.hold_job\[[0-9a-f-]+\] retry: Retry in", worker.logfile.read_text())
    assert len(retries) >= 1, worker.log()
    time.sleep(SETTLE)
    assert {job: audits(scenario, job) for job in jobs} == {job: 1 for job in jobs}
    assert letters(scenario) == []


# ---- the fault suite at CI size -------------------------------------------------------------------
def run_faults(tmp_path: Path, broker: str, *options: str) -> tuple[dict[str, Any], float]:
    """Run bench/faults.py --json with `options`: its report (it must exit 0) and the seconds it took.

    Past the timeout it is stopped with SIGTERM (it then stops the workers it started, by their
    PIDs), and SIGKILLed only if it has not exited 30 s later.
    """
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, str(REPO / "bench" / "faults.py"), "--broker", broker, *options,
                                "--json", "--workdir", str(tmp_path)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        stdout, stderr = process.communicate(timeout=170)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            stdout, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        pytest.fail(f"the fault run did not finish in 170 s (stopped)\n{stdout}\n{stderr[-4000:]}")
    assert process.returncode == 0, f"{stdout}\n{stderr[-4000:]}"
    return json.loads(stdout), time.monotonic() - started


# Classic RabbitMQ queues in CI (about 45 s); on Redis the edge run below kills pool processes under the
# same checks (nothing lost, nothing applied twice, every subscriber's delivery once). Quorum queues have their
# own tests (test_quorum.py, the amqp-quorum pair of every cluster test); docs/reliability.md has the full-size
# runs on every broker
@pytest.mark.parametrize("broker", ["amqp"])
def test_fault_suite_loses_and_duplicates_nothing(broker: str, tmp_path: Path):
    # Given the fault suite at CI size: 200 commands (duplicates mixed in), 5 pool kills
    require(broker)
    # When it runs
    report, elapsed = run_faults(tmp_path, broker, "--commands", "200", "--kills", "5")
    # Then it exits 0 within 90 s, after 5 kills, with every command applied once and every
    # event delivered once to each of its subscribers
    assert report["kills"] == 5
    assert report["commands_sent"] == 200 and report["unique_commands"] < 200
    assert report["handler_effects_committed"] == report["unique_commands"]
    assert report["lost_deliveries"] == 0 and report["duplicated_effects"] == 0
    assert report["duplicated_subscriber_effects"] == 0
    assert all(n == report["events_published"][event] for event, subs in report["deliveries"].items()
               for n in subs.values())
    assert elapsed < 90, f"the CI-size fault run took {elapsed:.0f}s"


# Redis only in CI (about 45 s; batched, the default there); docs/reliability.md has the full-size runs on every broker
@pytest.mark.parametrize("broker", ["redis"])
def test_fault_suite_at_the_edges_loses_nothing_and_dead_letters_every_exhausted_delivery(broker: str,
                                                                                         tmp_path: Path):
    # Given the fault suite's edge scenario at CI size, its plan fixed by a seed: 100 sends with bursts
    # of identical sends, conflicting payloads and registrations reusing a taken e-mail; a gateway
    # failing 4 times per charge; users whose every SMS fails; 3 pool kills
    require(broker)
    # When it runs
    report, elapsed = run_faults(tmp_path, broker, "--edges", "--commands", "100", "--kills", "3", "--seed", "17")
    edges, exhausted = report["edges"], report["edges"]["exhausted"]
    # Then it exits 0 after 3 kills: no command and no delivery lost, nothing applied twice
    assert report["kills"] == 3
    assert report["lost_commands"] == 0 and report["lost_deliveries"] == 0
    assert report["duplicated_effects"] == 0 and report["duplicated_subscriber_effects"] == 0
    assert report["handler_effects_committed"] + report["refused_commands"] == report["unique_commands"]
    # ... every order charged once, most only after more than three retries
    assert report["gateway_charges"] == report["events_published"]["events.order_placed"] > 0
    assert edges["charges_past_three_retries"] > report["gateway_charges"] / 2
    # ... every SMS of an unreachable user dead-lettered after all its policy's attempts, none handled
    assert exhausted["expected"] > 0 and exhausted["dead_lettered"] == exhausted["expected"]
    assert exhausted["by_attempts"] == {str(exhausted["policy_attempts"]): exhausted["expected"]}
    assert exhausted["with_inbox_claim"] == 0
    # ... every refusal stored with its key, its duplicates refused without running again
    assert report["refused_commands"] > 0
    assert edges["refusals_not_stored"] == edges["refusals_run_again"] == edges["emails_registered_twice"] == 0
    # ... every conflicting payload refused and dead-lettered, none applied
    assert edges["conflicting_keys"] > 0 and edges["conflicts_dead_lettered"] == edges["conflicting_keys"]
    assert edges["conflicts_not_refused"] == edges["conflicts_applied"] == 0
    assert elapsed < 90, f"the CI-size edge run took {elapsed:.0f}s"
