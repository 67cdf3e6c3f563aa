"""`bus process list/show/diagram` against a real SQLite database the harness filled with the shop's flow.

Two orders run through the in-process harness (one shipped, one waiting for its payment),
then the commands read the database file as an operator would: listing with filters,
one instance with its pending timeout and its history from the execution log, the
diagram; bad input is refused in one line with status 2, an unknown instance with 1.
"""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from adapters.repositories import restock
from handlers.messages import PlaceOrder
from project.cli.main import cli
from project.observe.process_diagram import state_diagram

ITEMS = [{"sku": "book", "quantity": 1, "unit_price": "10.00"}]


@pytest.fixture
def flows(bus_harness, tmp_path):
    """o-shipped went through; o-waiting's charge keeps failing (billing dead-letters it): it waits for payment."""
    with bus_harness.bus.engine().begin() as conn:
        restock(conn, {"book": 10})
    bus_harness.send(PlaceOrder(order_id="o-shipped", customer_id="c-1", items=ITEMS))
    bus_harness.run_until_idle()
    bus_harness.fail("gateway", times=bus_harness.bus.app.tasks["billing.charge_payment"].binding.retry.max_retries + 1)
    bus_harness.send(PlaceOrder(order_id="o-waiting", customer_id="c-2", items=ITEMS))
    bus_harness.run_until_idle()
    return {"BUS_DATABASE_URL": f"sqlite:///{tmp_path / 'bus.db'}", "BUS_HOME": str(tmp_path), "COLUMNS": "300"}


def bus(env, *args: str):
    return CliRunner().invoke(cli, ["process", *args], env=env)


def test_list_shows_instances_and_filters_by_status_and_manager(flows):
    # When every instance is listed, then the running ones, then a manager's
    everything = json.loads(bus(flows, "list", "--json").output)
    running = json.loads(bus(flows, "list", "--status", "running", "--json").output)
    table = bus(flows, "list", "--manager", "fulfilment")
    # Then both orders are there, the filter keeps the waiting one, and the table shows its pending timeout
    assert {(i["instance_id"], i["status"]) for i in everything} == {("o-shipped", "completed"),
                                                                     ("o-waiting", "running")}
    assert [(i["instance_id"], i["pending_timeouts"]) for i in running] == [("o-waiting", ["payment"])]
    assert table.exit_code == 0 and "2 instance(s)" in table.output
    [line] = [line for line in table.output.splitlines() if "o-waiting" in line]
    assert "running" in line and "payment" in line


def test_show_prints_state_version_pending_timeout_and_history(flows):
    # When the waiting order's instance is shown
    done = bus(flows, "show", "fulfilment", "o-waiting", "--json")
    # Then it has its state, version, the timer of its payment timeout, and the steps applied to it
    assert done.exit_code == 0, done.output
    shown = json.loads(done.output)
    assert (shown["status"], shown["version"]) == ("running", 2)
    assert shown["state"]["placed"] and shown["state"]["reserved"] and not shown["state"]["paid"]
    assert shown["timers"]["payment"]["due_at"] is not None and not shown["timers"]["payment"]["published"]
    assert [(s["message"], s["state"]) for s in shown["history"]] == [("OrderPlaced", "succeeded"),
                                                                      ("StockReserved", "succeeded")]
    # ... and the shipped one's history has its three steps, none of the other order's
    shipped = json.loads(bus(flows, "show", "fulfilment", "o-shipped", "--json").output)
    assert sorted(s["message"] for s in shipped["history"]) == ["OrderPlaced", "PaymentProcessed", "StockReserved"]
    text = bus(flows, "show", "fulfilment", "o-waiting")
    assert "pending timeout payment" in text.output and "bus trace" in text.output


def test_diagram_prints_the_generated_state_diagram(flows, bus_harness):
    done = bus(flows, "diagram", "fulfilment")
    assert done.exit_code == 0
    assert done.output == state_diagram(bus_harness.bus.process_managers["fulfilment"])


@pytest.mark.parametrize("args, says", [
    (["list", "--status", "done"], "--status 'done': use one of running, completed"),
    (["list", "--manager", "nope"], "no process manager 'nope'; declared: fulfilment"),
    (["show", "nope", "o-1"], "no process manager 'nope'"),
    (["diagram", "nope"], "no process manager 'nope'"),
])
def test_bad_input_is_one_line_and_status_2(flows, args, says):
    done = bus(flows, *args)
    assert done.exit_code == 2
    [line] = done.output.strip().splitlines()
    assert line.startswith("error: ") and says in line


def test_an_unknown_instance_is_status_1_naming_how_to_find_one(flows):
    done = bus(flows, "show", "fulfilment", "o-missing")
    assert done.exit_code == 1
    assert "fulfilment has no instance 'o-missing'" in done.output
    assert "bus process list --manager fulfilment" in " ".join(done.output.split())


def test_trace_of_an_instance_id_shows_that_instance_and_its_history(flows):
    # When `bus trace` is given the waiting order's id (no message began a conversation with that id)
    shown = CliRunner().invoke(cli, ["trace", "o-waiting", "--json"], env=flows)
    text = CliRunner().invoke(cli, ["trace", "o-waiting"], env=flows)
    # Then it shows the fulfilment instance of that id as `bus process show` does: state, timeout, steps
    assert shown.exit_code == 0, shown.output
    [instance] = json.loads(shown.output)["process_instances"]
    assert (instance["manager"], instance["instance_id"], instance["status"]) == ("fulfilment", "o-waiting", "running")
    assert list(instance["timers"]) == ["payment"]
    assert [step["message"] for step in instance["history"]] == ["OrderPlaced", "StockReserved"]
    assert text.exit_code == 0 and "fulfilment o-waiting: running" in text.output
    assert "pending timeout payment" in text.output and "history: 2 step(s)" in text.output


def test_trace_of_an_id_that_is_neither_a_conversation_nor_an_instance_says_both(flows):
    done = CliRunner().invoke(cli, ["trace", "o-missing"], env=flows)
    assert done.exit_code == 1
    said = " ".join(done.output.split())
    assert "no process-manager instance has that id" in said and "bus process list" in said
