"""Attacking the claim: two deliveries of one key at once, whatever the first one meets.

Real `celery worker` processes (2 pool processes) on Redis, with PostgreSQL and SQLite.
The command (tests/integration/support/claim_tasks.py) holds its first run's transaction open
until the test releases it, so a duplicate sent meanwhile reaches the claim and waits
there (PostgreSQL: on the row lock, which the test sees in pg_stat_activity; SQLite: on
the write lock). Then the first run succeeds, refuses (a domain error), fails with a
transient error and is retried, or has its pool process SIGKILLed. Each time the effects
are applied once, and every caller gets the first outcome, or IdempotencyConflict when
it sent the key with another payload.

Dispatch on redelivery (issue 17, defect 9): a pool process killed after its commit, in
the hand-off to the publisher, leaves its outbox rows unpublished; with no relay running,
the redelivery of its message publishes them (a command's; a subscriber's, also on RabbitMQ).

Purges during traffic (defect 7): keys purged again and again while duplicates arrive are
claimed again, never dead-lettered.
"""
from __future__ import annotations

import os
import re
import signal
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

import pytest

from project.store import retention
from project.store.tables import utcnow
from tests.integration.conftest import opened
from tests.integration.support.scenarios import RemoteError, Scenario

pytestmark = pytest.mark.integration

CLAIM_JOB = "claimlab.claim_job"
MODULES = "tests.integration.support.claim_tasks"
REFUSED = "tests.integration.support.claim_tasks.JobRefused"
CONFLICT = "project.errors.IdempotencyConflict"
#: deliveries sent while keys are purged
TRAFFIC = 240
#: SQLite shows no waiter: time for the second pool process to go from receipt to its claim
SQLITE_REACH_CLAIM = 0.5


@contextmanager
def opened_lab(broker: str, database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    """A scenario whose worker (2 processes, no relay, no beat) serves the claim lab's tasks, and its driver."""
    with opened(broker, database, tmp_path_factory, "claims") as scenario:
        # A killed pool process's message is requeued at once by its worker. On a loaded machine
        # the worker once missed a pool process that died right after its start; on Redis the
        # visibility timeout (15 s, swept every second) then redelivers its message instead.
        # No relay: the worker's own (BUS_RELAY_INTERVAL) would hide a redelivery that publishes nothing.
        scenario.env.update(BUS_TASK_MODULES=MODULES, BUS_VISIBILITY_TIMEOUT="15", BUS_UNACKED_RESTORE_INTERVAL="1",
                            BUS_RELAY_INTERVAL="0")
        scenario.worker = scenario.start_worker(concurrency=2, name="claims")
        scenario.client = scenario.driver()
        yield scenario


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    """The claim lab on Redis."""
    with opened_lab("redis", request.param, tmp_path_factory) as scenario:
        yield scenario


@pytest.fixture(scope="module")
def rabbit_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    """The claim lab on RabbitMQ and PostgreSQL (Celery's result backend: the database)."""
    with opened_lab("amqp", "postgresql", tmp_path_factory) as scenario:
        yield scenario


@pytest.fixture
def job() -> str:
    return f"job-{uuid.uuid4().hex[:10]}"


# ---- helpers -------------------------------------------------------------------------------------
def runs(lab: Scenario, job: str) -> list[int]:
    """The pid of every run of `job`'s handler, in start order."""
    found = []
    for path in (lab.home / "claims").glob(f"{job}.*"):
        if path.suffix != ".release":
            _, pid, ns = path.name.rsplit(".", 2)
            found.append((int(ns), int(pid)))
    return [pid for _, pid in sorted(found)]


def audits(lab: Scenario, subject: str, what: str = "claim-job") -> int:
    return lab.rows("SELECT count(*) FROM audit_log WHERE what = :w AND subject = :s", w=what, s=subject)[0][0]


def logged(lab: Scenario, pattern: str) -> int:
    return len(re.findall(pattern, lab.worker.logfile.read_text()))


def received(lab: Scenario, task_id: str) -> int:
    return logged(lab, rf"Task {re.escape(CLAIM_JOB)}\[{re.escape(task_id)}\] received")


def waiting_on_the_claim(lab: Scenario) -> bool:
    """PostgreSQL: a transaction of the bus waits for a row lock (the duplicate's INSERT of the key)."""
    return lab.rows("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'")[0][0] >= 1


def claim_row(lab: Scenario, job: str) -> Any | None:
    """The job's claim (None while no claim of it is committed)."""
    rows = lab.rows("SELECT status, duplicates, error_type FROM bus_commands WHERE task = :t AND key = :k",
                    t=CLAIM_JOB, k=f"job_id={job}")  # the natural key
    return rows[0] if rows else None


def absorbed(lab: Scenario, job: str, duplicates: int = 1) -> bool:
    row = claim_row(lab, job)
    return row is not None and row.duplicates == duplicates


def outcome(lab: Scenario, task_id: str) -> Any:
    """What the caller of `task_id` gets: the result, or the RemoteError naming the exception."""
    try:
        return lab.client.get(task_id, timeout=45)
    except RemoteError as exc:
        return exc


def race(lab: Scenario, job: str, outcome_: str, second_note: str, *, crash: bool = False) -> tuple[str, str]:
    """Send `job`, and its duplicate (note `second_note`) once the first run holds the claim; release or kill it.

    Returns the two task ids (equal when the payloads are).
    """
    first = lab.client.delay(CLAIM_JOB, job_id=job, outcome=outcome_, note="first")
    [pid] = lab.wait_for("the first run to hold the claim", lambda: runs(lab, job), timeout=30)
    second = lab.client.delay(CLAIM_JOB, job_id=job, outcome=outcome_, note=second_note)
    if lab.database == "postgresql":
        lab.wait_for("the duplicate to wait on the claim", lambda: waiting_on_the_claim(lab), timeout=30)
    else:
        lab.wait_for("the duplicate's receipt", lambda: received(lab, second) == (2 if second == first else 1))
        time.sleep(SQLITE_REACH_CLAIM)
    assert runs(lab, job) == [pid], "the duplicate ran the handler while the first run held the claim"
    if crash:
        os.kill(pid, signal.SIGKILL)
    else:
        (lab.home / "claims" / f"{job}.release").touch()
    return first, second


def is_error(value: Any, type_: str) -> bool:
    return isinstance(value, RemoteError) and value.type == type_


# ---- success -------------------------------------------------------------------------------------
def test_a_duplicate_waiting_on_a_success_gets_its_result(lab: Scenario, job: str):
    # Given a job whose first run holds the claim, and the same command sent again meanwhile
    first, second = race(lab, job, "succeed", "first")
    # When the first run commits
    # Then both callers get its result, the handler ran once, its effect exists once
    assert first == second
    assert outcome(lab, first) == {"job_id": job, "note": "first"}
    lab.wait_for("both deliveries to succeed",
                 lambda: logged(lab, rf"{re.escape(CLAIM_JOB)}\[{first}\] succeeded in") == 2)
    assert absorbed(lab, job)
    assert len(runs(lab, job)) == 1 and audits(lab, job) == 1


def test_another_payload_waiting_on_a_success_is_refused_as_a_conflict(lab: Scenario, job: str):
    # Given a job whose first run holds the claim, and the key sent with another payload meanwhile
    first, second = race(lab, job, "succeed", "second")
    # When the first run commits
    # Then its caller gets its result, the other one IdempotencyConflict; the handler ran once
    assert outcome(lab, first) == {"job_id": job, "note": "first"}
    assert is_error(outcome(lab, second), CONFLICT)
    assert len(runs(lab, job)) == 1 and audits(lab, job) == 1


# ---- domain refusal (issue 17, defect 2) ---------------------------------------------------------
def test_a_duplicate_waiting_on_a_refusal_gets_the_same_refusal_without_running(lab: Scenario, job: str):
    # Given a job whose first run holds the claim and will refuse, and the same command sent again meanwhile
    first, second = race(lab, job, "refuse", "first")
    # When the first run refuses
    # Then the handler ran once (the refusal kept the claim), its effect was rolled back,
    # and both deliveries ended with the first run's refusal
    assert first == second
    error = outcome(lab, first)
    assert is_error(error, REFUSED) and "note 'first'" in error.message
    refusal = rf"{re.escape(CLAIM_JOB)}\[{first}\] raised expected: JobRefused\(\"job {job} is refused \(note 'first'\)"
    lab.wait_for("both deliveries to end with the refusal", lambda: logged(lab, refusal) == 2)
    assert len(runs(lab, job)) == 1, f"the handler ran {len(runs(lab, job))} times for one key"
    assert audits(lab, job) == 0
    assert absorbed(lab, job) and (claim_row(lab, job).status, claim_row(lab, job).error_type) == ("failed", REFUSED)


def test_another_payload_waiting_on_a_refusal_is_refused_as_a_conflict(lab: Scenario, job: str):
    # Given a job whose first run holds the claim and will refuse, and the key sent with another payload meanwhile
    first, second = race(lab, job, "refuse", "second")
    # When the first run refuses
    # Then its caller gets the refusal, the other IdempotencyConflict, and the handler ran once
    assert is_error(outcome(lab, first), REFUSED)
    assert is_error(outcome(lab, second), CONFLICT), "the second payload took the key"
    assert len(runs(lab, job)) == 1, f"the handler ran {len(runs(lab, job))} times for one key"
    assert audits(lab, job) == 0


# ---- transient failure, retried ------------------------------------------------------------------
def test_a_duplicate_waiting_on_a_transient_failure_runs_and_the_retry_gets_its_result(lab: Scenario, job: str):
    # Given a job whose first run holds the claim and will lose its connection, and the
    # same command sent again meanwhile
    first, second = race(lab, job, "fail-first", "first")
    # When the first run fails (nothing is decided: its transaction rolls back, the key is free)
    # Then the waiting duplicate claims the key and runs; the retry of the first gets that result
    assert first == second
    lab.wait_for("the retry absorbed", lambda: absorbed(lab, job), timeout=45)
    assert outcome(lab, first) == {"job_id": job, "note": "first"}
    assert logged(lab, rf"{re.escape(CLAIM_JOB)}\[{first}\] retry: Retry in") == 1
    assert len(runs(lab, job)) == 2 and audits(lab, job) == 1


def test_another_payload_waiting_on_a_transient_failure_takes_the_key_and_the_retry_conflicts(
        lab: Scenario, job: str):
    # Given a job whose first run holds the claim and will lose its connection, and the key
    # sent with another payload meanwhile
    first, second = race(lab, job, "fail-first", "second")
    # When the first run fails
    # Then the other payload claims the key and succeeds; the retry of the first is a conflict
    assert outcome(lab, second) == {"job_id": job, "note": "second"}
    assert is_error(outcome(lab, first), CONFLICT)
    assert len(runs(lab, job)) == 2 and audits(lab, job) == 1


# ---- crash -----------------------------------------------------------------------------------------
def test_a_duplicate_waiting_on_a_killed_run_runs_and_the_redelivery_gets_its_result(lab: Scenario, job: str):
    # Given a job whose first run holds the claim, and the same command sent again meanwhile
    # When the pool process of the first run is SIGKILLed (its transaction dies with it)
    first, second = race(lab, job, "succeed", "first", crash=True)
    # Then the duplicate claims the key and runs; the killed delivery is redelivered and gets
    # that result, or is acked by Celery, which finds its task id (shared with the duplicate) succeeded
    assert first == second
    assert outcome(lab, first) == {"job_id": job, "note": "first"}
    lab.wait_for("the killed delivery to end", lambda: absorbed(lab, job) or logged(
        lab, rf"{re.escape(CLAIM_JOB)}\[{first}\] succeeded before the worker was lost") == 1, timeout=45)
    killed, survivor = runs(lab, job)
    assert killed != survivor and audits(lab, job) == 1


def test_another_payload_waiting_on_a_killed_run_takes_the_key_and_the_redelivery_conflicts(
        lab: Scenario, job: str):
    # Given a job whose first run holds the claim, and the key sent with another payload meanwhile
    # When the pool process of the first run is SIGKILLed
    first, second = race(lab, job, "succeed", "second", crash=True)
    # Then the other payload claims the key; the redelivered first message is a conflict
    assert outcome(lab, second) == {"job_id": job, "note": "second"}
    assert is_error(outcome(lab, first), CONFLICT)
    assert len(runs(lab, job)) == 2 and audits(lab, job) == 1


# ---- dispatch on redelivery (issue 17, defect 9) -------------------------------------------------
def test_a_command_killed_between_commit_and_publish_has_its_event_published_by_the_redelivery(
        lab: Scenario, job: str):
    # Given a worker with no relay and no beat
    # When a command that publishes an event commits, and its pool process dies in the
    # hand-off to the publisher
    task_id = lab.client.delay(CLAIM_JOB, job_id=job, hold=0, announce=True, crash_before_publish=True)
    # Then its message is redelivered, finds the execution committed, and publishes the
    # event it left in the outbox: both subscribers get it, once
    assert outcome(lab, task_id) == {"job_id": job, "note": ""}
    lab.wait_for("both subscribers", lambda: audits(lab, job, "announced-a") == audits(lab, job, "announced-b") == 1,
                 timeout=30)
    assert list((lab.home / "claims").glob("crashed.*")), "no pool process died in the hand-off"
    assert logged(lab, rf"its execution {task_id} left 1 outbox row\(s\) unpublished; publishing them now") == 1, \
        "the event was not published by the redelivery"
    assert len(runs(lab, job)) == 1 and audits(lab, job) == 1
    assert lab.rows("SELECT count(*) FROM bus_outbox WHERE causation_id = :m AND published_at IS NULL",
                    m=task_id) == [(0,)]


def redelivery_sends_what_the_killed_subscriber_left(lab: Scenario, job: str) -> None:
    # Given a worker with no relay and no beat
    # When a subscriber that sends a command commits, and its pool process dies in the hand-off
    task_id = lab.client.delay(CLAIM_JOB, job_id=job, hold=0, announce=True, crash_subscriber=True)
    # Then its copy of the event is redelivered, finds its inbox claim committed, and sends
    # the command it left in the outbox; the command runs once, the subscribers ran once each
    lab.wait_for("the follow-up command", lambda: audits(lab, f"{job}-follow-up", "follow-up") == 1, timeout=30)
    assert audits(lab, job, "announced-a") == 1 and audits(lab, job, "announced-b") == 1
    assert list((lab.home / "claims").glob("crashed.*")), "no pool process died in the hand-off"
    [(event_id,)] = lab.rows("SELECT id FROM bus_outbox WHERE causation_id = :m", m=task_id)
    assert logged(lab, rf"note_announced: its run of event {event_id} left 1 outbox row\(s\) unpublished") == 1, \
        "the command was not sent by the redelivery"


def test_a_subscriber_killed_between_commit_and_publish_has_its_command_sent_by_the_redelivery(
        lab: Scenario, job: str):
    redelivery_sends_what_the_killed_subscriber_left(lab, job)


def test_on_rabbitmq_a_subscriber_killed_between_commit_and_publish_has_its_command_sent_by_the_redelivery(
        rabbit_lab: Scenario, job: str):
    redelivery_sends_what_the_killed_subscriber_left(rabbit_lab, job)


# ---- purges during traffic (issue 17, defect 7) --------------------------------------------------
def test_keys_purged_while_duplicates_arrive_are_claimed_again_never_dead_lettered(lab: Scenario, job: str):
    # Given keys purged again and again (as `bus purge-keys --older-than 0s` does)
    stop, purged = threading.Event(), []

    def purge() -> None:
        while not stop.wait(0.01):
            purged.append(retention.purge_keys(lab.engine(), utcnow())["keys"])

    purger = threading.Thread(target=purge, daemon=True)
    purger.start()
    # When 240 deliveries of 4 keys arrive meanwhile
    try:
        ids = [i for n in range(4) for i in lab.client.burst(CLAIM_JOB, {"job_id": f"{job}-{n}", "hold": 0},
                                                               f"job_id={job}-{n}", TRAFFIC // 4)]

        def handled() -> int:
            return sum(logged(lab, rf"{re.escape(CLAIM_JOB)}\[{i}\] (succeeded in|raised|retry)")
                       for i in set(ids))
        lab.wait_for("every delivery handled", lambda: handled() >= TRAFFIC, timeout=90)
    finally:
        stop.set()
        purger.join(10)
    # Then every delivery ran or got the stored result: none failed, none was dead-lettered
    assert sum(purged) >= 1, "nothing was purged: the test proved nothing"
    if lab.database == "postgresql":  # SQLite cannot meet the race: the claim holds the write lock until commit
        assert logged(lab, "was purged after its claim found it; claiming it again") >= 1, \
            "no key was purged between a claim that found it and its read: the test proved nothing"
    assert sum(logged(lab, rf"{re.escape(CLAIM_JOB)}\[{i}\] (raised unexpected|retry)") for i in set(ids)) == 0
    assert [(r.reason, r.error) for r in lab.rows("SELECT reason, error, message_id FROM bus_dead_letters")
            if r.message_id in ids] == []
