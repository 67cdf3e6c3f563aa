"""Exactly one owner per command across processes: at worker start-up and in `bus check`.

On Redis and RabbitMQ (workers find each other over the broker's remote control).
"""
from __future__ import annotations

from typing import Iterator

import pytest

from project.processes import WorkerProcess
from tests.integration.conftest import opened
from tests.integration.scenarios import Scenario

pytestmark = pytest.mark.integration
ROGUE = {"BUS_TASK_MODULES": "tests.integration.rogue_tasks"}
REAL_HANDLER = "handlers.orders.place_order"
ROGUE_HANDLER = "tests.integration.rogue_tasks.place_order_elsewhere"


@pytest.fixture(scope="module", params=["redis", "amqp"])
def scenario(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    with opened(request.param, "sqlite", tmp_path_factory, "owners") as scenario:
        yield scenario


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


def test_worker_with_another_handler_for_a_served_command_refuses_to_start(scenario, owner, extra):
    # Given worker A serves orders.place_order with handlers.orders.place_order
    # When worker B starts with a tasks module binding another handler to PlaceOrder
    rogue = scenario.start_worker(name="rogue", env=ROGUE, wait=False)
    extra.append(rogue)
    code = rogue.process.wait(60)

    # Then B exits non-zero with an OwnerConflict naming both hosts and both handlers
    log = rogue.logfile.read_text()
    assert code != 0, log
    assert "OwnerConflict: refusing to start: a command has exactly one owner" in log
    for name in (owner.hostname, rogue.hostname, REAL_HANDLER, ROGUE_HANDLER, "orders.place_order"):
        assert name in log


def test_replica_of_the_owner_starts_and_bus_check_passes(scenario, owner, extra):
    # Given worker A
    # When a replica with the same tasks modules starts
    extra.append(scenario.start_worker(name="replica"))

    # Then it runs, and `bus check` sees both workers and no conflict
    done = scenario.bus("check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 conflict(s)" in done.stdout
    assert "0 unconsumed command queue(s)" in done.stdout
    for worker in (owner, extra[0]):
        assert worker.process.poll() is None


def test_bus_check_fails_on_a_conflict_and_a_new_owner_refuses_to_start(scenario, owner, extra):
    # Given worker A, and a worker of another deployment that serves orders.place_order
    # with its own handler and never checked (tests/integration/legacy_worker.py)
    legacy = scenario.start_foreign_worker("tests.integration.legacy_worker", ["orders.place_order"], "legacy")
    extra.append(legacy)

    # When `bus check` surveys the cluster
    done = scenario.bus("check")

    # Then it exits 1, naming the queue, both hosts and both handlers
    assert done.returncode == 1, done.stdout + done.stderr
    conflict = [line for line in done.stdout.splitlines() if line.startswith("conflict")]
    assert len(conflict) == 1, done.stdout
    for name in ("orders.place_order", owner.hostname, legacy.hostname, REAL_HANDLER, "legacy_shop.place_order"):
        assert name in conflict[0]

    # and a bus worker starting now refuses, naming the legacy owner
    late = scenario.start_worker(name="late", wait=False)
    extra.append(late)
    assert late.process.wait(60) != 0
    assert f"served by legacy_shop.place_order on {legacy.hostname}" in late.logfile.read_text()


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
