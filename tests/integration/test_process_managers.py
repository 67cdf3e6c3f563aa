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
published at once with Celery's eta). A timeout FAR away waits in the outbox instead (there
is no relay): the test makes it due (project/testing/timers.py) and publishes it while
PartPacked's step holds, i.e. has read the instance and not saved it yet, held until the test
releases it. The same hold lets the test SIGKILL the pool process running the step.
"""
from __future__ import annotations

import os
import signal
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import update

from project.store.tables import outbox, utcnow
from project.testing.timers import due_now
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
FAR = 1800.0  # seconds: a timeout past BUS_TIMER_THRESHOLD, which waits in the outbox until the test makes it due
HELD = 10.0  # seconds a held step waits at most for the test to release it


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


def sent(lab: Scenario, order_id: str, command: str = SHIP) -> int:
    """`command`s (ShipParcel, CancelParcel) for `order_id` committed to the outbox (every send is a row)."""
    return sum(1 for (payload,) in lab.rows("SELECT payload FROM bus_outbox WHERE name = :n", n=command)
               if payload["order_id"] == order_id)


def timer(lab: Scenario, order_id: str) -> tuple[str, bool]:
    """(id, published) of the order's one timeout timer in the outbox."""
    [found] = [(row_id, published_at is not None) for row_id, payload, published_at in lab.rows(
        "SELECT id, payload, published_at FROM bus_outbox WHERE name = :t", t=TIMEOUT)
        if payload["instance_id"] == order_id]
    return found


def timeout_runs(lab: Scenario, timer_id: str) -> list[tuple[str, int]]:
    """[(state, attempts)] of the timeout command's execution of the timer `timer_id`."""
    return [tuple(row) for row in lab.rows("SELECT state, attempts FROM bus_executions WHERE task = :t "
                                           "AND message_id = :m", t=TIMEOUT, m=timer_id)]


def handled(lab: Scenario, order_id: str, what: str = "ship-parcel") -> int:
    return lab.rows("SELECT count(*) FROM audit_log WHERE what = :w AND subject = :s", w=what, s=order_id)[0][0]


def step_runs(lab: Scenario, paid: str, packed: str) -> dict[str, tuple[str, int]]:
    """{step: (state, attempts)} of the steps' executions of the two events (bus trace's log)."""
    rows = lab.rows("SELECT task, state, attempts FROM bus_executions WHERE event_id IN (:paid, :packed)",
                    paid=paid, packed=packed)
    return {task: (state, attempts) for task, state, attempts in rows}


def holds(lab: Scenario, order_id: str, kind: str = "packed") -> list[int]:
    """The pool processes (pids) whose run of `kind`'s handler for the order held, in start order (their markers)."""
    marks = [path.name.split(".") for path in (lab.home / "parcels").glob(f"{order_id}.{kind}.*")]
    return [pid for _, pid in sorted((int(ns), int(pid)) for *_, pid, ns in marks)]


def release(lab: Scenario, order_id: str) -> None:
    """End the holds of the order's steps (those holding now, and any to come)."""
    (lab.home / "parcels" / f"{order_id}.release").touch()


def parent(pid: int) -> int:
    """The parent process of `pid` (/proc/<pid>/stat: the field after the state)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


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
    assert sent(lab, order_id) == 1
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
    assert timeout_runs(lab, timer(lab, order_id)[0]) == [("succeeded", 1)]
    # ... and PartPacked arriving after that is applied as a no-op: nothing shipped, nothing changed
    packed = write_event(lab, "packed", order_id=order_id)
    assert lab.client.call("publish_outbox", ids=[packed]) == 1
    lab.wait_for("the late PartPacked to run", lambda: step_runs(lab, paid, packed).get(STEPS["packed"]))
    time.sleep(SETTLE)
    assert instance(lab, order_id) == ("completed", 2)
    assert handled(lab, order_id, "cancel-parcel") == 1 and handled(lab, order_id) == 0


def paid_then_packed_holding(lab: Scenario, order_id: str, **paid_fields) -> tuple[str, str, int]:
    """PartPaid applied (the instance at version 1), then PartPacked's step holding: it has read the instance,
    marked it packed and sent ShipParcel, and saved nothing. (PartPaid's id, PartPacked's id, the step's pid)."""
    paid = write_event(lab, "paid", order_id=order_id, **paid_fields)
    assert lab.client.call("publish_outbox", ids=[paid]) == 1
    lab.wait_for("PartPaid to start the instance", lambda: instance(lab, order_id) == ("running", 1), timeout=30)
    packed = write_event(lab, "packed", order_id=order_id, hold=HELD)
    assert lab.client.call("publish_outbox", ids=[packed]) == 1
    [pid] = lab.wait_for("PartPacked's step to hold", lambda: holds(lab, order_id), timeout=30)
    return paid, packed, pid


@pytest.mark.parametrize("winner, command, what, packed_attempts", [
    pytest.param("timeout", CANCEL, "cancel-parcel", 2, id="timeout-runs-in-the-hold"),
    pytest.param("event", SHIP, "ship-parcel", 1, id="timeout-runs-after-the-save"),
])
def test_a_timeout_due_while_the_last_event_is_handled_sends_one_command_of_the_two(
        lab: Scenario, winner, command, what, packed_attempts):
    # Given an order paid, whose timeout "packing" waits in the outbox, and PartPacked's step
    # holding (it has read version 1, marked the order packed and sent ShipParcel, not saved yet)
    order_id = f"o-{uuid.uuid4().hex[:10]}"
    paid, packed, pid = paid_then_packed_holding(lab, order_id, packing_within=FAR)
    timer_id, published = timer(lab, order_id)
    assert not published
    # When the timeout becomes due now
    due_now(lab.engine(), timer_id)
    if winner == "timeout":
        # ... and its command runs (on another pool process) while the step still holds
        assert lab.client.call("publish_outbox", ids=[timer_id]) == 1
        lab.wait_for("the timeout to run", lambda: timeout_runs(lab, timer_id), timeout=30)
        assert STEPS["packed"] not in step_runs(lab, paid, packed), "PartPacked's step ended before the timeout ran"
        release(lab, order_id)
    else:
        # ... but the step saves before its command runs
        release(lab, order_id)
        lab.wait_for("PartPacked's step to save", lambda: step_runs(lab, paid, packed).get(STEPS["packed"]),
                     timeout=30)
        assert lab.client.call("publish_outbox", ids=[timer_id]) == 1
        lab.wait_for("the timeout to run", lambda: timeout_runs(lab, timer_id), timeout=30)
    # Then the winner's command (CancelParcel of the timeout, ShipParcel of the event) is sent and
    # handled once, the other never, and the instance completes once
    lab.wait_for(f"{what} to be handled", lambda: handled(lab, order_id, what), timeout=30)
    lab.wait_for("PartPacked's step to succeed",
                 lambda: step_runs(lab, paid, packed).get(STEPS["packed"], ("",))[0] == "succeeded", timeout=30)
    time.sleep(SETTLE)
    assert instance(lab, order_id) == ("completed", 2)
    assert {name: sent(lab, order_id, name) for name in (SHIP, CANCEL)} == {SHIP: 0, CANCEL: 0, command: 1}
    assert {audit: handled(lab, order_id, audit) for audit in ("ship-parcel", "cancel-parcel")} == {
        "ship-parcel": 0, "cancel-parcel": 0, what: 1}
    # ... the timeout ran once; the step lost to it ran again after its version conflict and found the
    # instance completed (without running the handler again), or won at its first attempt
    assert timeout_runs(lab, timer_id) == [("succeeded", 1)]
    assert step_runs(lab, paid, packed)[STEPS["packed"]] == ("succeeded", packed_attempts)
    assert holds(lab, order_id) == [pid]


RACES = 3  # orders whose timeout and last event are let go at one instant


def test_a_timeout_and_the_last_event_let_go_at_one_instant_send_exactly_one_command_of_the_two(lab: Scenario):
    """The two tests above order the race; here nothing does: the step is released (it polls every 50 ms) and
    the timeout published at one instant, each after a random 0-150 ms, so either may read the instance first."""
    import random

    from tests.together import at_one_instant
    winners = {}
    for n in range(RACES):
        # Given an order paid whose timeout "packing" is due now, and PartPacked's step holding
        order_id = f"o-race{n}-{uuid.uuid4().hex[:8]}"
        paid, packed, _ = paid_then_packed_holding(lab, order_id, packing_within=FAR)
        timer_id, _ = timer(lab, order_id)
        due_now(lab.engine(), timer_id)
        # When the timeout is published and the step let go at one instant
        lags = [random.uniform(0, 0.15), random.uniform(0, 0.15)]
        at_one_instant(2, lambda who: (time.sleep(lags[who]), lab.client.call("publish_outbox", ids=[timer_id])
                                       if who == 0 else release(lab, order_id)))
        # Then the instance completes once, with exactly one of ShipParcel and CancelParcel sent and handled
        lab.wait_for("the instance to complete", lambda: instance(lab, order_id) == ("completed", 2), timeout=30)
        lab.wait_for("the timeout and the step to finish", lambda: timeout_runs(lab, timer_id) and step_runs(
            lab, paid, packed).get(STEPS["packed"], ("",))[0] == "succeeded", timeout=30)
        lab.wait_for("the winner's command to be handled", lambda: handled(lab, order_id, "ship-parcel")
                     + handled(lab, order_id, "cancel-parcel"), timeout=30)
        time.sleep(SETTLE)
        commands = {name: sent(lab, order_id, name) for name in (SHIP, CANCEL)}
        audits = {what: handled(lab, order_id, what) for what in ("ship-parcel", "cancel-parcel")}
        assert sorted(commands.values()) == [0, 1] and sorted(audits.values()) == [0, 1], (commands, audits, lags)
        assert instance(lab, order_id) == ("completed", 2)
        winners[order_id] = "event" if commands[SHIP] else "timeout"
    print(f"winners of {RACES} races: {winners}")


def test_a_pool_process_killed_in_a_step_has_its_event_redelivered_and_applied_once(lab: Scenario):
    # Given an order paid (the instance at version 1), and PartPacked's step holding in a pool
    # process (it has read the instance, marked the order packed and sent ShipParcel, committed nothing)
    order_id = f"o-{uuid.uuid4().hex[:10]}"
    paid, packed, pid = paid_then_packed_holding(lab, order_id)
    worker = parent(pid)
    assert worker != os.getpid(), "the step ran in a worker's main process, not in a pool process"
    # When that pool process is SIGKILLed (its transaction dies with it)
    os.kill(pid, signal.SIGKILL)
    release(lab, order_id)
    # Then its worker gives the event back at once (acks_late, reject_on_worker_lost), another pool
    # process of it runs the step again, and the instance completes
    lab.wait_for("the instance to complete", lambda: instance(lab, order_id) == ("completed", 2), timeout=30)
    lab.wait_for("ShipParcel to be handled", lambda: handled(lab, order_id), timeout=30)
    time.sleep(SETTLE)
    killed, rerun = holds(lab, order_id)
    assert killed == pid and rerun != pid and parent(rerun) == worker
    # ... with the event applied once: one version past PartPaid's, one ShipParcel sent and handled
    assert instance(lab, order_id) == ("completed", 2)
    [(state,)] = lab.rows("SELECT state FROM bus_process_instances WHERE manager = 'parcel' AND instance_id = :o",
                          o=order_id)
    assert state == {"paid": True, "packed": True}
    assert sent(lab, order_id) == 1 and handled(lab, order_id) == 1
    # ... its execution succeeded, and nothing of the order was dead-lettered
    assert step_runs(lab, paid, packed)[STEPS["packed"]][0] == "succeeded"
    bodies = [bytes(body or b"") for (body,) in lab.rows("SELECT body FROM bus_dead_letters")]
    assert not [body for body in bodies if order_id.encode() in body]
