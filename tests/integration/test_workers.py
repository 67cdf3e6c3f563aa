"""Which queues a worker consumes: `--boundary`, no option, `-Q`; bad options fail.

The expected queues come from `bus topology --json` (the registry), never from a list
written here, so the tests stay true as boundaries are added. Runs on every broker.
"""
from __future__ import annotations

from typing import Iterator

import pytest

from project.testing.processes import WorkerProcess
from tests.integration.conftest import BROKERS, opened
from tests.integration.support.helpers import REGISTER_USER, boundaries_of, queues_of
from tests.integration.support.scenarios import Scenario

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=BROKERS)
def scenario(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    with opened(request.param, "sqlite", tmp_path_factory, "workers") as scenario:
        yield scenario


@pytest.fixture(scope="module")
def workers(scenario: Scenario) -> Iterator[dict[str, WorkerProcess]]:
    """Three workers started together: `--boundary orders`, no option, `-Q accounts.register_user`."""
    started = {
        "boundary": scenario.start_worker(name="orders", boundaries=["orders"], wait=False),
        "everything": scenario.start_worker(name="all", wait=False),
        "queue": scenario.start_worker(name="q", queues=[REGISTER_USER], wait=False),
    }
    try:
        for worker in started.values():
            worker.wait_ready(scenario.control, timeout=60)
        yield started
    finally:
        scenario.stop_workers()


def active_queues(scenario: Scenario, worker: WorkerProcess) -> set[str]:
    """The queues `worker` consumes, as it reports them over remote control."""
    replies = scenario.control.control.inspect(destination=[worker.hostname], timeout=5).active_queues()
    assert replies and worker.hostname in replies, f"no active_queues reply from {worker.hostname}"
    return {queue["name"] for queue in replies[worker.hostname]}


def test_boundary_worker_consumes_exactly_the_queues_of_its_boundary(scenario, workers, topology):
    # Given a worker started with --boundary orders
    # When it is asked what it consumes
    consumed = active_queues(scenario, workers["boundary"])
    # Then it is every queue of the orders boundary, and nothing else
    assert consumed == queues_of(topology, "orders")
    assert "orders.place_order" in consumed


def test_worker_without_boundary_consumes_every_queue_of_the_registry(scenario, workers, topology):
    # Given a worker started without --boundary or -Q
    # When it is asked what it consumes
    consumed = active_queues(scenario, workers["everything"])
    # Then it is every command and subscriber queue of the registry, plus the bus's own
    # housekeeping queues (`bus.*`), and not Celery's default queue
    assert {q for q in consumed if not q.startswith("bus.")} == queues_of(topology)
    assert "celery" not in consumed


def test_dash_q_still_selects_the_queues(scenario, workers):
    # Given a worker started with -Q accounts.register_user
    # When it is asked what it consumes
    # Then it is that queue only
    assert active_queues(scenario, workers["queue"]) == {REGISTER_USER}


def test_unknown_boundary_stops_the_worker_with_the_known_boundaries(scenario, topology):
    # Given a typo in --boundary
    worker = scenario.start_worker(name="typo", boundaries=["nosuch"], wait=False)
    # When the worker starts
    code = worker.process.wait(60)
    # Then it exits non-zero, naming the bad value and every boundary it knows
    log = worker.logfile.read_text()
    assert code != 0
    assert "--boundary nosuch: no such boundary; known:" in log
    for boundary in boundaries_of(topology):
        assert boundary in log.split("no such boundary; known:")[1]


def test_worker_stops_cleanly_on_sigterm(scenario):
    # Given a running worker with 2 processes
    worker = scenario.start_worker(name="stop", concurrency=2)
    # When it gets SIGTERM (a warm shutdown)
    code = worker.stop(grace=10)
    # Then it exits 0 within the grace period (SIGKILL would give -9)
    assert code == 0, worker.log()
