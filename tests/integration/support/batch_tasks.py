"""A tasks module for the batching tests (tests/integration/test_batching.py).

A worker loads it next to the shop's wiring (audit provider):
BUS_TASK_MODULES=tests.integration.support.batch_tasks. `batchlab.note` audits its job
(the effect), fails its first `fail_first` attempts with a transient error (retried 1 s
later), then holds `hold` seconds before it returns. With `crash_after_commit` it publishes
`NoteAnnounced`, and its pool process is SIGKILLed in the hand-off of that event to the
publisher: after its batch's COMMIT, before any of the batch is acked (`CrashInHandOff`
wraps the worker's publisher; a `crashed.<pid>.<ns>` marker says it happened). Every run leaves a marker file
`<BUS_HOME>/batchlab/<job>.<attempt>.<pid>.<batch>.<ns>` first, where <batch> tells the
batch it ran in apart (`<pid>.<batch>` is unique; 0: not in a batch).
"""
from __future__ import annotations

import os
import signal
import time

from pydantic import Field

from project import bus
from project.contracts import Command, Event, EventSink, MessageContext
from project.messaging.retry import Backoff, transient_errors
from project.store import batch
from tasks import wiring  # noqa: F401  (providers: audit)

bus.command_policy = Backoff(max_retries=5, base=1.0, cap=1.0, jitter=False, retry_on=transient_errors())


class CrashInHandOff:
    """The worker's publisher, which SIGKILLs its process in the hand-off after a handler armed it."""

    armed = False

    def __init__(self, publisher) -> None:
        self.publisher = publisher

    def publish(self, ids: list[str]) -> None:
        if ids and CrashInHandOff.armed:
            (marks() / f"crashed.{os.getpid()}.{time.time_ns()}").touch()
            os.kill(os.getpid(), signal.SIGKILL)
        self.publisher.publish(ids)


def marks():
    path = bus.settings.home / "batchlab"
    path.mkdir(parents=True, exist_ok=True)
    return path


class Note(Command, boundary="batchlab", natural_key=("job_id",)):
    """Audit a job once."""

    job_id: str = Field(min_length=1)
    fail_first: int = Field(default=0, ge=0)
    hold: float = Field(default=0.0, ge=0, le=60)
    crash_after_commit: bool = False


class NoteAnnounced(Event, boundary="batchlab"):
    job_id: str


def note(cmd: Note, *, audit, events: EventSink, context: MessageContext) -> dict:
    running = batch.current()
    serial = running.serial if running is not None else 0
    (marks() / f"{cmd.job_id}.{context.attempt}.{os.getpid()}.{serial}.{time.time_ns()}").touch()
    audit.record("note", cmd.job_id)
    if context.attempt < cmd.fail_first:
        raise ConnectionError(f"{cmd.job_id}: attempt {context.attempt} meets a broken connection")
    time.sleep(cmd.hold)
    if cmd.crash_after_commit:
        events.publish(NoteAnnounced(job_id=cmd.job_id))
        CrashInHandOff.armed = True
    return {"job_id": cmd.job_id, "attempt": context.attempt}


bus.publisher = CrashInHandOff(bus.publisher)
note_task = bus.command(Note)(note)
