"""A tasks module for the claim tests (tests/integration/test_claims.py): a command that races its duplicates.

A worker loads it on its own: BUS_TASK_MODULES=tests.integration.support.claim_tasks.

`claimlab.claim_job` audits the job (its effect), then ends as `outcome` says: it
returns, refuses (`JobRefused`, a domain error) or, on its first run only, fails with a
transient `ConnectionError`. Every run leaves a marker file
`<BUS_HOME>/claims/<job id>.<pid>.<time ns>` first: it tells the test which pool process
runs the job and how many times the handler ran. The FIRST run of a job then holds its
transaction open until the test creates `<BUS_HOME>/claims/<job id>.release` (or `hold`
seconds pass), so a duplicate sent meanwhile meets the claim; a test can also SIGKILL it.

Dispatch on redelivery: with `announce`, the handler publishes `JobAnnounced`, which two
subscribers audit. With `crash_before_publish` (or, for the first subscriber, the event's
`crash_subscriber`), the pool process kills itself after the commit, in the hand-off to
the publisher: the worker's `bus.publisher` is wrapped here (`CrashBeforePublish`).
"""
from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from project import bus
from project.contracts import Command, DomainError, Event
from project.messaging.outbox import Publisher
from project.messaging.retry import Backoff
from tasks import wiring  # noqa: F401  (providers: audit)

logger = logging.getLogger(__name__)


class JobRefused(DomainError):
    """The job's business rule refused it."""


class ClaimJob(Command, boundary="claimlab", natural_key=("job_id",)):
    """Run a job once per key; how it ends is part of the message."""

    job_id: str = Field(min_length=1)
    outcome: Literal["succeed", "refuse", "fail-first"] = "succeed"
    hold: float = Field(30.0, ge=0, le=60)  # longest wait for the release file, first run only
    note: str = ""  # another note, same job: same key, another payload
    announce: bool = False
    crash_before_publish: bool = False
    crash_subscriber: bool = False


class JobAnnounced(Event, boundary="claimlab"):
    job_id: str
    crash_subscriber: bool = False


class FollowUp(Command, boundary="claimlab", natural_key=("job_id",)):
    """What the first subscriber of JobAnnounced sends on (to see a subscriber's outbox dispatched)."""

    job_id: str


def marks() -> Path:
    path = bus.settings.home / "claims"
    path.mkdir(parents=True, exist_ok=True)
    return path


class CrashBeforePublish:
    """The worker's publisher, which SIGKILLs its process in the hand-off after a handler armed it."""

    armed = False

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher

    def publish(self, ids: list[str]) -> None:
        armed, CrashBeforePublish.armed = CrashBeforePublish.armed, False
        if ids and armed:
            (marks() / f"crashed.{os.getpid()}.{time.time_ns()}").touch()
            os.kill(os.getpid(), signal.SIGKILL)
        self.publisher.publish(ids)


def _run_mark(job_id: str) -> int:
    """Leave this run's marker; the number of runs of `job_id` so far (this one included)."""
    (marks() / f"{job_id}.{os.getpid()}.{time.time_ns()}").touch()
    return len([p for p in marks().glob(f"{job_id}.*") if p.suffix != ".release"])


def claim_job(cmd: ClaimJob, *, audit, events) -> dict:
    """Audit the job; hold the first run; end as `outcome` says."""
    runs = _run_mark(cmd.job_id)
    audit.record("claim-job", cmd.job_id)
    if runs == 1:
        release, deadline = marks() / f"{cmd.job_id}.release", time.monotonic() + cmd.hold
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    if cmd.outcome == "refuse":
        raise JobRefused(f"job {cmd.job_id} is refused (note {cmd.note!r})")
    if cmd.outcome == "fail-first" and runs == 1:
        raise ConnectionError(f"job {cmd.job_id}: the first run loses its connection")
    if cmd.announce:
        events.publish(JobAnnounced(job_id=cmd.job_id, crash_subscriber=cmd.crash_subscriber))
    CrashBeforePublish.armed = cmd.crash_before_publish
    return {"job_id": cmd.job_id, "note": cmd.note}


def note_announced(event: JobAnnounced, *, audit, commands) -> None:
    """Audit the announcement; send the follow-up (and, if told, die in the hand-off)."""
    audit.record("announced-a", event.job_id)
    if event.crash_subscriber:
        commands.send(FollowUp(job_id=f"{event.job_id}-follow-up"))
        CrashBeforePublish.armed = True


def count_announced(event: JobAnnounced, *, audit) -> None:
    audit.record("announced-b", event.job_id)


def follow_up(cmd: FollowUp, *, audit) -> None:
    audit.record("follow-up", cmd.job_id)


#: the subscribers never fail here; a short policy fits the lab's short visibility timeout (test_claims.py)
QUICK = Backoff(max_retries=2, base=0.2, cap=0.5)
bus.publisher = CrashBeforePublish(bus.publisher)
claim_job_task = bus.command(ClaimJob)(claim_job)
follow_up_task = bus.command(FollowUp)(follow_up)
note_announced_task = bus.subscriber(JobAnnounced, boundary="claimnotes", retry=QUICK)(note_announced)
count_announced_task = bus.subscriber(JobAnnounced, boundary="claimcount", retry=QUICK)(count_announced)
