"""Durable timers on real workers and brokers (issue 16): Redis+PostgreSQL and RabbitMQ+PostgreSQL.

One lab per broker: a real `celery worker` (2 processes) serving `timerlab.ring`
(support/timer_tasks.py: each handler run is a row of audit_log), relaying every
second, with BUS_TIMER_THRESHOLD=2 and a visibility timeout of 11 s (the lowest the
bus's own 10 s store retry allows) swept every second; and a driver process
(clients/relay_driver.py: sends, relays at a barrier). A ring sent with a countdown
past the threshold is a timer in the outbox; the test hook `due_now`
(project/testing/timers.py) stands for the time passing.

- a two-hour countdown is listed by `bus timers list`, does not run, and runs once when due;
- (Redis) a delay longer than the visibility timeout runs once: it waited in the database,
  not unacknowledged in a worker, which Redis would have handed out again;
- a handler's delayed send runs once, after its delay;
- a timer cancelled with `bus timers cancel` never runs, even once due; one that ran is too late to cancel;
- two relays at a barrier and the worker's relay publish each due timer once;
- a timer outlives the worker: made due while no worker runs, it runs when one starts;
- the in-process harness agrees with the worker on what ran and what was cancelled.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from celery import Celery
from sqlalchemy import select, text, update

from project.messaging.sending import prepare
from project.store import timers
from project.store.tables import outbox, utcnow
from project.testing.timers import due_now
from tests.integration.conftest import opened
from tests.integration.support.scenarios import Driver, Scenario
from tests.integration.support.timer_lab import Ring, ring
from tests.integration.test_events import SETTLE, STOP_GRACE

pytestmark = pytest.mark.integration
RING = "timerlab.ring"
TWO_HOURS = 7200
VISIBILITY = 11
LAB = {"BUS_TASK_MODULES": "tests.integration.support.timer_tasks", "BUS_TIMER_THRESHOLD": "2",
       "BUS_RELAY_INTERVAL": "1", "BUS_RELAY_GRACE": "1", "BUS_VISIBILITY_TIMEOUT": str(VISIBILITY),
       "BUS_UNACKED_RESTORE_INTERVAL": "1"}


ON_REDIS = pytest.param(("redis", "postgresql"), id="redis-postgresql")
#: the relay, its claims and the cancel are the database's, whatever the broker: these run on Redis only
#: (the two-hour countdown and the delay past the visibility timeout run on both brokers)
redis_only = pytest.mark.parametrize("lab", [ON_REDIS], indirect=True)


@pytest.fixture(scope="module", params=[ON_REDIS, pytest.param(("amqp", "postgresql"), id="amqp-postgresql")])
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    """The timer lab on one broker: its worker and its driver."""
    broker, database = request.param
    with opened(broker, database, tmp_path_factory, "timers") as scenario:
        scenario.env.update(LAB)
        scenario.worker = scenario.start_worker(concurrency=2, name="timers")
        scenario.client = Driver(scenario.env, scenario.logdir, script="relay_driver.py")
        try:
            yield scenario
        finally:
            scenario.client.close()


def send_later(lab: Scenario, ring_id: str, countdown: float, **fields: Any) -> str:
    """`ring.apply_async(kwargs=..., countdown=...)` in the driver; the AsyncResult's id."""
    return lab.client.call("apply_async", task=RING, kwargs={"ring_id": ring_id, **fields},
                           options={"countdown": countdown})


def rings(lab: Scenario, ring_id: str) -> int:
    """How many times the handler ran for `ring_id` (committed)."""
    return lab.rows("SELECT count(*) FROM audit_log WHERE what = 'ring' AND subject = :s", s=ring_id)[0][0]


def mentioning(ring_id: str) -> str:
    """A LIKE pattern for the JSON payloads of the ring `ring_id` (and of no other ring)."""
    return f'%"{ring_id}"%'


def claims(lab: Scenario, ring_id: str) -> list[tuple]:
    """(status, duplicates) of the ring's idempotency claim: a second delivery counts as a duplicate."""
    return [tuple(r) for r in lab.rows("SELECT status, duplicates FROM bus_commands WHERE task = :t "
                                       "AND CAST(payload AS TEXT) LIKE :p", t=RING, p=mentioning(ring_id))]


def timer_of(lab: Scenario, ring_id: str) -> str:
    """The id of the timer of the ring `ring_id` (a handler's send: its id derives from the execution)."""
    [[timer]] = lab.rows("SELECT id FROM bus_outbox WHERE due_at IS NOT NULL AND CAST(payload AS TEXT) LIKE :p",
                         p=mentioning(ring_id))
    return timer


def listed(lab: Scenario) -> dict[str, dict]:
    done = lab.bus("timers", "list", "--json")
    assert done.returncode == 0, done.stderr
    return {timer["id"]: timer for timer in json.loads(done.stdout)}


def pending(lab: Scenario) -> list[str]:
    return [t.id for t in timers.pending(lab.engine())]


def runs_once(lab: Scenario, ring_id: str) -> None:
    """The ring runs, and once: one handler run, one delivery (no duplicate absorbed by its claim)."""
    lab.wait_for(f"{ring_id} to run", lambda: rings(lab, ring_id) == 1, timeout=30)
    time.sleep(SETTLE)
    assert (rings(lab, ring_id), claims(lab, ring_id)) == (1, [("succeeded", 0)])


def test_a_two_hour_countdown_waits_in_the_outbox_and_runs_once_when_due(lab, uid):
    ring_id = f"two-hours-{uid}"
    # When a ring is sent with a two-hour countdown
    timer = send_later(lab, ring_id, TWO_HOURS)

    # Then its id is the one its key gives, and `bus timers list` shows it, due in two hours
    assert timer == prepare(Ring, {"ring_id": ring_id}, None)[1]
    shown = listed(lab)[timer]
    assert (shown["kind"], shown["name"]) == ("command", RING) and TWO_HOURS - 60 < shown["due_in"] <= TWO_HOURS
    # And nothing runs, though the worker's relay ticked meanwhile
    time.sleep(2)
    assert (rings(lab, ring_id), claims(lab, ring_id)) == (0, [])

    # When its time comes
    due_now(lab.engine(), timer)

    # Then the relay publishes it and it runs exactly once; its sender's AsyncResult gets the result
    runs_once(lab, ring_id)
    assert lab.client.get(timer) == {"ring_id": ring_id}
    assert timer not in pending(lab)
    # And cancelling it now is too late
    assert timers.cancel(lab.engine(), timer) is timers.Cancel.TOO_LATE


def test_a_delay_longer_than_the_visibility_timeout_runs_once(lab, uid):
    if lab.broker != "redis":
        pytest.skip("RabbitMQ hands an unacknowledged message back when its consumer goes, never by time")
    ring_id = f"past-visibility-{uid}"
    # Given the worker's Redis visibility timeout of 11 s, checked every second
    # When a ring is sent 2 s past it
    sent = time.monotonic()
    send_later(lab, ring_id, VISIBILITY + 2)

    # Then it runs at its time and once: a worker holding it all along would have had it handed
    # back after 11 s, and the copy would have been delivered again (a duplicate of its claim)
    lab.wait_for("the ring to run", lambda: rings(lab, ring_id) == 1, timeout=40)
    assert time.monotonic() - sent >= VISIBILITY + 1
    runs_once(lab, ring_id)


@redis_only
def test_a_handlers_delayed_send_runs_once_after_its_delay(lab, uid):
    ring_id = f"then-{uid}"
    # When a ring is sent now whose handler sends the next ring 4 s later (past the threshold: a timer)
    lab.client.call("apply_async", task=RING, kwargs={"ring_id": ring_id, "then_after": 4}, options={})

    # Then the first runs now, the next once, 4 s after it
    runs_once(lab, ring_id)
    assert timer_of(lab, f"{ring_id}-next")
    runs_once(lab, f"{ring_id}-next")
    [first, then] = [r[0] for r in lab.rows("SELECT at FROM audit_log WHERE subject IN (:a, :b) ORDER BY at",
                                            a=ring_id, b=f"{ring_id}-next")]
    assert 3.5 <= (then - first).total_seconds() < 8


@redis_only
def test_a_timer_cancelled_before_it_is_due_never_runs(lab, uid):
    ring_id = f"cancelled-{uid}"
    # Given a ring two hours ahead
    timer = send_later(lab, ring_id, TWO_HOURS)

    # When `bus timers cancel` cancels it, and then its time comes
    done = lab.bus("timers", "cancel", timer)
    assert done.returncode == 0 and f"timer {timer} is cancelled: it will not run" in done.stdout, done.stderr
    due_now(lab.engine(), timer)

    # Then over several relay ticks it does not run, is not published, and is no longer listed
    time.sleep(3)
    assert (rings(lab, ring_id), claims(lab, ring_id)) == (0, [])
    with lab.engine().connect() as conn:
        row = conn.execute(select(outbox.c.published_at, outbox.c.cancelled_at).where(outbox.c.id == timer)).one()
    assert row.published_at is None and row.cancelled_at is not None
    assert timer not in pending(lab)


@redis_only
def test_two_relays_at_a_barrier_and_the_workers_relay_publish_each_due_timer_once(lab, uid):
    # Given 40 rings two hours ahead, all made due at one instant
    ring_ids = [f"race-{uid}-{n}" for n in range(40)]
    ids = [send_later(lab, ring_id, TWO_HOURS) for ring_id in ring_ids]
    with lab.engine().begin() as conn:
        conn.execute(update(outbox).where(outbox.c.id.in_(ids)).values(due_at=utcnow()))

    # When two relays start at one instant (threads at a barrier, 5 rows a batch), the worker's relaying as well
    counts = lab.client.call("relays_together", relays=2, batch=5)

    # Then every timer is published, and each ring runs once: no second delivery reached a claim
    assert sum(counts) <= len(ids), counts
    lab.wait_for("every ring to run", lambda: all(rings(lab, r) == 1 for r in ring_ids), timeout=60)
    time.sleep(SETTLE)
    assert {r: (rings(lab, r), claims(lab, r)) for r in ring_ids} == dict.fromkeys(ring_ids, (1, [("succeeded", 0)]))
    with lab.engine().connect() as conn:
        assert conn.execute(select(outbox.c.id).where(outbox.c.id.in_(ids), outbox.c.published_at.is_(None))
                            ).all() == []


@redis_only
def test_a_timer_outlives_the_worker_and_runs_when_one_starts(lab, uid):
    ring_id = f"restart-{uid}"
    # Given a ring two hours ahead, and the worker stopped
    timer = send_later(lab, ring_id, TWO_HOURS)
    lab.stop_worker(lab.worker, grace=STOP_GRACE)

    # When its time comes while no worker runs, then a worker starts
    due_now(lab.engine(), timer)
    time.sleep(1)
    assert rings(lab, ring_id) == 0
    lab.worker = lab.start_worker(concurrency=2, name="timers-again")

    # Then it runs, once
    runs_once(lab, ring_id)


# ---- the harness agrees ---------------------------------------------------------------------
#: what both runs are compared on: handler runs, claims, and each timer's fate
SUMMARY = {
    "runs": "SELECT subject, count(*) FROM audit_log WHERE what = 'ring' AND subject LIKE :p GROUP BY subject "
            "ORDER BY subject",
    "claims": "SELECT status, duplicates, count(*) FROM bus_commands WHERE task = 'timerlab.ring' "
              "AND CAST(payload AS TEXT) LIKE :q GROUP BY status, duplicates ORDER BY status, duplicates",
    "timers": "SELECT id, published_at IS NOT NULL, cancelled_at IS NOT NULL FROM bus_outbox "
              "WHERE due_at IS NOT NULL AND CAST(payload AS TEXT) LIKE :q ORDER BY id",
}


def summary(connect, prefix: str) -> dict:
    with connect() as conn:
        return {name: [tuple(row) for row in conn.execute(text(sql), {"p": f"{prefix}%", "q": f'%"{prefix}%'})]
                for name, sql in SUMMARY.items()}


@pytest.fixture
def harness(bus_harness_template: Path, tmp_path: Path):
    """The lab's handler on an in-process bus of its own, with the same audit port."""
    from adapters.ports import RecordingPorts
    from project.core import Bus
    from project.testing.harness import BusHarness
    app = Celery("timers-harness", set_as_current=False)
    app.conf.update(include=[__name__], bus_timer_threshold=2)
    bus = Bus(app)
    bus.provide("audit", lambda uow: RecordingPorts(uow.session))
    bus.command(Ring)(ring)
    database = tmp_path / "bus.db"
    shutil.copyfile(bus_harness_template, database)
    with BusHarness(bus, f"sqlite:///{database}") as in_process:
        yield in_process


@redis_only
def test_the_harness_and_a_worker_agree_on_what_runs_and_what_is_cancelled(lab, harness, uid):
    # Given, in both: a ring two hours ahead that is cancelled, another that comes due, and one whose
    # handler sends the next ring an hour later
    prefix = f"agree-{uid}"
    kept, dropped, chained = f"{prefix}-kept", f"{prefix}-dropped", f"{prefix}-chained"

    # In process: the clock moves
    harness.send(Ring(ring_id=kept), delay=TWO_HOURS)
    timers.cancel(harness.bus.engine(), harness.send(Ring(ring_id=dropped), delay=TWO_HOURS))
    harness.send(Ring(ring_id=chained, then_after=3600))
    harness.run_until_idle()
    harness.advance(TWO_HOURS)
    harness.run_until_idle()
    in_process = summary(harness.bus.engine().connect, prefix)

    # On the worker: the test hook stands for the time passing
    kept_id = send_later(lab, kept, TWO_HOURS)
    assert timers.cancel(lab.engine(), send_later(lab, dropped, TWO_HOURS)) is timers.Cancel.CANCELLED
    lab.client.call("apply_async", task=RING, kwargs={"ring_id": chained, "then_after": 3600}, options={})
    runs_once(lab, chained)
    for timer in (kept_id, timer_of(lab, f"{chained}-next")):
        due_now(lab.engine(), timer)
    runs_once(lab, kept)
    runs_once(lab, f"{chained}-next")
    on_worker = summary(lab.engine().connect, prefix)

    # Then both ran the same handlers once each, kept the same claims, and left each timer in the same state
    assert in_process == on_worker
    assert in_process["runs"] == [(chained, 1), (f"{chained}-next", 1), (kept, 1)]
    assert in_process["claims"] == [("succeeded", 0, 3)]
    assert sorted(fate for _, *fate in in_process["timers"]) == [[False, True], [True, False], [True, False]]
