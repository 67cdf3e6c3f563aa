"""The outbox relay under overlap, and without beat (issue 17, defects 5 and 9).

- Overlapping relays (beat's task, `bus relay`, a worker's timer, a worker's publish
  after its commit) claim the rows they publish: 300 rows left in the outbox reach each
  subscriber queue 300 times, not 600. Nothing consumes the subscriber queues, so their
  lengths count the publications: Redis+PostgreSQL, Redis+SQLite, RabbitMQ+PostgreSQL,
  with relays as threads at a barrier (each on a connection of its own) and as two real
  `bus relay --once` processes released together.
- With no beat and no `bus relay`, workers relay what a crash left behind, one lease
  holder at a time (real `celery worker` processes); `bus check` warns about rows that
  wait too long.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import pytest
from sqlalchemy import func, select, text, update

from project.store.tables import inbox, leases, outbox, utcnow
from project.testing.processes import WorkerProcess
from tests.conftest import REPO
from tests.integration.conftest import opened
from tests.integration.support.scenarios import Driver, Scenario
from tests.integration.test_events import (
    CHARGE,
    CONFIRM,
    ORDER_SUBSCRIBERS,
    SETTLE,
    STOP_GRACE,
    queue_length,
    unpublished,
)

pytestmark = pytest.mark.integration
ROWS = 300
#: a worker relay that ticks every second and leaves rows younger than a second alone
FAST_RELAY = {"BUS_RELAY_INTERVAL": "1", "BUS_RELAY_GRACE": "1"}


def pair(broker: str, database: str) -> Any:
    return pytest.param((broker, database), id=f"{broker}-{database}")


def on(*pairs: Any) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("scenario", pairs, indirect=True)


@pytest.fixture
def scenario(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    """A scenario of this test alone, with no worker until the test starts one."""
    broker, database = request.param
    with opened(broker, database, tmp_path_factory, "relay") as opened_scenario:
        yield opened_scenario


@pytest.fixture
def relay_driver(scenario: Scenario) -> Iterator[Driver]:
    """A clients/relay_driver.py process with the scenario's environment."""
    driver = Driver(scenario.env, scenario.logdir, script="relay_driver.py")
    try:
        yield driver
    finally:
        driver.close()


def start_worker(scenario: Scenario, request: pytest.FixtureRequest, **options: Any) -> WorkerProcess:
    worker = scenario.start_worker(**options)
    request.addfinalizer(lambda: scenario.stop_worker(worker, grace=STOP_GRACE))
    return worker


def subscriber_queues(scenario: Scenario) -> dict[str, int]:
    """Messages waiting in each OrderPlaced subscriber's queue."""
    return {queue: queue_length(scenario, queue) for queue in (CHARGE, CONFIRM)}


def assert_each_subscriber_queue_holds(scenario: Scenario, rows: int) -> None:
    """Every row reached each subscriber queue once: no fewer (waited for), no more (then exact)."""
    scenario.wait_for(f"{rows} messages in each subscriber queue",
                      lambda: min(subscriber_queues(scenario).values()) >= rows, timeout=60)
    assert subscriber_queues(scenario) == {CHARGE: rows, CONFIRM: rows}


def relay_holders(scenario: Scenario) -> list[str]:
    with scenario.engine().connect() as conn:
        return [r.holder for r in conn.execute(select(leases.c.holder).where(leases.c.name == "relay"))]


# ---- overlapping relays claim their rows (defect 5) -------------------------------------------
@on(pair("redis", "postgresql"), pair("redis", "sqlite"), pair("amqp", "postgresql"))
def test_two_relays_started_at_one_instant_publish_every_row_once(scenario, relay_driver, uid):
    # Given 300 OrderPlaced rows a crash left in the outbox, and nobody consuming the subscriber queues
    relay_driver.call("write_orders", n=ROWS, tag=uid)

    # When two relays start at the same instant, each on a connection of its own
    counts = relay_driver.call("relays_together", relays=2, batch=100)

    # Then each subscriber queue holds each event once
    assert_each_subscriber_queue_holds(scenario, ROWS)
    # And the two relays shared the rows, leaving none unpublished
    assert sum(counts) == ROWS, counts
    assert unpublished(scenario) == []


@on(pair("redis", "postgresql"), pair("redis", "sqlite"), pair("amqp", "postgresql"))
def test_workers_publishing_after_commit_and_a_relay_at_one_instant_publish_every_row_once(
        scenario, relay_driver, uid):
    # Given 300 rows just committed by workers, about to publish them one by one
    ids = relay_driver.call("write_orders", n=ROWS, tag=uid)

    # When a relay with no grace starts at the same instant
    done = relay_driver.call("publish_while_relaying", ids=ids)

    # Then each subscriber queue holds each event once, whoever published it
    assert_each_subscriber_queue_holds(scenario, ROWS)
    assert done["published"] + done["relayed"] == ROWS, done
    assert unpublished(scenario) == []


def waiting_for_a_lock(scenario: Scenario) -> int:
    """Sessions of the scenario's PostgreSQL database waiting for a lock on bus_outbox."""
    return scenario.rows("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                         "AND wait_event_type = 'Lock' AND query LIKE '%bus_outbox%' "
                         "AND pid <> pg_backend_pid()")[0][0]


@on(pair("redis", "postgresql"))
def test_two_bus_relay_processes_released_together_publish_every_row_once(scenario, relay_driver, uid):
    # Given 300 rows left in the outbox, and the table locked so that relays wait at its door
    relay_driver.call("write_orders", n=ROWS, tag=uid)
    processes: list[subprocess.Popen] = []
    try:
        with scenario.engine().connect() as gate:
            gate.execute(text("LOCK TABLE bus_outbox IN ACCESS EXCLUSIVE MODE"))
            # When two `bus relay --once` processes start, wait for the lock, and are let go together
            for _ in range(2):
                processes.append(subprocess.Popen(
                    [str(Path(sys.executable).with_name("bus")), "relay", "--once", "--grace", "0"],
                    env={**os.environ, **scenario.env, "COLUMNS": "300"}, cwd=REPO, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True, start_new_session=True))
            scenario.wait_for("both relays to wait for the outbox", lambda: waiting_for_a_lock(scenario) == 2,
                              timeout=60)
            gate.rollback()
        outputs = [process.communicate(timeout=120) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)

    # Then each subscriber queue holds each event once
    assert [process.returncode for process in processes] == [0, 0], outputs
    assert_each_subscriber_queue_holds(scenario, ROWS)
    assert unpublished(scenario) == []


# ---- workers relay without beat, one at a time (defect 9) --------------------------------------
@on(pair("redis", "sqlite"), pair("amqp", "postgresql"))
def test_a_worker_relays_what_a_crash_left_when_no_beat_runs(scenario, relay_driver, request, uid):
    # Given a worker, and neither beat nor `bus relay`
    start_worker(scenario, request, env=FAST_RELAY)

    # When events are left in the outbox (a worker died between its commit and its publish)
    ids = relay_driver.call("write_orders", n=20, tag=uid)

    # Then the worker publishes them within a few intervals
    scenario.wait_for("the worker to relay the leftovers", lambda: unpublished(scenario) == [], timeout=30)
    # And each subscriber handles each event once
    def handled() -> list[Any]:
        with scenario.engine().connect() as conn:
            return list(conn.execute(select(inbox.c.event_id, inbox.c.subscriber, inbox.c.duplicates)
                                     .where(inbox.c.event_id.in_(ids))))
    scenario.wait_for("every subscriber to handle every event",
                      lambda: len(handled()) == len(ORDER_SUBSCRIBERS) * len(ids))
    time.sleep(SETTLE)
    assert sorted(handled()) == sorted((i, s, 0) for i in ids for s in ORDER_SUBSCRIBERS)


@on(pair("redis", "postgresql"))
def test_of_two_workers_one_holds_the_relay_lease_and_the_other_takes_over_when_it_stops(
        scenario, relay_driver, request, uid):
    # Given two workers relaying every second, neither consuming the subscriber queues
    workers = [start_worker(scenario, request, env=FAST_RELAY, boundaries=["orders"], concurrency=1, name=f"w{n}")
               for n in range(2)]

    # When 300 rows are left in the outbox
    relay_driver.call("write_orders", n=ROWS, tag=uid)

    # Then they are published, each once
    scenario.wait_for("the workers to relay the leftovers", lambda: unpublished(scenario) == [], timeout=30)
    assert_each_subscriber_queue_holds(scenario, ROWS)
    # And over several ticks one worker held the relay lease, always the same one
    seen: list[list[str]] = []
    deadline = time.monotonic() + 3.5
    while time.monotonic() < deadline:
        seen.append(relay_holders(scenario))
        time.sleep(0.25)
    [holder] = {tuple(holders) for holders in seen}
    assert holder[0] in {w.hostname for w in workers}, seen

    # When the holder stops
    [stopping] = [w for w in workers if w.hostname == holder[0]]
    [other] = [w for w in workers if w is not stopping]
    scenario.stop_worker(stopping, grace=STOP_GRACE)
    # Then the other worker takes the lease over and relays what is left from then on
    scenario.wait_for("the other worker to hold the relay lease", lambda: relay_holders(scenario) == [other.hostname])
    relay_driver.call("write_orders", n=10, tag=f"{uid}-later")
    scenario.wait_for("the other worker to relay the later leftovers", lambda: unpublished(scenario) == [])
    assert_each_subscriber_queue_holds(scenario, ROWS + 10)


@on(pair("redis", "sqlite"))
def test_a_bad_relay_interval_stops_the_worker_naming_the_fix(scenario):
    # Given a relay interval that is not a whole number of seconds
    worker = scenario.start_worker(env={"BUS_RELAY_INTERVAL": "10s"}, wait=False)
    # When the worker starts, Then it exits, saying what is wrong and what to write instead
    assert worker.process.wait(60) != 0
    assert "BUS_RELAY_INTERVAL='10s' is not valid; use a whole number >= 0 (default 10)" in worker.log()


# ---- bus check (defect 9) --------------------------------------------------------------------
@on(pair("redis", "sqlite"))
def test_bus_check_warns_about_rows_waiting_in_the_outbox(scenario, relay_driver, uid):
    # Given rows that have waited in the outbox for ten minutes, and a fresh one
    ids = relay_driver.call("write_orders", n=3, tag=uid)
    with scenario.engine().begin() as conn:
        conn.execute(update(outbox).where(outbox.c.id.in_(ids[:2]))
                     .values(created_at=utcnow() - timedelta(minutes=10)))

    # When `bus check` runs
    done = scenario.bus("check", "--timeout", "0.5")

    # Then it warns about the two old rows, their age, and how to get them published
    assert "outbox: 2 row(s) unpublished for over 60s (the oldest for 10m)" in done.stdout, done.stdout + done.stderr
    assert "start a worker (it relays every BUS_RELAY_INTERVAL seconds) or run `bus relay`" in done.stdout


@on(pair("redis", "sqlite"))
def test_bus_check_refuses_an_outbox_age_that_is_not_a_duration(scenario):
    # Given an age that is not a duration, When `bus check` runs, Then it stops before checking, naming the forms
    done = scenario.bus("check", "--outbox-age", "soon")
    assert done.returncode == 2
    assert "'soon' is not a duration; write a whole number and a unit: 90s, 15m, 12h or 7d" in done.stderr


@on(pair("redis", "sqlite"))
def test_bus_check_is_quiet_about_an_outbox_without_old_rows(scenario, relay_driver, uid):
    # Given a row committed just now
    relay_driver.call("write_orders", n=1, tag=uid)
    # When `bus check` runs, Then it does not mention the outbox
    done = scenario.bus("check", "--timeout", "0.5")
    assert "outbox" not in done.stdout, done.stdout
    with scenario.engine().connect() as conn:
        assert conn.execute(select(func.count()).select_from(outbox)).scalar() == 1
