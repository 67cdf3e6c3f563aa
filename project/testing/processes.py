"""Real `celery worker` subprocesses, started and stopped by their PID.

Used by `bus demo` and by the test suite: a worker is started with its own node name,
awaited until it answers a ping, and stopped with SIGTERM to its main process (a warm
shutdown), SIGKILL to its process group after a grace period, never by name.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from celery import Celery


@dataclass
class WorkerProcess:
    """One `celery -A project worker` child process."""

    process: subprocess.Popen
    hostname: str
    logfile: Path
    env: dict[str, str] = field(repr=False, default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, app: Celery, timeout: float = 60.0) -> None:
        """Block until the worker answers a ping; raise with its log if it died or hangs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {self.hostname} exited with {self.process.returncode}:\n{self.log()}")
            if app.control.ping(destination=[self.hostname], timeout=0.5):
                return
        raise TimeoutError(f"worker {self.hostname} not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.logfile.read_text()[-4000:]
        except FileNotFoundError:
            return ""

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM the worker's main process (Celery's warm shutdown), SIGKILL its group after `grace` s; the exit code.

        Only the main process gets SIGTERM: it finishes and acks the tasks its pool runs,
        then stops the pool. A SIGTERM to the whole group would kill a pool process
        between a handler's commit and the ack, and hand the message back.
        """
        if self.process.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                _signal_group(self.pid, signal.SIGKILL)
                self.process.wait(5)
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children) at once."""
        _signal_group(self.pid, signal.SIGKILL)
        self.process.wait(10)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the worker leads its own group: its pool children get it too
    except ProcessLookupError:
        pass


def start_worker(*, env: Mapping[str, str] | None = None, boundaries: Sequence[str] = (),
                 queues: Sequence[str] = (), concurrency: int = 2, pool: str = "prefork",
                 logdir: Path, cwd: Path | None = None, name: str = "bus",
                 extra_args: Sequence[str] = ()) -> WorkerProcess:
    """Start `celery -A project worker` with its own node name and log file."""
    hostname = f"{name}-{uuid.uuid4().hex[:8]}@%h".replace("%h", os.uname().nodename)
    logdir.mkdir(parents=True, exist_ok=True)
    logfile = logdir / f"{hostname.split('@')[0]}.log"
    args = [sys.executable, "-m", "celery", "-A", "project", "worker", "-n", hostname,
            "-c", str(concurrency), "-P", pool, "-l", "info", "--without-mingle", "--without-gossip"]
    for boundary in boundaries:
        args += ["--boundary", boundary]
    if queues:
        args += ["-Q", ",".join(queues)]
    args += list(extra_args)
    full_env = {**os.environ, **(env or {})}
    with open(logfile, "wb") as out:
        process = subprocess.Popen(args, env=full_env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return WorkerProcess(process, hostname, logfile, dict(env or {}))
