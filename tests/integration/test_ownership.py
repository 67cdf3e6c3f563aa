"""Exactly one owner per command across processes: owner leases at start-up, `bus owners`, `bus check`.

A worker takes the lease `owner:<queue>` of every command queue it consumes (key: the
handler) in the bus database before it consumes anything; `bus check` also asks the
running workers over remote control. On Redis and RabbitMQ. Tests that need nobody to
hold a lease yet get a scenario of their own (`fresh`, on PostgreSQL).
"""
from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Iterator

import pytest
from sqlalchemy import insert, update

from project.store import lease
from project.store.tables import leases, utcnow
from project.testing.processes import WorkerProcess
from tests.integration.conftest import opened
from tests.integration.support.helpers import PLACE_ORDER, REGISTER_USER
from tests.integration.support.scenarios import Scenario
from tests.integration.test_workers import active_queues

pytestmark = pytest.mark.integration
ROGUE = {"BUS_TASK_MODULES": "tests.integration.support.rogue_tasks"}
REAL_HANDLER = "handlers.orders.place_order"
ROGUE_HANDLER = "tests.integration.support.rogue_tasks.place_order_elsewhere"
LEASE = f"owner:{PLACE_ORDER}"
#: simultaneous starts per broker in the race test (each round costs one worker start, about 5 s)
ROUNDS = 2
#: tests of the lease alone (the database's; the broker plays no part in taking it over): Redis only, for CI time
LEASE_ONLY = pytest.mark.parametrize("broker", ["redis"])


@pytest.fixture(scope="module", params=["redis", "amqp"])
def broker(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def scenario(broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    with opened(broker, "sqlite", tmp_path_factory, "owners") as scenario:
        yield scenario


@pytest.fixture
def fresh(broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    """A scenario of its own on the same broker, where nobody holds a lease yet (PostgreSQL)."""
    with opened(broker, "postgresql", tmp_path_factory, "lease") as fresh:
        yield fresh


@pytest.fixture(scope="module")
def owner(scenario: Scenario) -> WorkerProcess:
    """Worker A: the default tasks modules, so handlers.orders.place_order serves PlaceOrder."""
    return scenario.start_worker(name="owner")


@pytest.fixture
def extra(scenario: Scenario) -> Iterator[list[WorkerProcess]]:
    """Workers a test adds; stopped when the test ends, pass or fail."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        scenario.stop_worker(worker)


def refused(worker: WorkerProcess) -> str:
    """Wait for `worker` to exit; assert it failed with OwnerConflict; its log."""
    code = worker.process.wait(60)
    log = worker.logfile.read_text()
    assert code != 0, log
    assert "OwnerConflict: refusing to start: a command has exactly one owner" in log, log
    return log


def owner_lease(scenario: Scenario, queue: str = PLACE_ORDER) -> lease.Lease | None:
    return next((held for held in lease.listing(scenario.engine(), "owner:") if held.name == f"owner:{queue}"), None)


def owners_json(scenario: Scenario) -> dict[str, dict]:
    done = scenario.bus("owners", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    return {row["queue"]: row for row in json.loads(done.stdout)}


def settle(scenario: Scenario, workers: list[WorkerProcess], timeout: float = 90) -> dict[str, str]:
    """Wait until each worker has either exited or answers a ping -> {hostname: 'serving' | 'exited N'}."""
    state: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while len(state) < len(workers) and time.monotonic() < deadline:
        for worker in workers:
            if worker.hostname in state:
                continue
            if worker.process.poll() is not None:
                state[worker.hostname] = f"exited {worker.process.returncode}"
            elif scenario.control.control.ping(destination=[worker.hostname], timeout=0.5):
                state[worker.hostname] = "serving"
    assert len(state) == len(workers), f"not settled after {timeout}s: {state}"
    return state


# ---- start-up -------------------------------------------------------------------------------------
def test_worker_with_another_handler_for_a_served_command_refuses_to_start(scenario, owner, extra):
    # Given worker A serves orders.place_order with handlers.orders.place_order
    # When worker B starts with a tasks module binding another handler to PlaceOrder
    rogue = scenario.start_worker(name="rogue", env=ROGUE, wait=False)
    extra.append(rogue)

    # Then B exits non-zero with an OwnerConflict naming the queue, the holding handler and
    # its host, when the lease expires, B's handler, and the ways out
    log = refused(rogue)
    conflict = log[log.index("OwnerConflict: refusing to start"):]
    for name in ("orders.place_order", REAL_HANDLER, owner.hostname, "expires", rogue.hostname, ROGUE_HANDLER,
                 "stop that worker", f"bus owners release {PLACE_ORDER}"):
        assert name in conflict, conflict
    # and the lease still names A's handler
    assert owner_lease(scenario).key == REAL_HANDLER


def test_replica_of_the_owner_starts_joins_the_lease_and_bus_check_passes(scenario, owner, extra):
    # Given worker A
    # When a replica with the same tasks modules starts
    replica = scenario.start_worker(name="replica")
    extra.append(replica)

    # Then it runs, says at start-up that it joined A's lease, and `bus check` sees both
    # workers and no conflict
    assert f"owner lease of {PLACE_ORDER}: joined ({REAL_HANDLER}" in replica.log()
    done = scenario.bus("check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 conflict(s)" in done.stdout
    assert "0 unconsumed command queue(s)" in done.stdout
    for worker in (owner, replica):
        assert worker.process.poll() is None


def test_bus_owners_lists_the_lease_of_every_command_queue(scenario, owner):
    # Given worker A, which consumes every queue of the registry
    # When `bus owners` lists the leases, as JSON and as a table
    rows = owners_json(scenario)
    table = scenario.bus("owners")

    # Then each command queue is there, live, naming its handler and a worker of this scenario
    assert rows[PLACE_ORDER]["handler"] == REAL_HANDLER
    assert rows[REGISTER_USER]["handler"] == "handlers.accounts.register_user"
    assert {row["state"] for row in rows.values()} == {"live"}
    assert set(rows[PLACE_ORDER]) >= {"queue", "handler", "holder", "acquired_at", "renewed_at", "expires_at"}
    # and the table, piped, is whole: one line per lease, names not cut
    assert table.returncode == 0, table.stderr
    line = next(line for line in table.stdout.splitlines() if PLACE_ORDER in line)
    assert REAL_HANDLER in line and "live" in line, table.stdout


def test_bus_check_fails_on_a_live_worker_that_serves_another_handler(scenario, owner, extra):
    # Given worker A, and a worker of another deployment that serves orders.place_order
    # with its own handler and holds no lease (tests/integration/support/legacy_worker.py)
    legacy = scenario.start_foreign_worker("tests.integration.support.legacy_worker", ["orders.place_order"], "legacy")
    extra.append(legacy)

    # When `bus check` surveys the cluster
    done = scenario.bus("check")

    # Then it exits 1, naming the queue, both hosts and both handlers
    assert done.returncode == 1, done.stdout + done.stderr
    conflict = [line for line in done.stdout.splitlines() if line.startswith("conflict")]
    assert len(conflict) == 1, done.stdout
    for name in ("orders.place_order", owner.hostname, legacy.hostname, REAL_HANDLER, "legacy_shop.place_order"):
        assert name in conflict[0]


def test_bus_check_lists_command_queues_that_no_worker_consumes(tmp_path_factory, scenario):
    # Given a cluster (its own broker namespace) where only an orders worker runs
    with opened(scenario.broker, "sqlite", tmp_path_factory, "unconsumed") as alone:
        alone.start_worker(name="orders-only", boundaries=["orders"])

        # When `bus check` surveys it
        done = alone.bus("check")

    # Then it passes (no conflict) and names the command queues nobody consumes, with the fix
    assert done.returncode == 0, done.stdout + done.stderr
    assert "unconsumed: command queue accounts.register_user has no running worker; " \
           "start one: celery -A project worker --boundary accounts" in done.stdout
    assert "command queue orders.place_order" not in done.stdout
    assert "1 worker(s) answered; 0 conflict(s)" in done.stdout


# ---- leases on a fresh database -------------------------------------------------------------------
def test_two_workers_with_different_handlers_started_at_once_exactly_one_serves(fresh):
    for round_ in range(ROUNDS):
        # Given nobody holds the lease of orders.place_order
        assert owner_lease(fresh) is None
        # When a worker with the real handler and one with another handler start at the same instant
        real = fresh.start_worker(name=f"real{round_}", wait=False)
        rogue = fresh.start_worker(name=f"rogue{round_}", env=ROGUE, wait=False)

        # Then exactly one of them serves; the other exits non-zero with OwnerConflict
        state = settle(fresh, [real, rogue])
        assert list(state.values()).count("serving") == 1, f"round {round_}: {state}"
        winner, loser = (real, rogue) if state[real.hostname] == "serving" else (rogue, real)
        refused(loser)
        assert PLACE_ORDER in active_queues(fresh, winner)
        # and the lease names the winner's handler and host
        held = owner_lease(fresh)
        assert (held.key, held.holder) == (REAL_HANDLER if winner is real else ROGUE_HANDLER, winner.hostname)
        # and a losing real worker left none of the leases it took before the conflict behind
        if loser is real:
            assert [h.name for h in lease.listing(fresh.engine(), "owner:")] == [LEASE]
        fresh.stop_workers()
        for held in lease.listing(fresh.engine(), "owner:"):
            lease.release(fresh.engine(), held.name)


@LEASE_ONLY
def test_an_expired_lease_of_another_handler_is_taken_over_at_start(fresh):
    # Given an owner lease of orders.place_order, held by another handler, that expired an hour ago
    long_ago = utcnow() - timedelta(hours=2)
    with fresh.engine().begin() as conn:
        conn.execute(insert(leases).values(name=LEASE, key=ROGUE_HANDLER, holder="gone@elsewhere",
                                           acquired_at=long_ago, renewed_at=long_ago,
                                           expires_at=long_ago + timedelta(hours=1)))

    # When a worker with the real handler starts
    worker = fresh.start_worker(name="heir")

    # Then it serves, holds the lease, and says at start-up whose expired lease it took over
    held = owner_lease(fresh)
    assert (held.key, held.holder) == (REAL_HANDLER, worker.hostname)
    assert not held.expired()
    log = worker.log()
    assert f"owner lease of {PLACE_ORDER}: took over ({REAL_HANDLER}" in log, log
    assert ROGUE_HANDLER in log and "gone@elsewhere" in log


@LEASE_ONLY
def test_bus_owners_release_lets_a_renamed_handler_start(fresh):
    # Given a worker with the real handler that ran and stopped (its lease lives on until it expires)
    fresh.stop_worker(fresh.start_worker(name="old"))
    assert not owner_lease(fresh).expired()
    # and a worker with the renamed handler is refused meanwhile
    refused(fresh.start_worker(name="early", env=ROGUE, wait=False))

    # When the operator releases the lease of orders.place_order
    done = fresh.bus("owners", "release", PLACE_ORDER)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"released the owner lease of {PLACE_ORDER}" in done.stdout

    # Then the renamed handler's worker starts and `bus owners` lists its lease
    renamed = fresh.start_worker(name="renamed", env=ROGUE)
    row = owners_json(fresh)[PLACE_ORDER]
    assert (row["handler"], row["holder"], row["state"]) == (ROGUE_HANDLER, renamed.hostname, "live")
    # and `bus check` reads the lease: it names another handler than this registry binds
    check = fresh.bus("check")
    assert check.returncode == 1, check.stdout + check.stderr
    assert any(line.startswith("conflict") and "owner lease" in line and ROGUE_HANDLER in line
               for line in check.stdout.splitlines()), check.stdout


def test_heartbeat_renews_the_lease_and_stops_consuming_a_queue_taken_by_another_handler(fresh):
    # Given a worker whose leases last 3 s (renewed every second)
    worker = fresh.start_worker(name="beat", env={"BUS_OWNER_LEASE_TTL": "3"})
    first = owner_lease(fresh)
    # When time passes, the lease is renewed and does not expire
    fresh.wait_for("renewals past the first expiry",
                   lambda: owner_lease(fresh).renewed_at > first.expires_at, timeout=30)
    assert not owner_lease(fresh).expired()

    # When another handler takes the lease of orders.place_order (as if it had expired during
    # a database outage)
    with fresh.engine().begin() as conn:
        conn.execute(update(leases).where(leases.c.name == LEASE).values(
            key=ROGUE_HANDLER, holder="thief@elsewhere", expires_at=utcnow() + timedelta(hours=1)))

    # Then the worker logs an ERROR and stops consuming that queue, and only that queue
    fresh.wait_for("the worker to stop consuming orders.place_order",
                   lambda: PLACE_ORDER not in active_queues(fresh, worker), timeout=30)
    assert REGISTER_USER in active_queues(fresh, worker)
    log = worker.log()
    assert "ERROR" in log and f"owner lease of {PLACE_ORDER} is held by {ROGUE_HANDLER}" in log, log
    # and it leaves the new holder's lease alone
    assert owner_lease(fresh).key == ROGUE_HANDLER
