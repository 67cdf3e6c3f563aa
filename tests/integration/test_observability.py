"""Observability on a real worker (issue 7): `bus trace`, JSON logs and Prometheus metrics.

One Redis + SQLite scenario for the module, with one worker (2 pool processes) started
with BUS_LOG_FORMAT=json, `--metrics-port` and a payment gateway that fails the first
call of every charge (BUS_FAIL_PORTS=gateway=1), so billing runs each event twice:
the trace and the metrics must show that retry, and nothing else may run twice.

The test process never imports `project.celery`; it runs the `bus` CLI with the
scenario's environment, reads the worker's log file and scrapes its metrics port.
"""
from __future__ import annotations

import json
import re
import time
import urllib.request
import uuid
from typing import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import opened
from tests.integration.support.helpers import PLACE_ORDER, free_port, order
from tests.integration.support.scenarios import Scenario

pytestmark = pytest.mark.integration

CHARGE = "billing.charge_payment"
CONFIRM = "notifications.send_order_confirmation"


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    """A Redis scenario whose worker logs JSON, serves metrics and has a flaky payment gateway."""
    with opened("redis", "sqlite", tmp_path_factory, "observe") as scenario:
        port = free_port()
        scenario.worker = scenario.start_worker(
            concurrency=2, name="observed", extra_args=["--metrics-port", str(port)],
            env={"BUS_LOG_FORMAT": "json", "BUS_FAIL_PORTS": "gateway=1", "BUS_METRICS_ADDRESS": "127.0.0.1"})
        scenario.metrics_url = f"http://127.0.0.1:{port}/metrics"
        scenario.client = scenario.driver()
        yield scenario


def place_order(scenario: Scenario) -> tuple[str, str]:
    """Send one PlaceOrder; (message id = correlation id, order id)."""
    order_id = f"o-{uuid.uuid4().hex[:10]}"
    return scenario.client.delay(PLACE_ORDER, idempotency_key=f"k-{order_id}", **order(order_id)), order_id


def conversation_done(scenario: Scenario, correlation_id: str) -> bool:
    """True once the three subscribers ran, PaymentProcessed is published and fulfilment is done with the
    order (the whole conversation)."""
    ran = scenario.rows("SELECT count(*) FROM bus_inbox i JOIN bus_outbox e ON i.event_id = e.id "
                        "WHERE e.correlation_id = :c AND e.name = 'events.order_placed'", c=correlation_id)
    paid = scenario.rows("SELECT 1 FROM bus_outbox WHERE correlation_id = :c AND name = 'events.payment_processed' "
                         "AND published_at IS NOT NULL", c=correlation_id)
    placed = scenario.rows("SELECT payload FROM bus_outbox WHERE correlation_id = :c AND name = 'events.order_placed'",
                           c=correlation_id)
    order_id = placed and (json.loads(placed[0][0]) if isinstance(placed[0][0], str) else placed[0][0])["order_id"]
    done = order_id and scenario.rows("SELECT 1 FROM bus_process_instances WHERE manager = 'fulfilment' AND "
                                      "instance_id = :o AND status = 'completed'", o=order_id)
    return ran[0][0] == 3 and bool(paid) and bool(done)


def trace_json(scenario: Scenario, correlation_id: str) -> dict:
    done = scenario.bus("trace", correlation_id, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def only(steps: list[dict], name: str) -> dict:
    found = [s for s in steps if s["name"] == name]
    assert len(found) == 1, f"expected one {name} in {[s['name'] for s in steps]}"
    return found[0]


# ---- bus trace ---------------------------------------------------------------------
def test_trace_of_a_placed_order_shows_the_whole_conversation_with_states_and_attempts(observed):
    # Given an order placed on a real worker whose payment gateway fails the first charge
    correlation_id, _ = place_order(observed)
    observed.wait_for("the PlaceOrder conversation to finish", lambda: conversation_done(observed, correlation_id))

    # When it is traced
    tree = trace_json(observed, correlation_id)

    # Then the command is the root, succeeded at the first attempt, with a duration
    root = tree["root"]
    assert (root["kind"], root["name"], root["message_id"]) == ("command", PLACE_ORDER, correlation_id)
    assert (root["state"], root["attempts"]) == ("succeeded", 1)
    assert root["duration_ms"] is not None and root["duration_ms"] >= 0
    # its event reached both subscribers; billing succeeded at its second attempt
    placed = only(root["children"], "events.order_placed")
    assert (placed["kind"], placed["state"]) == ("event", "published")
    assert {s["name"] for s in placed["children"]} == {CHARGE, CONFIRM, "fulfilment.fulfilment.order_placed"}
    charge, confirm = only(placed["children"], CHARGE), only(placed["children"], CONFIRM)
    assert (charge["state"], charge["attempts"]) == ("succeeded", 2)
    assert "PortUnavailable" in charge["error"]  # the failed first attempt is remembered
    assert (confirm["state"], confirm["attempts"]) == ("succeeded", 1)
    assert confirm["children"] == []
    # and billing's follow-up event hangs under the billing run that published it
    processed = only(charge["children"], "events.payment_processed")
    assert (processed["kind"], processed["state"]) == ("event", "published")
    assert [s["name"] for s in processed["children"]] == ["fulfilment.fulfilment.payment_processed"]
    assert tree["unattached"] == []

    # When it is printed as a tree, Then the same chain reads top-down, one level deeper each
    text = observed.bus("trace", correlation_id)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    depth = {}
    for name in (PLACE_ORDER, "events.order_placed", CHARGE, "events.payment_processed", CONFIRM):
        line = next(i for i, line in enumerate(lines) if f" {name} " in line)
        depth[name] = (line, len(lines[line]) - len(lines[line].lstrip("│├└─ ")))  # indentation
    assert depth[PLACE_ORDER][1] < depth["events.order_placed"][1] < depth[CHARGE][1] \
        < depth["events.payment_processed"][1]
    assert depth[CHARGE][1] == depth[CONFIRM][1]
    assert "2 attempts" in lines[depth[CHARGE][0]] and "succeeded" in lines[depth[CHARGE][0]]


def test_trace_shows_a_dead_lettered_command_and_refuses_an_unknown_id(observed):
    # Given a PlaceOrder from a foreign sender that does not fit the contract
    message_id = observed.client.send_task(PLACE_ORDER, {"order_id": "o-bad", "items": "none"})
    observed.wait_for("the dead letter", lambda: observed.rows(
        "SELECT 1 FROM bus_dead_letters WHERE message_id = :m", m=message_id))
    # When it is traced, Then the command shows as dead-lettered with the field errors
    root = trace_json(observed, message_id)["root"]
    assert (root["name"], root["state"]) == (PLACE_ORDER, "dead-lettered")
    assert [d["reason"] for d in root["dead_letters"]] == ["invalid"]
    assert "customer_id" in root["dead_letters"][0]["error"]

    # When an id the bus never saw is traced, Then it exits 1 and says so
    done = observed.bus("trace", "no-such-conversation")
    assert done.returncode == 1
    assert "no conversation 'no-such-conversation'" in done.stderr


# ---- structured logs ---------------------------------------------------------------
def test_json_logs_carry_message_correlation_task_boundary_and_attempt(observed):
    # Given an order placed on the worker started with BUS_LOG_FORMAT=json
    correlation_id, _ = place_order(observed)
    observed.wait_for("the PlaceOrder conversation to finish", lambda: conversation_done(observed, correlation_id))

    # When its log file is read (once billing's success is logged: after its outbox publish)
    def records_so_far() -> list[dict]:
        return [json.loads(line) for line in observed.worker.logfile.read_text().splitlines()
                if line.startswith("{")]
    observed.wait_for("billing's success in the log", lambda: [
        r for r in records_so_far() if r["task"] == CHARGE and r["correlation_id"] == correlation_id
        and "succeeded" in r["message"]])
    text = observed.worker.logfile.read_text()
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    # Then every log line after the start-up banner is a JSON object with the same keys
    logged = [line for line in text.splitlines() if re.match(r"\[\d{4}-|\{", line)]
    assert logged and all(line.startswith("{") for line in logged), [line for line in logged if line[0] != "{"][:3]
    keys = {"time", "level", "logger", "message", "message_id", "correlation_id", "causation_id", "task",
            "boundary", "attempt"}
    assert all(keys <= set(r) for r in records)
    # the command's success names its message, conversation, task, boundary and attempt
    done = [r for r in records if r["message_id"] == correlation_id and "succeeded" in r["message"]]
    assert len(done) == 1, done
    assert {k: done[0][k] for k in ("task", "boundary", "correlation_id", "attempt")} == {
        "task": PLACE_ORDER, "boundary": "orders", "correlation_id": correlation_id, "attempt": 1}
    # the subscriber runs belong to the same conversation; billing's retry is attempt 1 -> 2
    charge = [r for r in records if r["task"] == CHARGE and r["correlation_id"] == correlation_id]
    assert {r["attempt"] for r in charge if "retry" in r["message"].lower()} == {1}
    assert [r["attempt"] for r in charge if "succeeded" in r["message"]] == [2]
    assert all(r["boundary"] == "billing" for r in charge)


# ---- metrics -----------------------------------------------------------------------
def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_what_the_worker_did(observed):
    # Given the worker's metrics before (other tests of the module share the worker)
    before = scrape(observed.metrics_url)
    # When three orders are placed, one of them twice with the same key, and one invalid command is sent
    first, _ = place_order(observed)
    ids = [first] + [place_order(observed)[0] for _ in range(2)]
    fields = order(f"dup-{uuid.uuid4().hex[:8]}")
    dup_key = f"k-{fields['order_id']}"
    ids.append(observed.client.delay(PLACE_ORDER, idempotency_key=dup_key, **fields))
    assert observed.client.get(ids[-1]) is not None
    ids.append(observed.client.delay(PLACE_ORDER, idempotency_key=dup_key, **fields))
    observed.client.send_task(PLACE_ORDER, {"order_id": "o-bad-metrics"})
    for correlation_id in ids[:3] + ids[3:4]:
        observed.wait_for("a conversation to finish", lambda c=correlation_id: conversation_done(observed, c))

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    deadline = time.monotonic() + 20
    while True:  # the duplicate and the dead letter finish on their own time
        after = scrape(observed.metrics_url)
        if (delta("bus_duplicates_absorbed_total", task=PLACE_ORDER) >= 1
                and delta("bus_dead_letters_total", task=PLACE_ORDER, reason="invalid") >= 1) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.2)

    # Then the counters moved by exactly what happened
    assert delta("bus_messages_received_total", task=PLACE_ORDER) == 6
    assert delta("bus_tasks_succeeded_total", task=PLACE_ORDER) == 5  # 4 orders, one twice
    assert delta("bus_tasks_failed_total", task=PLACE_ORDER) == 1  # the invalid one
    assert delta("bus_duplicates_absorbed_total", task=PLACE_ORDER) == 1
    assert delta("bus_dead_letters_total", task=PLACE_ORDER, reason="invalid") == 1
    assert delta("bus_messages_sent_total", task="events.order_placed") == 4
    assert delta("bus_tasks_retried_total", task=CHARGE) == 4  # the gateway fails each charge once
    assert delta("bus_tasks_succeeded_total", task=CHARGE) == 4
    assert delta("bus_tasks_succeeded_total", task=CONFIRM) == 4
    assert delta("bus_messages_sent_total", task="events.payment_processed") == 4
    assert delta("bus_handler_duration_seconds_count", task=PLACE_ORDER) == 6
    assert value(after, "bus_handler_duration_seconds_sum", task=PLACE_ORDER) > 0
    # ... and, batched (the default on Redis), the deliveries above ran in counted batches: 6 orders,
    # 8 charge attempts, 4 confirmations at least (other subscribers' runs may still be going)
    assert delta("bus_batch_size_sum") >= 6 + 8 + 4
    assert 1 <= delta("bus_batch_size_count") <= delta("bus_batch_size_sum")
    # and the gauges read at scrape time are there: nothing left in the outbox, every queue drained
    assert value(after, "bus_outbox_backlog") == 0
    assert value(after, "bus_outbox_relay_lag_seconds") == 0
    assert ("bus_queue_depth", (("queue", PLACE_ORDER),)) in after
    assert ("bus_queue_depth", (("queue", CHARGE),)) in after
    assert value(after, "bus_queue_depth", queue=PLACE_ORDER) == 0
