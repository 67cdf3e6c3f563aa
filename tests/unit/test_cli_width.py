"""`bus` output piped to a file or another program is not cut nor wrapped; a terminal keeps its width.

rich lays a table out to the console's width, and a console that is not a terminal is 80
columns wide: `bus owners | grep orders` used to fold a long handler name onto the next
lines. Checked on a real pipe and on a real pseudo-terminal (`bus` subprocesses, stopped
by PID), and in process for `bus dlq list` and a refusal on stderr.
"""
from __future__ import annotations

import fcntl
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import time
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from project.cli.main import cli
from project.store import lease
from project.store.engine import dispose, engine_for
from project.store.migrate import upgrade
from project.store.tables import dead_letters
from tests.conftest import REPO

BUS = str(Path(sys.executable).with_name("bus"))
QUEUE = "orders.place_order"
#: with the queue, holder, three times and the state: far over 120 characters on one line
HANDLER = "handlers.orders.a_handler_whose_module_path_and_name_are_long_enough_to_overflow_eighty_columns_alone"


@pytest.fixture
def env(tmp_path: Path):
    """BUS_HOME and a migrated SQLite database where `HANDLER` holds the lease of orders.place_order; no COLUMNS."""
    url = f"sqlite:///{tmp_path}/bus.db"
    upgrade(url)
    lease.acquire(engine_for(url), f"owner:{QUEUE}", HANDLER, "worker-with-a-long-name@host.example.com",
                  timedelta(seconds=60))
    environ = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE")}
    yield {**environ, "BUS_DATABASE_URL": url, "BUS_HOME": str(tmp_path)}
    dispose(url)


def lines_naming(text: str, *names: str) -> list[str]:
    return [line for line in text.splitlines() if all(name in line for name in names)]


def test_a_piped_table_keeps_every_long_name_on_one_line(env):
    # Given an owner lease whose row is far wider than 80 columns
    # When `bus owners` writes into a pipe (not a terminal, no COLUMNS set)
    done = subprocess.run([BUS, "owners"], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL, text=True, timeout=60)
    # Then the queue, the whole handler and the holder are on one line, not folded
    assert done.returncode == 0, done.stderr
    [row] = lines_naming(done.stdout, QUEUE, HANDLER, "worker-with-a-long-name@host.example.com")
    assert len(row) > 120


def test_a_terminal_keeps_its_width(env):
    # Given a pseudo-terminal 100 columns wide
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    # When `bus owners` writes to it
    process = subprocess.Popen([BUS, "owners"], env=env, cwd=REPO, stdin=follower, stdout=follower,
                               stderr=follower, close_fds=True)
    os.close(follower)
    try:
        output = read_until_closed(leader, timeout=60)
        assert process.wait(timeout=10) == 0, output
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        os.close(leader)
    # Then the table fits the terminal: the long handler name is folded, no line is wider than 100
    text = output.decode()
    assert "owner lease(s)" in text and not lines_naming(text, HANDLER)
    assert max(len(line.rstrip()) for line in strip_ansi(text).splitlines()) <= 100


def read_until_closed(fd: int, timeout: float) -> bytes:
    """Everything written to the pseudo-terminal until its last writer closed it."""
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the other side is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def strip_ansi(text: str) -> str:
    import re
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "")


def test_a_piped_dead_letter_list_and_error_are_not_wrapped(env):
    # Given a dead letter of a long queue name with a long error
    queue = "a_boundary_with_a_long_name.a_subscriber_queue_whose_name_alone_takes_most_of_eighty_columns"
    error = "ConnectionError: the payment gateway at gateway.internal.example.com did not answer in 30 s"
    with engine_for(env["BUS_DATABASE_URL"]).begin() as conn:
        conn.execute(dead_letters.insert().values(message_id="m-1", task=queue, queue=queue, reason="retries-exhausted",
                                                  error=error, attempts=6, body=b"{}"))
    # When `bus dlq list` prints into a pipe (in process: CliRunner's output is not a terminal)
    env = {**env, "COLUMNS": None}
    listed = CliRunner().invoke(cli, ["dlq", "list"], env=env)
    # Then its row holds the whole queue name and error on one line
    assert listed.exit_code == 0, listed.output
    assert lines_naming(listed.output, queue, "retries-exhausted", error)
    # And a refusal on stderr is one line too
    unknown = f"{queue}.and_then_some_more_to_be_sure"
    refused = CliRunner().invoke(cli, ["owners", "release", unknown], env=env)
    assert refused.exit_code == 2
    assert lines_naming(refused.output, "error:", unknown, "known:", QUEUE)
