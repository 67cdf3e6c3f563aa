"""`bus up`: what it plans to start, every refusal of bad input, and the runner on small children.

The runner is exercised here with plain Python children (no broker); the whole command
against Redis is tests/integration/test_up.py. Every process started here is stopped
by its PID, also when a test fails.
"""
from __future__ import annotations

import io
import os
import sys
import threading
import time

import pytest
from typer.testing import CliRunner

from project.cli.main import cli
from project.cli.up import Child, Runner, plan
from project.testing.isolation import alive

BOUNDARIES = ["billing", "bus", "orders"]


def bus_up(*args: str) -> tuple[int, str]:
    """`bus up ARGS` in-process; (exit code, its output with the error box's frame and wrapping removed)."""
    result = CliRunner().invoke(cli, ["up", *args])
    text = result.output.replace("│", " ").replace("╭", " ").replace("╰", " ").replace("─", " ")
    return result.exit_code, " ".join(text.split())


# ---- bad input: exit 2, saying how to fix it, before anything starts ----------------------
@pytest.mark.parametrize("args, says", [
    (["--only", "orders,warehouse"], "unknown boundary 'warehouse'; choose from accounts, audit, billing, bus, "
                                     "fulfilment, inventory, notifications, orders, shipping (comma-separated, "
                                     "e.g. --only orders,billing)"),
    (["--only", " , "], "no boundary given; choose from"),
    (["--concurrency", "0"], "'0' is not a number of pool processes; give a whole number ≥ 1 (e.g. --concurrency 2)"),
    (["--concurrency", "two"], "'two' is not a number of pool processes; give a whole number ≥ 1"),
    (["-c", "-3"], "'-3' is not a number of pool processes"),
    (["--api-port", "0"], "--api-port"),
    (["--flower-port", "70000"], "--flower-port"),
])
def test_bad_input_exits_2_and_names_the_fix(args, says, tmp_path, monkeypatch):
    # Given a bus home nobody uses
    monkeypatch.setenv("BUS_HOME", str(tmp_path))
    # When `bus up` gets a bad value
    code, output = bus_up(*args)
    # Then it refuses with status 2 and says what to give instead
    assert code == 2, output
    assert says in output
    # And it started nothing: no embedded broker, no database
    assert not (tmp_path / "redis.pid").exists() and not (tmp_path / "bus.db").exists()


# ---- the plan -----------------------------------------------------------------------------
def names(the_plan) -> list[str]:
    return [child.name for child in the_plan.children]


def test_a_worker_per_boundary_beat_flower_and_api_when_all_are_available(tmp_path):
    # Given Flower credentials and a CLI that has `bus api`
    # When the plan is made
    the_plan = plan(BOUNDARIES, home=tmp_path, concurrency=3, flower_auth="dev:pw", flower_port=5601,
                    api_command=["bus"], api_port=8100)
    # Then there is a worker per boundary with the concurrency, beat, flower and the API, nothing skipped
    assert names(the_plan) == ["worker.billing", "worker.bus", "worker.orders", "beat", "flower", "api"]
    worker = the_plan.children[0].argv
    assert worker[worker.index("worker"):] == ["worker", "--boundary", "billing", "-c", "3", "-n", "billing@%h",
                                               "-l", "info"]
    assert the_plan.children[3].argv[-2:] == ["-s", str(tmp_path / "celerybeat-schedule")]
    assert the_plan.children[4].argv[-1] == "--port=5601"
    assert the_plan.children[5].argv == ["bus", "api", "--port", "8100"]
    assert the_plan.skipped == []


def test_flower_without_credentials_is_skipped_with_a_hint(tmp_path):
    # Given no FLOWER_BASIC_AUTH
    the_plan = plan(BOUNDARIES, home=tmp_path, flower_auth=" ", api_command=["bus"])
    # Then Flower is not started, and the hint names the variable and --no-flower
    assert "flower" not in names(the_plan)
    assert the_plan.skipped == ["flower skipped: Flower refuses to start without authentication; set "
                                "FLOWER_BASIC_AUTH=user:password to run it here, or pass --no-flower to silence this"]


def test_api_without_its_extra_is_skipped_saying_why(tmp_path):
    # Given the [api] extra is not importable
    the_plan = plan(BOUNDARIES, home=tmp_path, flower=False, api_command=["bus"],
                    api_missing="the [api] extra is not installed (uvicorn missing): pip install 'celery-bus[api]'")
    # Then the API is not started and the reason is printed
    assert "api" not in names(the_plan)
    assert the_plan.skipped == ["api skipped: the [api] extra is not installed (uvicorn missing): "
                                "pip install 'celery-bus[api]'"]


def test_no_flags_leave_processes_out_silently(tmp_path):
    # When beat, Flower and the API are switched off
    the_plan = plan(["orders"], home=tmp_path, beat=False, flower=False, api=False)
    # Then only the worker remains, and nothing is reported as skipped
    assert names(the_plan) == ["worker.orders"] and the_plan.skipped == []


# ---- the runner ---------------------------------------------------------------------------
def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


SLEEPER = python("import time; print('up and ' + 'waiting', flush=True); time.sleep(60)")


@pytest.fixture
def runners():
    """Runners a test makes; whatever they started is stopped (by PID) at teardown."""
    made: list[Runner] = []
    yield made
    for runner in made:
        runner.grace = 1.0
        runner.stop()


def wait_for_output(stream: io.StringIO, text: str, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stream.getvalue().count(text) >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not printed {count} times:\n{stream.getvalue()}")


def test_a_stop_request_stops_every_child_and_exits_0(runners):
    # Given two children, one of which ignores SIGTERM (it is killed after the grace period)
    stubborn = python("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                      "print('up and ' + 'waiting', flush=True); time.sleep(60)")
    out = io.StringIO()
    runner = Runner([Child("calm", SLEEPER), Child("stubborn", stubborn)], stream=out, grace=1.0)
    runners.append(runner)
    done: list[int] = []
    thread = threading.Thread(target=lambda: done.append(runner.run()))
    thread.start()
    try:
        wait_for_output(out, "up and waiting", 2)
    finally:
        # When a stop is requested (what SIGINT and SIGTERM do)
        runner.request_stop()
        thread.join(20)
    # Then the runner returns 0, and both children are gone, by PID
    assert done == [0]
    pids = [r.process.pid for r in runner.running]
    assert len(pids) == 2 and not any(alive(pid) for pid in pids)
    # And every child's line carries its name
    lines = out.getvalue().splitlines()
    assert "calm     | up and waiting" in lines and "stubborn | up and waiting" in lines
    # And the one that ignored SIGTERM was killed after the grace period
    assert "up       | stubborn (pid %d) stopped, exit code -9" % pids[1] in lines


def test_a_child_exiting_on_its_own_stops_the_others_and_is_named(runners):
    # Given a long-running child and one that fails after printing a line
    out = io.StringIO()
    runner = Runner([Child("steady", SLEEPER),
                     Child("fragile", python("import time; time.sleep(1); print('giving up'); raise SystemExit(3)"))],
                    stream=out, grace=5.0)
    runners.append(runner)
    # When the runner runs
    code = runner.run()
    # Then it returns 1 naming the child and its exit code, and the other child is gone too
    assert code == 1 and runner.failed.name == "fragile"
    assert "up      | fragile exited with code 3; stopping the others" in out.getvalue()
    assert "fragile | giving up" in out.getvalue()
    assert not alive(runner.running[0].process.pid)


def test_children_run_in_process_groups_of_their_own(runners):
    # Given a runner with one child
    runner = Runner([Child("alone", SLEEPER)], stream=io.StringIO(), grace=1.0)
    runners.append(runner)
    thread = threading.Thread(target=runner.run)
    thread.start()
    try:
        wait_for_output(runner.output.stream, "up and waiting", 1)
        # Then the child leads its own group (Ctrl-C at the terminal reaches the runner only)
        pid = runner.running[0].process.pid
        assert os.getpgid(pid) == pid != os.getpgid(0)
    finally:
        runner.request_stop()
        thread.join(20)


def test_the_command_line_has_bus_up():
    # Then `bus up --help` lists its switches
    code, output = bus_up("--help")
    assert code == 0
    assert all(option in output for option in ("--only", "--concurrency", "--no-flower", "--no-api", "--no-beat"))
