"""project/bench/child.py: the JSON-lines child that `bus bench` and the integration tests drive.

Each test starts a small Python child and stops it by its PID, also when the test fails.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from project.bench.child import ChildExited, ChildTimeout, LineChild
from project.testing.isolation import alive

ECHO = """
import json, sys
for line in sys.stdin:
    request = json.loads(line)
    if request["op"] == "exit":
        sys.stderr.write("leaving as asked\\n")
        sys.exit(3)
    if request["op"] == "silent":
        continue
    print(json.dumps({"value": request}), flush=True)
"""

DEAF = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: time.sleep(1)\n"


@pytest.fixture
def spawn(tmp_path: Path):
    started: list[LineChild] = []

    def start(source: str) -> LineChild:
        child = LineChild([sys.executable, "-c", source], env={}, cwd=tmp_path, logfile=tmp_path / "logs" / "c.log")
        started.append(child)
        return child

    yield start
    for child in started:
        if child.process.poll() is None:
            child.process.kill()
            child.process.wait(5)


def test_given_a_child_when_asked_then_its_reply_comes_back_as_sent(spawn) -> None:
    child = spawn(ECHO)

    child.request("ping", n=1)

    assert child.reply(timeout=30) == {"value": {"op": "ping", "n": 1}}


def test_given_a_silent_child_when_the_timeout_passes_then_it_says_so_with_its_log(spawn) -> None:
    child = spawn(ECHO)

    child.request("silent")

    with pytest.raises(ChildTimeout, match=r"gave no reply within 0.5s; log .*c\.log"):
        child.reply(timeout=0.5)
    assert not child.done()


def test_given_a_child_that_exits_when_a_reply_is_awaited_then_its_exit_code_and_log_are_shown(spawn) -> None:
    child = spawn(ECHO)

    child.request("exit")

    with pytest.raises(ChildExited, match=r"exited with 3(.|\n)*leaving as asked"):
        child.reply(timeout=30)


def test_given_a_child_that_ignores_its_input_ending_when_closed_then_its_process_group_is_killed(spawn) -> None:
    child = spawn(DEAF)

    child.close(grace=0.5)

    assert child.process.returncode is not None
    assert not alive(child.process.pid)
