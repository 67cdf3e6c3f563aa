"""Process managers in `bus topology`, the catalog and AsyncAPI (issue 16).

The shop's fulfilment manager (tasks/fulfilment.py) is read as an operator reads it: through
the `bus` command (typer's CliRunner on the real app, every tasks module loaded), in
`bus topology --json`, its table, `bus catalog` and `bus catalog --asyncapi`. A manager
declared here on a bus of its own shows what the shop's does not: a mapping and a function
as correlation, its own policy, no timeouts.
"""
from __future__ import annotations

import json
from typing import Any

import pytest
from celery import Celery
from pydantic import BaseModel
from typer.testing import CliRunner

from handlers.messages import OrderPlaced, PaymentProcessed
from project.cli.main import cli
from project.core import Bus
from project.messaging.retry import Backoff
from project.observe.mermaid import describe
from tests.unit.test_catalog import pointer, refs, spec_errors

STEPS = {"OrderPlaced": "fulfilment.fulfilment.order_placed",
         "PaymentProcessed": "fulfilment.fulfilment.payment_processed",
         "StockReserved": "fulfilment.fulfilment.stock_reserved",
         "OutOfStock": "fulfilment.fulfilment.out_of_stock"}
TIMEOUT_TASK = "fulfilment.fulfilment.timeout"


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """The shop's configuration, with a database and home of the test's own (nothing is read from them)."""
    return {"BUS_DATABASE_URL": f"sqlite:///{tmp_path / 'bus.db'}", "BUS_HOME": str(tmp_path), "COLUMNS": "300"}


def bus(env: dict[str, str], *args: str) -> str:
    done = CliRunner().invoke(cli, list(args), env=env)
    assert done.exit_code == 0, done.output
    return done.output


def fulfilment(managers: list[dict[str, Any]]) -> dict[str, Any]:
    [found] = [m for m in managers if m["name"] == "fulfilment"]
    return found


# ---- bus topology ---------------------------------------------------------------------------
def test_topology_json_lists_the_fulfilment_manager_with_its_steps_and_timeout_command(env):
    # When `bus topology --json` runs on the shop
    catalog = json.loads(bus(env, "topology", "--json"))
    manager = fulfilment(catalog["process_managers"])
    # Then fulfilment is there with its boundary, state model, correlation and on_missing
    assert (manager["boundary"], manager["state"]["model"], manager["correlation"], manager["on_missing"]) == (
        "fulfilment", "Fulfilment", "order_id", "ignore")
    assert {"placed", "paid", "reserved", "cancelled"} <= set(manager["state"]["fields"])
    assert set(manager["state"]["schema"]["properties"]) == set(manager["state"]["fields"])
    # and OrderPlaced (and PaymentProcessed) start it; each of its four events has its step task = queue
    assert manager["starts"] == ["OrderPlaced", "PaymentProcessed"]
    assert {s["event"]: s["task"] for s in manager["handles"]} == STEPS
    assert all(s["queue"] == s["task"] for s in manager["handles"])
    # and its timeouts come as its one timeout command
    assert [t["timeout"] for t in manager["timeouts"]] == ["payment", "late_payment"]
    assert manager["timeout_task"] == TIMEOUT_TASK


def test_topology_json_ties_the_managers_steps_to_their_subscriber_and_command_entries(env):
    # When `bus topology --json` runs on the shop
    catalog = json.loads(bus(env, "topology", "--json"))
    manager = fulfilment(catalog["process_managers"])
    subscribers = {s["task"]: s for e in catalog["events"] for s in e["subscribers"]}
    commands = {c["task"]: c for c in catalog["commands"]}
    # Then each step's subscriber entry and the timeout command name the manager; others name none
    assert {task for task, s in subscribers.items() if s["process_manager"] == "fulfilment"} == set(STEPS.values())
    assert subscribers["billing.charge_payment"]["process_manager"] is None
    assert commands[TIMEOUT_TASK]["process_manager"] == "fulfilment"
    assert commands["orders.place_order"]["process_manager"] is None
    # and a step shows what its subscriber entry shows it sends, with the same retry policy
    for step in manager["handles"]:
        subscriber = subscribers[step["task"]]
        assert (step["sends"], step["publishes"]) == (subscriber["sends"], subscriber["publishes"])
        assert manager["retry"] == subscriber["retry"]
    steps = {s["event"]: s for s in manager["handles"]}
    assert steps["OrderPlaced"]["sends"] == ["inventory.reserve_stock"]
    # and each timeout handler what it sends (the payment timeout cancels the order)
    assert {t["timeout"]: t["sends"] for t in manager["timeouts"]} == {
        "payment": ["orders.cancel_order"], "late_payment": []}


def test_topology_table_lists_the_process_managers(env):
    # When `bus topology` prints its tables
    out = bus(env, "topology")
    # Then a "process managers" table follows the others, with fulfilment's row and its step lines
    assert "process managers" in out.split("subscribers", 1)[1]
    row = next(line for line in out.splitlines() if "│ fulfilment │ fulfilment │" in line)
    for shown in ("Fulfilment(placed, paid", "order_id", "OrderPlaced (starts) -> fulfilment.fulfilment.order_placed",
                  f"payment, late_payment -> {TIMEOUT_TASK}", "ignore", "10 retries, 0.5 s doubling to 30 s"):
        assert shown in row, shown
    for event in ("StockReserved", "OutOfStock"):
        assert f"{event} -> {STEPS[event]}" in out


# ---- bus catalog ------------------------------------------------------------------------------
def test_the_catalog_indexes_the_manager_and_gives_it_a_section(env):
    # When `bus catalog` writes the Markdown catalog
    text = bus(env, "catalog", "--output", "-")
    # Then the index has a process managers table linking to fulfilment's section
    assert ("| [fulfilment](#process-manager-fulfilment) | fulfilment | `Fulfilment(placed, paid, reserved, "
            in text)
    assert f"| `order_id` | OrderPlaced, PaymentProcessed | payment, late_payment -> {TIMEOUT_TASK} |" in text
    # and the section lists each step with its queue and handler, the timeouts and the state's schema
    section = text.split("\n## Process manager fulfilment\n", 1)[1]
    assert "- correlation: `order_id`; an event of no instance that does not start one: ignore" in section
    assert f"- timeout command: `{TIMEOUT_TASK}`" in section
    assert ("| [OrderPlaced](#orderplaced) | yes | `fulfilment.fulfilment.order_placed` | "
            "`handlers.fulfilment.on_order_placed` | `inventory.reserve_stock` |") in section
    for event in ("PaymentProcessed", "StockReserved", "OutOfStock"):
        assert f"| `{STEPS[event]}` |" in section
    assert "| `payment` | `handlers.fulfilment.on_payment_timeout` | `orders.cancel_order` |" in section
    assert '"title": "Fulfilment"' in section


# ---- AsyncAPI -----------------------------------------------------------------------------------
def test_asyncapi_marks_the_steps_and_the_timeout_and_lists_the_manager(env):
    # When `bus catalog --asyncapi` writes the shop's document
    document = json.loads(bus(env, "catalog", "--asyncapi", "--format", "json", "--output", "-"))
    # Then it is still valid AsyncAPI 3.0, and every $ref resolves
    assert spec_errors(document) == []
    for ref in refs(document):
        pointer(document, ref)
    # and each step's operation and the timeout command's channel and operation name the manager
    operations = document["operations"]
    assert {name for name, op in operations.items() if op.get("x-process-manager") == "fulfilment"} == {
        f"{task}.receive" for task in [*STEPS.values(), TIMEOUT_TASK]}
    assert operations["fulfilment.fulfilment.order_placed.receive"]["x-bus-queue"] == STEPS["OrderPlaced"]
    assert document["channels"][TIMEOUT_TASK]["x-process-manager"] == "fulfilment"
    assert "x-process-manager" not in operations["billing.charge_payment.receive"]
    # and x-process-managers summarises it as `bus topology --json` does, its state a components schema
    manager = fulfilment(document["x-process-managers"])
    assert (manager["correlation"], manager["starts"], manager["timeout_task"]) == (
        "order_id", ["OrderPlaced", "PaymentProcessed"], TIMEOUT_TASK)
    assert {s["event"]: s["task"] for s in manager["handles"]} == STEPS
    assert manager["state"]["schema"] == {"$ref": "#/components/schemas/Fulfilment"}
    assert "paid" in pointer(document, manager["state"]["schema"]["$ref"])["properties"]


# ---- a manager of another shape -----------------------------------------------------------------
class Tally(BaseModel):
    orders: int = 0


def payment_order(event: PaymentProcessed) -> str:
    return event.order_id


def on_placed(state: Tally, event: OrderPlaced, process) -> None:
    state.orders += 1


def on_paid(state: Tally, event: PaymentProcessed, process) -> None:
    process.complete()


def test_a_manager_describes_a_mapped_correlation_its_policy_and_no_timeouts():
    # Given a manager correlating by a field for one event and a function for the other, with its own policy
    app = Celery("process-topology-test", set_as_current=False)
    own = Bus(app)
    tally = own.process_manager("tally", boundary="tallies", state=Tally, on_missing="dead_letter",
                                correlation={OrderPlaced: "order_id", PaymentProcessed: payment_order},
                                retry=Backoff(max_retries=3, base=1.0, cap=4.0, retry_on=(ConnectionError,)))
    tally.starts(OrderPlaced, on_placed)
    tally.handles(PaymentProcessed, on_paid)
    # When the bus is described
    [manager] = describe(own.topology, own.command_policy, own.process_managers)["process_managers"]
    app.close()
    # Then the correlation names the field and the function, per event
    assert manager["correlation"] == {"OrderPlaced": "order_id",
                                      "PaymentProcessed": f"{__name__}.payment_order()"}
    # and its policy is its own (retrying version conflicts), it dead-letters the unmatched, has no timeouts
    assert manager["retry"]["max_retries"] == 3
    assert "project.store.process_state.VersionConflict" in manager["retry"]["retry_on"]
    assert (manager["on_missing"], manager["timeouts"], manager["timeout_task"]) == ("dead_letter", [], None)
    assert manager["starts"] == ["OrderPlaced"]
    assert [(s["event"], s["task"], s["starts"]) for s in manager["handles"]] == [
        ("OrderPlaced", "tallies.tally.order_placed", True), ("PaymentProcessed", "tallies.tally.payment_processed",
                                                             False)]
