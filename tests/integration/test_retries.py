"""Retries up to and past the policy's limit, with real workers (issue 17, defects 1 and 3).

The bus's retry policy is the only cap on retries, on Redis, RabbitMQ and RabbitMQ with
quorum queues (where a command's retry goes through RabbitMQ's delayed delivery to its
own queue): a subscriber retries past Celery's default of three and succeeds, or is
dead-lettered once when its policy gives up; a command's transient failures are retried
until it succeeds. The handlers are in tests/integration/support/retry_tasks.py; every retry
there waits 1 s.
"""
from __future__ import annotations

import json
import time
from typing import Any, Iterator

import pytest

from project.transport.dispatch import copy_task_id
from tests.integration.conftest import opened
from tests.integration.support.scenarios import Scenario

pytestmark = pytest.mark.integration

MODULES = "tests.integration.support.retry_tasks"
PROBE, FLAKY = "retrylab.probe_retries", "retrylab.flaky_job"
RECOVERING, GIVING_UP = "retrylab.recover_after_five", "retrylab.never_recover"
#: seconds to wait, after the expected outcome, for runs that must not come
SETTLE = 2.5


@pytest.fixture(scope="module", params=["redis", "amqp", "amqp-quorum"])
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    """A worker (2 processes) serving retry_tasks only, and a driver, on one broker."""
    with opened(request.param, "sqlite", tmp_path_factory, "retries") as scenario:
        scenario.env["BUS_TASK_MODULES"] = MODULES
        scenario.worker = scenario.start_worker(concurrency=2, name="retries")
        scenario.client = scenario.driver()
        yield scenario


def runs(scenario: Scenario, run_id: str, task: str) -> list[int]:
    """The attempt numbers (0-based) of the runs of `task` for `run_id`, from its marker files."""
    marks = scenario.home / "retrylab" / run_id
    found = [p.name.rsplit(".", 2) for p in marks.glob(f"{task}.*")] if marks.exists() else []
    return sorted(int(attempt) for _, attempt, _ in found)


def execution(scenario: Scenario, message_id: str, task: str) -> tuple | None:
    """(state, attempts) of `task`'s execution log row for `message_id`."""
    rows = scenario.rows("SELECT state, attempts FROM bus_executions WHERE message_id = :m AND task = :t",
                         m=message_id, t=task)
    return tuple(rows[0]) if rows else None


def test_a_subscriber_retries_past_three_and_is_dead_lettered_once_when_its_policy_gives_up(
        lab: Scenario, uid: str):
    # Given two subscribers of RetryProbed: one fails 5 times and allows 6 retries, the
    # other always fails and allows 4
    scenario, client = lab, lab.client
    probe = f"p-{uid}"

    # When the event is published
    sent = client.delay(PROBE, probe_id=probe)
    client.get(sent)
    [event] = scenario.rows("SELECT id FROM bus_outbox WHERE causation_id = :c", c=sent)
    recovering, giving_up = copy_task_id(event.id, RECOVERING), copy_task_id(event.id, GIVING_UP)

    # Then the first runs 6 times and succeeds on its 6th attempt
    scenario.wait_for("the 6th attempt to succeed",
                      lambda: execution(scenario, recovering, RECOVERING) == ("succeeded", 6), timeout=40)
    assert scenario.rows("SELECT subscriber FROM bus_inbox WHERE event_id = :e AND subscriber = :s",
                         e=event.id, s=RECOVERING)
    # ... and the second runs 1 + 4 times and leaves exactly one dead letter, retries-exhausted
    scenario.wait_for("the dead letter", lambda: scenario.rows(
        "SELECT id FROM bus_dead_letters WHERE message_id = :m", m=giving_up), timeout=40)
    time.sleep(SETTLE)
    assert runs(scenario, probe, RECOVERING) == [0, 1, 2, 3, 4, 5]
    assert runs(scenario, probe, GIVING_UP) == [0, 1, 2, 3, 4]
    letters = scenario.rows("SELECT task, reason, error FROM bus_dead_letters WHERE message_id = :m", m=giving_up)
    assert [(task, reason) for task, reason, _ in letters] == [(GIVING_UP, "retries-exhausted")]
    assert "(after 5 attempt(s))" in letters[0].error
    # ... and its execution log and `bus trace` say dead-lettered, not retrying
    assert execution(scenario, giving_up, GIVING_UP) == ("dead-lettered", 5)
    done = scenario.bus("trace", sent, "--json")
    assert done.returncode == 0, done.stderr
    subscriber_runs = {step["name"]: (step["state"], step["attempts"])
                       for step in steps(json.loads(done.stdout)) if step["kind"] == "run"}
    assert subscriber_runs == {RECOVERING: ("succeeded", 6), GIVING_UP: ("dead-lettered", 5)}


def test_a_command_retries_transient_errors_past_three_until_it_succeeds(lab: Scenario, uid: str):
    # Given a command whose handler hits a broken connection on its first 4 attempts
    # (commands retry transient errors 5 times)
    client = lab.client
    job = f"j-{uid}"

    # When it is sent and the caller waits for its result
    sent = client.delay(FLAKY, job_id=job, failures=4)
    result = client.get(sent, timeout=40)

    # Then the 5th attempt's result comes back, after exactly 5 runs
    assert result == {"job_id": job, "attempts": 5}
    time.sleep(SETTLE)
    assert runs(lab, job, FLAKY) == [0, 1, 2, 3, 4]
    assert lab.rows("SELECT id FROM bus_dead_letters WHERE message_id = :m", m=sent) == []
    assert execution(lab, sent, FLAKY) == ("succeeded", 5)


def test_a_command_whose_first_attempt_fails_is_retried_on_its_own_queue(lab: Scenario, uid: str):
    # Given a command whose first attempt hits a broken connection (on quorum queues its
    # retry is a delayed message that must come back to the command's queue)
    client = lab.client
    job = f"once-{uid}"

    # When it is sent and the caller waits for its result
    sent = client.delay(FLAKY, job_id=job, failures=1)
    result = client.get(sent, timeout=30)

    # Then the retry ran and its result came back; nothing was dead-lettered
    assert result == {"job_id": job, "attempts": 2}
    assert runs(lab, job, FLAKY) == [0, 1]
    # ... through the queue's own exchange, which Celery can delay natively on quorum queues
    assert "Direct exchanges are not supported" not in lab.worker.logfile.read_text()
    assert lab.rows("SELECT id FROM bus_dead_letters WHERE message_id = :m", m=sent) == []


def steps(node: Any) -> Iterator[dict]:
    """Every step of a `bus trace --json` tree (a dict with `kind`, `name` and `state`)."""
    if isinstance(node, dict):
        if {"kind", "name", "state"} <= node.keys():
            yield node
        for value in node.values():
            yield from steps(value)
    elif isinstance(node, list):
        for item in node:
            yield from steps(item)

