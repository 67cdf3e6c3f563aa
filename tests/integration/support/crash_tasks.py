"""A tasks module for the crash-safety tests: a command whose handler holds its transaction open.

A worker loads it next to the reference domain's modules:
BUS_TASK_MODULES=tasks.orders,...,tests.integration.support.crash_tasks. `crashlab.hold_job`
writes its effect (an audit entry) first, then holds the transaction open for `hold`
seconds before the bus commits it, so a test can kill the process, or cut the
database, while the effect is written but not committed. Each run leaves a marker file
`<BUS_HOME>/holds/<job id>.<pid>.<time ns>` first: it tells the test which pool process
runs the job, and how many times it started.
"""
from __future__ import annotations

import os
import time

from pydantic import Field

from project import bus
from project.contracts import Command
from tasks import wiring  # noqa: F401  (providers: audit)


class HoldJob(Command, boundary="crashlab", natural_key=("job_id",)):
    """Record that a job ran, holding the transaction open for a while."""

    job_id: str = Field(min_length=1)
    hold: float = Field(ge=0, le=60)


def hold_job(cmd: HoldJob, *, audit) -> dict:
    """Audit the job, then hold the transaction open `hold` seconds."""
    marks = bus.settings.home / "holds"
    marks.mkdir(parents=True, exist_ok=True)
    (marks / f"{cmd.job_id}.{os.getpid()}.{time.time_ns()}").touch()
    audit.record("hold-job", cmd.job_id)
    time.sleep(cmd.hold)
    return {"job_id": cmd.job_id, "pid": os.getpid()}


hold_job_task = bus.command(HoldJob)(hold_job)
