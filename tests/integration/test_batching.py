"""Batched execution (BUS_BATCH_MAX, issue 15) with real workers on Redis, with SQLite and PostgreSQL.

A worker of 2 pool processes batches up to 8 deliveries per pool job, in one transaction
with a savepoint each (project/transport/batching.py). Two held jobs keep both processes
busy while the test sends more, so that those wait and go out as batches. The command
(tests/integration/support/batch_tasks.py) audits its job and leaves a marker file per run
naming the batch it ran in.
"""
from __future__ import annotations

import os
import signal
import uuid
from collections import defaultdict
from typing import Iterator

import pytest

from tests.integration.conftest import opened
from tests.integration.support.scenarios import Scenario
from tests.unit.test_faults_plan import faults  # bench/faults.py, a script: loaded there once

pytestmark = pytest.mark.integration

NOTE = "batchlab.note"
CAP = 8


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    """A batching worker (2 processes, BUS_BATCH_MAX=8, no relay) on Redis, and a driver."""
    with opened("redis", request.param, tmp_path_factory, "batching") as scenario:
        scenario.env.update(BUS_TASK_MODULES="tests.integration.support.batch_tasks", BUS_BATCH_MAX=str(CAP),
                            BUS_VISIBILITY_TIMEOUT="15", BUS_UNACKED_RESTORE_INTERVAL="1", BUS_RELAY_INTERVAL="0")
        scenario.worker = scenario.start_worker(concurrency=2, name="batching")
        scenario.client = scenario.driver()
        yield scenario


@pytest.fixture
def run_id() -> str:
    return uuid.uuid4().hex[:8]


def runs(lab: Scenario, job: str) -> list[tuple[int, int, int]]:
    """(attempt, pid, batch serial) of every run of `job`, in start order."""
    found = []
    for path in (lab.home / "batchlab").glob(f"{job}.*"):
        _, attempt, pid, serial, ns = path.name.rsplit(".", 4)
        found.append((int(ns), int(attempt), int(pid), int(serial)))
    return [(attempt, pid, serial) for _, attempt, pid, serial in sorted(found)]


def audits(lab: Scenario, job: str) -> int:
    return lab.rows("SELECT count(*) FROM audit_log WHERE what = 'note' AND subject = :s", s=job)[0][0]


def occupy(lab: Scenario, run_id: str, hold: float = 1.5) -> list[str]:
    """Both pool processes busy for `hold` seconds: what is sent meanwhile waits and forms batches."""
    jobs = [f"{run_id}-occupy-{n}" for n in range(2)]
    sent = [lab.client.delay(NOTE, job_id=job, hold=hold) for job in jobs]
    lab.wait_for("both processes to hold a job", lambda: all(runs(lab, job) for job in jobs))
    return sent


def batches_of(lab: Scenario, jobs: list[str]) -> dict[tuple[int, int], list[str]]:
    """The jobs of each batch (pid, serial) their first runs went in."""
    found = defaultdict(list)
    for job in jobs:
        _, pid, serial = runs(lab, job)[0]
        found[(pid, serial)].append(job)
    return dict(found)


def test_a_burst_runs_in_batches_each_command_once_with_its_result(lab: Scenario, run_id: str):
    # Given both pool processes busy
    held = occupy(lab, run_id)
    # When 40 commands arrive meanwhile
    jobs = [f"{run_id}-burst-{n}" for n in range(40)]
    sent = [lab.client.delay(NOTE, job_id=job) for job in jobs]
    # Then every caller gets its result
    assert [lab.client.get(task_id, timeout=45)["job_id"] for task_id in sent] == jobs
    for task_id in held:
        lab.client.get(task_id, timeout=45)
    # ... each command ran once and its effect is there once
    assert all(len(runs(lab, job)) == 1 and audits(lab, job) == 1 for job in jobs)
    # ... and they ran in batches: several per transaction, none over the cap
    sizes = [len(members) for members in batches_of(lab, jobs).values()]
    assert max(sizes) > 1 and max(sizes) <= CAP, sizes
    assert all(serial for _, _, serial in (runs(lab, job)[0] for job in jobs))


def test_a_failing_command_in_a_batch_retries_alone_while_the_others_commit(lab: Scenario, run_id: str):
    # Given both pool processes busy
    held = occupy(lab, run_id)
    # When 7 commands arrive meanwhile, the 4th of which fails its first attempt (a transient error)
    jobs = [f"{run_id}-mixed-{n}" for n in range(7)]
    flaky = jobs[3]
    sent = [lab.client.delay(NOTE, job_id=job, fail_first=1 if job == flaky else 0) for job in jobs]
    # Then every caller gets its result; the flaky one's from its second attempt
    results = [lab.client.get(task_id, timeout=45) for task_id in sent]
    assert [r["attempt"] for r in results] == [1 if job == flaky else 0 for job in jobs]
    for task_id in held:
        lab.client.get(task_id, timeout=45)
    # ... its first attempt ran in a batch with others, which ran once and committed
    first = runs(lab, flaky)[0]
    mates = [job for job in jobs if job != flaky and runs(lab, job)[0][1:] == first[1:]]
    assert mates, f"the flaky command ran alone: {[runs(lab, job) for job in jobs]}"
    assert all(len(runs(lab, job)) == 1 for job in jobs if job != flaky)
    # ... only it ran again, and every effect is there once (its failed attempt rolled back alone)
    assert [attempt for attempt, _, _ in runs(lab, flaky)] == [0, 1]
    assert all(audits(lab, job) == 1 for job in jobs)
    [log] = lab.rows("SELECT state, attempts FROM bus_executions WHERE message_id = :m", m=sent[3])
    assert tuple(log) == ("succeeded", 2)


def test_a_pool_process_killed_mid_batch_has_its_batch_redelivered_and_run_once(lab: Scenario, run_id: str):
    # Given both pool processes busy, and 6 commands waiting: the last holds its batch's transaction 4 s
    held = occupy(lab, run_id)
    jobs = [f"{run_id}-killed-{n}" for n in range(6)]
    holder = jobs[-1]
    sent = [lab.client.delay(NOTE, job_id=job, hold=4.0 if job == holder else 0.0) for job in jobs]
    _, pid, serial = lab.wait_for("the holder to run", lambda: runs(lab, holder))[0]
    mates = [job for job in jobs if runs(lab, job) and runs(lab, job)[0][1:] == (pid, serial)]
    assert len(mates) > 1, [runs(lab, job) for job in jobs]
    # When its pool process is SIGKILLed while the batch's transaction is open
    os.kill(pid, signal.SIGKILL)
    # Then every caller gets its result
    assert [lab.client.get(task_id, timeout=45)["job_id"] for task_id in sent] == jobs
    for task_id in held:
        lab.client.get(task_id, timeout=45)
    # ... every command of the killed batch ran again (nothing of it had committed), and every
    # effect is there exactly once
    assert all(len(runs(lab, job)) == 2 for job in mates), {job: runs(lab, job) for job in mates}
    assert all(audits(lab, job) == 1 for job in jobs)


def test_a_pool_process_killed_after_its_batch_committed_has_the_batch_redelivered_and_absorbed(
        lab: Scenario, run_id: str):
    # Given both pool processes busy, and 6 commands waiting: the last one's process dies in the
    # hand-off of its event to the publisher, after its batch's COMMIT and before any ack
    held = occupy(lab, run_id)
    jobs = [f"{run_id}-committed-{n}" for n in range(6)]
    sent = [lab.client.delay(NOTE, job_id=job, crash_after_commit=job == jobs[-1]) for job in jobs]
    # When the batch is redelivered
    # Then every caller gets its result, from the outcome its claim stored
    assert [lab.client.get(task_id, timeout=45)["job_id"] for task_id in sent] == jobs
    for task_id in held:
        lab.client.get(task_id, timeout=45)
    assert list((lab.home / "batchlab").glob("crashed.*")), "no pool process died in the hand-off"
    _, pid, serial = runs(lab, jobs[-1])[0]
    mates = [job for job in jobs if runs(lab, job)[0][1:] == (pid, serial)]
    assert len(mates) > 1, [runs(lab, job) for job in jobs]
    # ... no handler ran again: each redelivery of the committed batch was absorbed by its claim
    assert all(len(runs(lab, job)) == 1 and audits(lab, job) == 1 for job in jobs)
    lab.wait_for("every duplicate of the batch absorbed", lambda: all(
        lab.rows("SELECT duplicates FROM bus_commands WHERE task = :t AND key = :k", t=NOTE, k=f"job_id={job}")
        == [(1,)] for job in mates))
    # ... and the event left in the outbox was published by the redelivery
    lab.wait_for("the event published", lambda: lab.rows(
        "SELECT count(*) FROM bus_outbox WHERE causation_id = :m AND published_at IS NOT NULL", m=sent[-1]) == [(1,)])


@pytest.mark.parametrize("lab", ["sqlite"], indirect=True)
def test_broker_connections_cut_while_batches_run_and_wait_lose_nothing_and_the_worker_goes_on(
        lab: Scenario, run_id: str):
    # Given both pool processes running a held batch, and 30 commands waiting or on their way
    held = occupy(lab, run_id, hold=3.0)
    jobs = [f"{run_id}-cut-{n}" for n in range(30)]
    sent = [lab.client.delay(NOTE, job_id=job) for job in jobs]
    # When every connection of the run to Redis is killed (the worker's consumer closes its channel: its
    # waiting requests are dropped and the pool flushed, and it reconnects)
    try:
        said = faults.broker_outage(lab)
    finally:
        # this process's pooled connections to that Redis database died too; kombu keeps them in global pools
        # keyed by URL, which the next test's scenario would reuse if it claims the same database number
        import kombu.pools
        kombu.pools.reset()
    assert not said.startswith("0 "), said
    # Then every command still runs, once, and the worker goes on taking batches afterwards
    assert [lab.client.get(task_id, timeout=60)["job_id"] for task_id in sent] == jobs
    for task_id in held:
        lab.client.get(task_id, timeout=60)
    assert all(audits(lab, job) == 1 for job in jobs)
    after = [f"{run_id}-after-{n}" for n in range(10)]
    assert [lab.client.get(lab.client.delay(NOTE, job_id=job), timeout=30)["job_id"] for job in after] == after
