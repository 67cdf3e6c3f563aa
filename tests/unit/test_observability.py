"""Observability without servers (issue 7): topology with retry policies and Mermaid,
conversation trees from the execution log (in-process harness on SQLite), the JSON log
format, the metrics functions in multiprocess mode, and the Flower authentication guard.

The real-worker counterparts are in tests/integration/test_observability.py and
tests/e2e/test_flower.py.
"""
from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from collections import defaultdict

import pytest
from typer.testing import CliRunner

from handlers.messages import PlaceOrder
from project.cli.main import cli
from project.errors import ConfigurationError
from project.messaging.retry import Backoff
from project.observe import mermaid, trace
from project.observe.flower_auth import FlowerAuthMissing, require_auth
from project.observe.logs import FIELDS, JsonFormatter, MessageFields
from project.settings import load
from project.store.tables import executions
from tests.conftest import REPO

ITEMS = [{"sku": "book", "quantity": 2, "unit_price": "12.50"}]
PLACE = "orders.place_order"
CHARGE = "billing.charge_payment"
CONFIRM = "notifications.send_order_confirmation"


# ---- topology ----------------------------------------------------------------------
def topology(*args: str) -> str:
    done = CliRunner().invoke(cli, ["topology", *args], env={"COLUMNS": "300"})
    assert done.exit_code == 0, done.output
    return done.output


def test_topology_json_gives_every_command_and_subscriber_its_retry_policy_and_outputs():
    # When `bus topology --json` runs on the reference domain
    catalog = json.loads(topology("--json"))
    commands = {c["task"]: c for c in catalog["commands"]}
    subscribers = {s["task"]: s for e in catalog["events"] for s in e["subscribers"]}
    # Then commands carry the bus's command policy: infrastructure errors only
    place = commands[PLACE]
    assert place["retry"]["max_retries"] == 5
    assert "sqlalchemy.exc.OperationalError" in place["retry"]["retry_on"]
    assert "builtins.Exception" not in place["retry"]["retry_on"]
    # and each subscriber its own (billing binds 8 retries from 0.5 s; the default is 5 from 1 s)
    assert {k: subscribers[CHARGE]["retry"][k] for k in ("max_retries", "base_seconds", "cap_seconds")} == {
        "max_retries": 8, "base_seconds": 0.5, "cap_seconds": 30.0}
    assert subscribers[CONFIRM]["retry"]["max_retries"] == 5
    assert subscribers[CONFIRM]["retry"]["retry_on"] == ["builtins.Exception"]
    # and what each handler publishes, read from its source
    assert place["publishes"] == ["events.order_placed"]
    assert subscribers[CHARGE]["publishes"] == ["events.payment_processed"]
    assert subscribers[CONFIRM]["publishes"] == []


def test_topology_table_shows_the_retry_policies():
    # When the table is printed, Then each row says how its messages are retried
    out = topology()
    charge = next(line for line in out.splitlines() if f" {CHARGE} " in line and "handlers.billing" in line)
    assert "8 retries, 0.5 s doubling to 30 s, jitter" in charge
    place = next(line for line in out.splitlines() if f" {PLACE} " in line)
    assert "only on OperationalError" in place


MERMAID_LINE = re.compile(
    r'^(flowchart LR'
    r'|    subgraph \w+\["[^"]+"\]|    end'
    r'|        \w+(\(\["[^"]+"\]\)|\[\("[^"]+"\)\]|\["[^"]+"\]|>"[^"]+"\]|\{\{"[^"]+"\}\})'
    r'|    \w+ (-->|-- \w+ -->) \w+)$')


def edges(chart: str) -> dict[str, set[str]]:
    graph = defaultdict(set)
    for source, target in re.findall(r"^    (\w+) (?:-->|-- \w+ -->) (\w+)$", chart, re.M):
        graph[source].add(target)
    return graph


def reaches(graph: dict[str, set[str]], path: list[str]) -> bool:
    return all(b in graph[a] for a, b in zip(path, path[1:]))


def test_mermaid_draws_command_queue_handler_event_exchange_subscriber_queue_and_follow_ups():
    # When `bus topology --mermaid` runs
    chart = topology("--mermaid")
    # Then every line is one of the flowchart forms the renderer accepts (ids are \w only, labels quoted)
    bad = [line for line in chart.splitlines() if not MERMAID_LINE.match(line)]
    assert not bad, bad
    # and the PlaceOrder flow is one connected path, down to billing's follow-up event
    graph = edges(chart)
    assert reaches(graph, ["c_orders_place_order", "q_orders_place_order", "h_orders_place_order",
                           "ev_events_order_placed", "x_events_order_placed", "q_billing_charge_payment",
                           "h_billing_charge_payment", "ev_events_payment_processed",
                           "x_events_payment_processed"])
    assert reaches(graph, ["x_events_order_placed", "q_notifications_send_order_confirmation",
                           "h_notifications_send_order_confirmation"])
    # with each handler's retry policy in its box
    assert re.search(r'h_billing_charge_payment\["handlers\.billing\.charge_payment<br/>retry: 8 retries', chart)


def test_mermaid_labels_cannot_break_out_of_their_quotes():
    # Given a catalog whose names hold quotes and brackets
    catalog = {"commands": [{"command": 'Odd"Name', "task": "x.odd", "queue": "x.odd", "boundary": "x",
                             "handler": 'h["]', "retry": None, "publishes": [], "sends": ["y.other"]}],
               "events": []}
    # When drawn, Then every line still parses and the quote is an entity
    chart = mermaid.flowchart(catalog)
    assert all(MERMAID_LINE.match(line) for line in chart.splitlines()), chart
    assert "#quot;" in chart
    assert "h_x_odd -- sends --> q_y_other" in chart


def test_what_a_handler_publishes_is_read_from_the_contracts_it_constructs():
    from handlers import messages

    def handler(event, *, events, commands):
        events.publish(messages.PaymentProcessed(order_id="o", amount=1, charge_id="c"))
        commands.send(PlaceOrder(order_id="o", customer_id="c", items=ITEMS))

    def indirect(event, *, events):
        events.publish(build())  # built elsewhere: not visible to the scan

    def build():
        return None
    known_events = {"PaymentProcessed": "events.payment_processed", "OrderPlaced": "events.order_placed"}
    known_commands = {"PlaceOrder": PLACE}
    assert mermaid.produced_by(handler, known_events, known_commands) == {
        "publishes": ["events.payment_processed"], "sends": [PLACE]}
    assert mermaid.produced_by(indirect, known_events, known_commands) == {"publishes": [], "sends": []}


def test_policy_text():
    assert mermaid.policy_text(None) == "none"
    assert mermaid.policy_text(Backoff(max_retries=0).describe()) == "none (dead-lettered at once)"
    assert mermaid.policy_text(Backoff(max_retries=3, base=2, cap=10, jitter=False).describe()) == \
        "3 retries, 2 s doubling to 10 s"


# ---- trace (in-process harness: the real execution, a SQLite database) --------------------
def place(harness, order_id: str = "o-1", key: str = "k-1") -> str:
    return harness.send(PlaceOrder(order_id=order_id, customer_id="c-1", items=ITEMS), idempotency_key=key)


def traced(harness, correlation_id: str) -> trace.Conversation:
    found = trace.conversation(harness.bus.engine(), harness.bus.topology, correlation_id)
    assert found is not None
    return found


def only(steps: list[trace.Step], name: str) -> trace.Step:
    found = [s for s in steps if s.name == name]
    assert len(found) == 1, [s.name for s in steps]
    return found[0]


def test_a_conversation_is_a_tree_of_command_events_runs_and_follow_ups(bus_harness):
    # Given an order placed and the gateway failing twice (billing retries twice)
    bus_harness.fail("gateway", times=2)
    message_id = place(bus_harness)
    bus_harness.run_until_idle()
    # When its conversation is traced
    conv = traced(bus_harness, message_id)
    # Then: command -> OrderPlaced -> (charge after 3 attempts -> PaymentProcessed, confirmation)
    root = conv.root
    assert (root.kind, root.name, root.state, root.attempts) == ("command", PLACE, "succeeded", 1)
    assert root.result == {"order_id": "o-1", "total": "25.00"}
    placed = only(root.children, "events.order_placed")
    assert (placed.kind, placed.state) == ("event", "published")
    charge, confirm = only(placed.children, CHARGE), only(placed.children, CONFIRM)
    assert (charge.kind, charge.state, charge.attempts) == ("run", "succeeded", 3)
    assert charge.error.startswith("ConnectionError")
    assert (confirm.state, confirm.attempts, confirm.children) == ("succeeded", 1, [])
    assert [(c.name, c.state) for c in charge.children] == [("events.payment_processed", "published")]
    assert conv.unattached == []
    # and every step has a start and an end, but for fulfilment's timers, waiting in the outbox (not due)
    waiting = [s for s in conv.steps() if s.state == "pending"]
    assert {s.name for s in waiting} == {"fulfilment.fulfilment.timeout"}
    assert all(s.duration_ms is not None and s.duration_ms >= 0 for s in conv.steps() if s not in waiting)


def test_a_duplicate_is_counted_on_its_command_not_shown_as_a_second_run(bus_harness):
    # Given the same order sent twice with one key
    first = place(bus_harness)
    assert place(bus_harness) == first
    bus_harness.run_until_idle()
    # When traced, Then one command, one duplicate absorbed, each subscriber (billing, notifications,
    # fulfilment) once
    root = traced(bus_harness, first).root
    assert (root.state, root.duplicates) == ("succeeded", 1)
    assert [len(e.children) for e in root.children] == [3]


def test_a_subscriber_that_gives_up_shows_its_dead_letter_in_place(bus_harness):
    # Given a gateway that fails more often than billing's policy retries (8)
    bus_harness.fail("gateway", times=20)
    message_id = place(bus_harness)
    bus_harness.run_until_idle()
    # When traced
    conv = traced(bus_harness, message_id)
    charge = only(conv.root.children[0].children, CHARGE)
    # Then the charge is dead-lettered after 9 attempts, with its dead letter under it, and produced nothing
    assert (charge.state, charge.attempts, charge.children) == ("dead-lettered", 9, [])
    assert [d["reason"] for d in charge.dead_letters] == ["retries-exhausted"]
    assert only(conv.root.children[0].children, CONFIRM).state == "succeeded"
    # and the rendered tree says so on the charge's branch
    from rich.console import Console
    console = Console(width=300, record=True, color_system=None)
    console.print(trace.render(conv))
    text = console.export_text()
    assert re.search(r"subscriber billing\.charge_payment \w+  dead-lettered · 9 attempts", text), text
    assert "dead letter #" in text and "retries-exhausted" in text


def test_a_refused_command_and_an_unknown_conversation(bus_harness):
    # Given a command the domain refuses (a second account for one e-mail address)
    from handlers.messages import RegisterUser
    bus_harness.send(RegisterUser(user_id="u-1", email="ada@example.com", name="Ada"))
    refused = bus_harness.send(RegisterUser(user_id="u-2", email="ada@example.com", name="Ada B"))
    bus_harness.run_until_idle()
    # When traced, Then it is refused with the domain error and produced nothing
    root = traced(bus_harness, refused).root
    assert (root.state, root.children) == ("refused", [])
    assert "EmailAlreadyRegistered" in root.error
    # and an id nobody used has no conversation
    assert trace.conversation(bus_harness.bus.engine(), bus_harness.bus.topology, "nope") is None


def test_a_conversation_serialises_to_json(bus_harness):
    message_id = place(bus_harness)
    bus_harness.run_until_idle()
    data = json.loads(json.dumps(traced(bus_harness, message_id).to_dict()))
    assert data["correlation_id"] == message_id
    assert data["root"]["children"][0]["children"][0]["kind"] == "run"
    assert isinstance(data["root"]["duration_ms"], float)


def test_old_execution_logs_are_purged_with_the_keys(bus_harness):
    from datetime import timedelta

    from sqlalchemy import func, select

    def logged() -> int:
        with bus_harness.bus.engine().connect() as conn:
            return conn.execute(select(func.count()).select_from(executions)).scalar_one()
    # Given one order's executions logged (the command, its subscribers and what fulfilment sent)
    place(bus_harness)
    bus_harness.run_until_idle()
    fresh = logged()
    assert fresh >= 4
    # When keys older than a day are purged, Then the fresh log stays
    bus_harness.bus.purge_keys(timedelta(days=1))
    assert logged() == fresh
    # When everything older than now is purged, Then the log goes with the keys
    bus_harness.bus.purge_keys(timedelta(seconds=-1))
    assert logged() == 0


# ---- logs --------------------------------------------------------------------------
def test_log_format_is_text_by_default_and_refuses_unknown_values():
    assert load({}).log_format == "text"
    assert load({"BUS_LOG_FORMAT": "JSON"}).log_format == "json"
    with pytest.raises(ConfigurationError, match=r"BUS_LOG_FORMAT='yaml'.*use json or text"):
        load({"BUS_LOG_FORMAT": "yaml"})


def test_a_json_line_has_every_field_even_outside_a_task():
    # Given Celery's "received" record in the main process (dict arguments, no task running)
    from project import app
    record = logging.LogRecord("celery.worker.strategy", logging.INFO, __file__, 1,
                               "Task %(name)s[%(id)s] received", ({"id": "m-1", "name": PLACE},), None)
    # When filtered and formatted
    MessageFields(app).filter(record)
    line = json.loads(JsonFormatter().format(record))
    # Then the message and its task are named, the rest is null, and the text is Celery's
    assert line["message"] == f"Task {PLACE}[m-1] received"
    assert {k: line[k] for k in FIELDS} == {"message_id": "m-1", "correlation_id": None, "causation_id": None,
                                            "task": PLACE, "boundary": "orders", "attempt": None}


# ---- metrics (own process: multiprocess mode is chosen when prometheus-client loads) -------------
METRICS_PROBE = """
import json, os, sys
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
from project.observe import metrics
metrics.absorbed("orders.place_order"); metrics.absorbed("orders.place_order")
metrics.dead_lettered("billing.charge_payment", "retries-exhausted"); metrics.dead_lettered(None, "undecodable")
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
registry = CollectorRegistry(); MultiProcessCollector(registry)
print(generate_latest(registry).decode())
"""


def test_metrics_are_counted_in_files_the_main_process_sums(tmp_path):
    # When a process with PROMETHEUS_MULTIPROC_DIR counts two duplicates and two dead letters
    done = subprocess.run([sys.executable, "-c", METRICS_PROBE, str(tmp_path)], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    # Then a collector over the directory reads them back with their labels
    assert 'bus_duplicates_absorbed_total{task="orders.place_order"} 2.0' in done.stdout
    assert 'bus_dead_letters_total{reason="retries-exhausted",task="billing.charge_payment"} 1.0' in done.stdout
    assert 'bus_dead_letters_total{reason="undecodable",task=""} 1.0' in done.stdout
    assert list(tmp_path.glob("counter_*.db"))


def test_without_a_metrics_directory_counting_is_a_no_op(monkeypatch):
    from project.observe import metrics
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics.absorbed("orders.place_order")
    assert metrics._get() is None


# ---- Flower ------------------------------------------------------------------------
def test_flower_refuses_to_start_without_credentials_unless_told_it_is_local_dev():
    with pytest.raises(FlowerAuthMissing, match="FLOWER_BASIC_AUTH=user:password"):
        require_auth(basic_auth=None, oauth="", argv=["celery", "flower"])
    with pytest.raises(FlowerAuthMissing, match="'admin' has no password"):
        require_auth(basic_auth=["admin"], oauth="", argv=["celery", "flower"])
    assert require_auth(basic_auth=["admin:secret"], oauth="", argv=["celery", "flower"]) == "basic"
    assert require_auth(basic_auth=None, oauth=".*@example.com", argv=["celery", "flower"]) == "oauth"
    assert require_auth(basic_auth=None, oauth="", argv=["celery", "flower", "--unauthenticated"]) == "none"
