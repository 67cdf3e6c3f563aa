"""Quorum queues on the local RabbitMQ (issue 8): BUS_RABBITMQ_QUEUE_TYPE=quorum.

The commands, events and failures suites also run on the `amqp-quorum` scenarios; what
is specific to quorum queues is here:
- the declared layout: quorum queues, each on `bus.queues` by its name, and Celery's
  delayed delivery bound to `bus.queues` only (never to an event's fanout);
- a delayed retry travels through RabbitMQ's delay exchanges and reaches its subscriber only;
- the delivery limit dead-letters a message that keeps killing its worker.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from contextlib import ExitStack
from typing import Any, Callable, Iterator

import pytest

from project.testing.processes import WorkerProcess
from tests.integration.conftest import opened
from tests.integration.support.helpers import REGISTER_USER
from tests.integration.support.scenarios import Scenario

WELCOME_SMS, WELCOME_EMAIL, AUDIT = ("notifications.send_welcome_sms", "notifications.send_welcome_email",
                                     "audit.record_user_created")
HOLD_JOB = "crashlab.hold_job"
MODULES = "tasks.orders,tasks.accounts,tasks.billing,tasks.audit"
FIXED_RETRY_MODULES = f"{MODULES},tests.integration.support.clients.notifications_fast_retry"
CRASH_MODULES = f"{MODULES},tasks.notifications,tests.integration.support.crash_tasks"


@pytest.fixture
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Scenario]]:
    """`own(**env)`: a quorum-queue scenario of this test alone, closed at its end."""
    with ExitStack() as stack:
        def open_(database: str = "sqlite", **env: str) -> Scenario:
            scenario = stack.enter_context(opened("amqp-quorum", database, tmp_path_factory, "quorum"))
            scenario.env.update(env)
            return scenario
        yield open_


def start_worker(scenario: Scenario, request: pytest.FixtureRequest, **options: Any) -> WorkerProcess:
    worker = scenario.start_worker(**options)
    request.addfinalizer(lambda: worker.stop(grace=4.0))
    return worker


def rabbitmqctl(scenario: Scenario, what: str, *columns: str) -> list[dict[str, Any]]:
    vhost = scenario.broker_url.rsplit("/", 1)[1]
    done = subprocess.run(["rabbitmqctl", "-q", what, "-p", vhost, *columns, "--formatter", "json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def delayed_messages(scenario: Scenario) -> int:
    """Messages now waiting in Celery's delay queues (`celery_delayed_<level>`)."""
    return sum(q["messages"] for q in rabbitmqctl(scenario, "list_queues", "name", "messages")
               if q["name"].startswith("celery_delayed_"))


def received(worker: WorkerProcess, task: str) -> int:
    """How many messages of `task` the worker received (its log: `Task <name>[<id>] received`)."""
    return len(re.findall(rf"Task {re.escape(task)}\[[0-9a-f-]+\] received", worker.logfile.read_text()))


def test_bus_queues_are_quorum_queues_reached_by_name_and_no_fanout_is_delayed(
        own, request: pytest.FixtureRequest):
    # Given a worker of every boundary on RabbitMQ with BUS_RABBITMQ_QUEUE_TYPE=quorum
    scenario = own()
    worker = start_worker(scenario, request, name="layout")

    # Then every bus queue (and bus.dead_letter) is a quorum queue
    queues = {q["name"]: q["type"] for q in rabbitmqctl(scenario, "list_queues", "name", "type")}
    ours = {name for name in queues if not name.startswith(("celery", "celeryev", "amq."))
            and "pidbox" not in name}
    assert {"orders.place_order", "billing.charge_payment", "bus.maintenance", "bus.dead_letter"} <= ours
    assert {name: queues[name] for name in ours} == {name: "quorum" for name in ours}

    # And each is bound to bus.queues by its name (and by `#.<name>`) beside its usual exchange
    bindings = {(b["source_name"], b["destination_name"], b["routing_key"])
                for b in rabbitmqctl(scenario, "list_bindings", "source_name", "destination_name", "routing_key")}
    for name in ("orders.place_order", "billing.charge_payment"):
        assert {("bus.queues", name, name), ("bus.queues", name, f"#.{name}")} <= bindings
    assert ("orders.place_order", "orders.place_order", "orders.place_order") in bindings
    assert ("events.order_placed", "billing.charge_payment", "billing.charge_payment") in bindings

    # And Celery's delayed delivery hands messages back to bus.queues, never to an event's fanout
    delivered_to = {destination for source, destination, _ in bindings if source == "celery_delayed_delivery"}
    assert "bus.queues" in delivered_to
    assert not any(d.startswith("events.") for d in delivered_to), delivered_to
    assert "direct exchange" not in worker.logfile.read_text()

    # And `bus check` finds the broker as the topology declares it
    done = scenario.bus("check")
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_delayed_retry_waits_in_rabbitmq_and_reaches_only_its_subscriber(
        own, uid: str, request: pytest.FixtureRequest):
    # Given a worker whose SMS port fails once per message, and whose notifications
    # subscribers retry after exactly 6 s
    scenario = own()
    worker = start_worker(scenario, request, name="delayed", env={
        "BUS_FAIL_PORTS": "sms=1", "BUS_TASK_MODULES": FIXED_RETRY_MODULES,
        "BUS_TEST_SUBSCRIBER_RETRIES": "2", "BUS_TEST_SUBSCRIBER_DELAY": "6"})
    client = scenario.driver()

    # When a user registers (UserAccountCreated: welcome e-mail, welcome SMS, audit)
    client.get(client.delay(REGISTER_USER, user_id=f"u-{uid}", email=f"u-{uid}@example.com", name="Ada"))

    # Then the SMS's retry waits in RabbitMQ's delay queues, not in the worker
    scenario.wait_for("the retry in celery_delayed_*", lambda: delayed_messages(scenario) == 1, timeout=20)
    # ... and is sent once it comes back, to the SMS subscriber only
    scenario.wait_for("the SMS", lambda: scenario.rows(
        "SELECT id FROM port_calls WHERE port = 'sms' AND target = :t", t=f"u-{uid}"), timeout=30)
    time.sleep(1.0)
    assert received(worker, WELCOME_SMS) == 2
    assert received(worker, WELCOME_EMAIL) == 1
    assert received(worker, AUDIT) == 1
    scenario.wait_for("the delay queues to empty", lambda: delayed_messages(scenario) == 0, timeout=15)


def test_a_message_that_keeps_killing_its_worker_is_dead_lettered_at_the_delivery_limit(
        own, uid: str, request: pytest.FixtureRequest):
    # Given quorum queues that give a message up after 1 failed delivery, and a worker
    # whose handler holds its job 30 s
    scenario = own(BUS_RABBITMQ_DELIVERY_LIMIT="1", BUS_TASK_MODULES=CRASH_MODULES)
    worker = start_worker(scenario, request, name="poison", concurrency=1)
    client = scenario.driver()
    holds = scenario.home / "holds"

    # When every process that starts the job is SIGKILLed (the worker requeues it each time)
    job = f"poison-{uid}"
    client.delay(HOLD_JOB, job_id=job, hold=30)
    for run in (1, 2):
        [marker] = scenario.wait_for(f"run {run} of the job", lambda: [
            p for p in holds.glob(f"{job}.*") if not p.name.endswith(".killed")])
        pid = int(marker.name.rsplit(".", 2)[1])
        os.kill(pid, signal.SIGKILL)
        marker.rename(marker.with_name(marker.name + ".killed"))

    # Then RabbitMQ dead-letters it past its delivery limit, and the bus keeps it with that reason
    [letter] = scenario.wait_for("the dead letter", lambda: scenario.rows(
        "SELECT reason, queue, error FROM bus_dead_letters WHERE task = :t", t=HOLD_JOB), timeout=30)
    assert (letter.reason, letter.queue) == ("delivery-limit", HOLD_JOB)
    assert "more than its delivery limit" in letter.error
    # ... and it did not run a third time; the worker is still up
    time.sleep(1.0)
    assert len(list(holds.glob(f"{job}.*"))) == 2
    assert worker.process.poll() is None
