"""A tasks module for the retry tests: handlers that fail a known number of times.

A worker loads it alone (BUS_TASK_MODULES=tests.integration.support.retry_tasks); it needs no
providers. Every retry waits exactly 1 s (no jitter): the shortest countdown every
broker publishes, and on quorum queues a real trip through RabbitMQ's delayed delivery.

- `retrylab.probe_retries` (command) publishes `RetryProbed`, which reaches two subscribers:
  `retrylab.recover_after_five` fails its first 5 attempts, then succeeds (policy: 6 retries);
  `retrylab.never_recover` always fails (policy: 4 retries, then the dead letter).
- `retrylab.flaky_job` (command) raises ConnectionError on its first `failures` attempts.
  Commands here retry transient errors 5 times (the default count, 1 s apart).

Every run of a handler leaves a marker file `<BUS_HOME>/retrylab/<id>/<handler>.<attempt>.<ns>`
first: the failed attempts roll their transaction back, the files stay.
"""
from __future__ import annotations

import time

from pydantic import Field

from project import bus
from project.contracts import Command, Event, EventSink, MessageContext
from project.messaging.retry import Backoff, transient_errors

RECOVERS_AFTER = 5
RECOVERING = Backoff(max_retries=6, base=1.0, cap=1.0, jitter=False)
GIVING_UP = Backoff(max_retries=4, base=1.0, cap=1.0, jitter=False)
# the bus's one command policy: the default count of retries, without the default's waiting
bus.command_policy = Backoff(max_retries=5, base=1.0, cap=1.0, jitter=False, retry_on=transient_errors())


class ProbeRetries(Command, boundary="retrylab", natural_key=("probe_id",)):
    """Publish a RetryProbed event for the subscribers below."""

    probe_id: str = Field(min_length=1)


class RetryProbed(Event, boundary="retrylab"):
    probe_id: str


class FlakyJob(Command, boundary="retrylab", natural_key=("job_id",)):
    """A job whose first `failures` attempts hit a broken connection."""

    job_id: str = Field(min_length=1)
    failures: int = Field(ge=0)


def mark(run_id: str, context: MessageContext) -> None:
    """Leave the marker file of this run (see the module docstring)."""
    marks = bus.settings.home / "retrylab" / run_id
    marks.mkdir(parents=True, exist_ok=True)
    (marks / f"{context.handler}.{context.attempt}.{time.time_ns()}").touch()


def probe_retries(cmd: ProbeRetries, *, events: EventSink) -> dict:
    events.publish(RetryProbed(probe_id=cmd.probe_id))
    return {"probe_id": cmd.probe_id}


def recover_after_five(event: RetryProbed, *, context: MessageContext) -> None:
    mark(event.probe_id, context)
    if context.attempt < RECOVERS_AFTER:
        raise ConnectionError(f"attempt {context.attempt + 1} of {event.probe_id} fails (test)")


def never_recover(event: RetryProbed, *, context: MessageContext) -> None:
    mark(event.probe_id, context)
    raise ConnectionError(f"attempt {context.attempt + 1} of {event.probe_id} fails, as every one does (test)")


def flaky_job(cmd: FlakyJob, *, context: MessageContext) -> dict:
    mark(cmd.job_id, context)
    if context.attempt < cmd.failures:
        raise ConnectionError(f"attempt {context.attempt + 1} of {cmd.job_id}: connection reset (test)")
    return {"job_id": cmd.job_id, "attempts": context.attempt + 1}


probe_retries_task = bus.command(ProbeRetries)(probe_retries)
flaky_job_task = bus.command(FlakyJob)(flaky_job)
recover_after_five_task = bus.subscriber(RetryProbed, boundary="retrylab", retry=RECOVERING)(recover_after_five)
never_recover_task = bus.subscriber(RetryProbed, boundary="retrylab", retry=GIVING_UP)(never_recover)
