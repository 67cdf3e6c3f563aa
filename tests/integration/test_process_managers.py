"""Process managers on real workers: Redis and PostgreSQL, the two awaited events on two workers at once.

The manager `parcel` (tests/integration/support/process_tasks.py) waits for PartPaid and
PartPacked of one order, either of which may start it, and sends ShipParcel once both have
arrived. One worker consumes PartPaid's step, the other PartPacked's (2 processes each,
both serve ShipParcel): the two events, published together, run at the same time on two
workers. Each handler holds a second between reading the instance and saving it, so both
steps read "no instance" and both start it: one INSERT wins, the other is a version
conflict, rolls back (its inbox claim with it), is retried by the manager's policy and
then finds the instance. The events are written to the outbox and published by the test
(clients/events_driver.py, as a worker does after its commit), in either order, and once
more at once (as a relay would after a publisher crashed before marking them).

A timeout runs on the same workers: the command `pmlab.parcel.timeout`, which the durable
timer a step wrote delivers when it is due (here in 2 s: within BUS_TIMER_THRESHOLD, it is
published at once with Celery's eta).
"""
from __future__ import annotations

import time
import uuid
from datetime import timedelta
from typing import Iterator

import pytest
from sqlalchemy import update

from project.store.tables import outbox, utcnow
from tests.integration.conftest import opened
from tests.integration.support.scenarios import Driver, Scenario

pytestmark = pytest.mark.integration

SUPPORT = "tests.integration.support.process_tasks"
EVENTS = {"paid": (f"{SUPPORT}.PartPaid", "pmpay"), "packed": (f"{SUPPORT}.PartPacked", "pmpack")}
STEPS = {"paid": "pmlab.parcel.part_paid", "packed": "pmlab.parcel.part_packed"}
SHIP = "pmship.ship_parcel"
CANCEL = "pmship.cancel_parcel"
TIMEOUT = "pmlab.parcel.timeout"
HOLD = 1.0  # seconds each handler holds between its read and its save
SETTLE = 1.5  # seconds to wait for anything more (a second ShipParcel) once the instance completed


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    """Two workers on Redis + PostgreSQL, one per awaited event's step (both serve the commands and the
    timeout), and an events driver; no relay thread (the test publishes the events' rows itself)."""
    with opened("redis", "postgresql", tmp_path_factory, "process") as scenario:
        scenario.env.update(BUS_TASK_MODULES=SUPPORT, BUS_RELAY_INTERVAL="0")
        for kind, step in STEPS.items():
            scenario.start_worker(concurrency=2, name=f"parcel-{kind}", queues=[step, SHIP, CANCEL, TIMEOUT])
        scenario.client = Driver(scenario.env, scenario.logdir, script="events_driver.py")
        try:
            yield scenario
        finally:
            scenario.client.close()


def instance(lab: Scenario, order_id: str) -> tuple[str, int] | None:
    rows = lab.rows("SELECT status, version FROM bus_process_instances WHERE manager = 'parcel' "
                    "AND instance_id = :o", o=order_id)
    return tuple(rows[0]) if rows else None


def ships_sent(lab: Scenario, order_id: str) -> int:
    """ShipParcel commands for `order_id` committed to the outbox (every send is a row)."""
    return sum(1 for (payload,) in lab.rows("SELECT payload FROM bus_outbox WHERE name = :n", n=SHIP)
               if payload["order_id"] == order_id)


def handled(lab: Scenario, order_id: str, what: str = "ship-parcel") -> int:
    return lab.rows("SELECT count(*) FROM audit_log WHERE what = :w AND subject = :s", w=what, s=order_id)[0][0]


def step_runs(lab: Scenario, paid: str, packed: str) -> dict[str, tuple[str, int]]:
    """{step: (state, attempts)} of the steps' executions of the two events (bus trace's log)."""
    rows = lab.rows("SELECT task, state, attempts FROM bus_executions WHERE event_id IN (:paid, :packed)",
                    paid=paid, packed=packed)
    return {task: (state, attempts) for task, state, attempts in rows}


def write_event(lab: Scenario, kind: str, **fields) -> str:
    """One event of `kind` in the outbox, unpublished; its id."""
    contract, boundary = EVENTS[kind]
    [event_id] = lab.client.call("write_event", contract=contract, fields=fields, boundary=boundary,
                                 origin=f"{boundary}.test:{uuid.uuid4().hex}")
    return event_id


@pytest.mark.parametrize("order, twice", [
    pytest.param(("paid", "packed"), False, id="paid-first"),
    pytest.param(("packed", "paid"), False, id="packed-first"),
    pytest.param(("paid", "packed"), True, id="each-twice"),
])
def test_the_awaited_events_at_once_on_two_workers_send_one_command_and_complete(lab: Scenario, order, twice):
    # Given PartPaid and PartPacked of a new order in the outbox (unpublished)
    order_id = f"o-{uuid.uuid4().hex[:10]}"
    ids = {kind: write_event(lab, kind, order_id=order_id, hold=HOLD) for kind in order}
    # When both are published together, in this order
    assert lab.client.call("publish_outbox", ids=[ids[kind] for kind in order]) == 2
    if twice:  # ... and again at once, the other way round (a relay re-sending rows a crashed publisher left)
        with lab.engine().begin() as conn:
            conn.execute(update(outbox).where(outbox.c.id.in_(list(ids.values())))
                         .values(published_at=None, claimed_until=utcnow() - timedelta(seconds=1)))
        assert lab.client.call("publish_outbox", ids=[ids[kind] for kind in reversed(order)]) == 2
    # Then the instance completes with both events applied, once each (a version per step)
    lab.wait_for("the instance to complete", lambda: instance(lab, order_id) == ("completed", 2), timeout=30)
    lab.wait_for("ShipParcel to be handled", lambda: handled(lab, order_id), timeout=30)
    time.sleep(SETTLE)
    assert instance(lab, order_id) == ("completed", 2)
    # ... exactly one ShipParcel was sent, and handled once
    assert ships_sent(lab, order_id) == 1
    assert handled(lab, order_id) == 1
    # ... both steps succeeded; the two raced to start the instance and one ran again after its conflict
    runs = step_runs(lab, ids["paid"], ids["packed"])
    assert {step: state for step, (state, _) in runs.items()} == {STEPS["paid"]: "succeeded",
                                                                   STEPS["packed"]: "succeeded"}, runs
    if not twice:  # (with copies, a copy may apply the event while the original waits for its retry)
        assert sorted(attempts for _, attempts in runs.values()) == [1, 2], runs


def test_a_timeout_due_before_the_last_event_sends_its_command_once_and_the_late_event_does_nothing(lab: Scenario):
    # Given an order paid, which asks for the timeout "packing" in 2 seconds
    order_id = f"o-{uuid.uuid4().hex[:10]}"
    paid = write_event(lab, "paid", order_id=order_id, packing_within=2.0)
    assert lab.client.call("publish_outbox", ids=[paid]) == 1
    # When nothing is packed in time
    # Then the timeout's handler sends CancelParcel, handled once, and completes the instance
    lab.wait_for("CancelParcel to be handled", lambda: handled(lab, order_id, "cancel-parcel"), timeout=30)
    assert instance(lab, order_id) == ("completed", 2)
    [timer] = [row_id for row_id, payload in lab.rows("SELECT id, payload FROM bus_outbox WHERE name = :t", t=TIMEOUT)
               if payload["instance_id"] == order_id]
    assert lab.rows("SELECT state, attempts FROM bus_executions WHERE task = :t AND message_id = :m",
                    t=TIMEOUT, m=timer) == [("succeeded", 1)]
    # ... and PartPacked arriving after that is applied as a no-op: nothing shipped, nothing changed
    packed = write_event(lab, "packed", order_id=order_id)
    assert lab.client.call("publish_outbox", ids=[packed]) == 1
    lab.wait_for("the late PartPacked to run", lambda: step_runs(lab, paid, packed).get(STEPS["packed"]))
    time.sleep(SETTLE)
    assert instance(lab, order_id) == ("completed", 2)
    assert handled(lab, order_id, "cancel-parcel") == 1 and handled(lab, order_id) == 0
