"""`bus up` as a developer runs it: the whole bus in one process tree on Redis, until Ctrl-C.

Its own Redis database number (project/testing/isolation.py, through the scenario), a SQLite
file and BUS_HOME under the test's tmp path. The runner and every child it started are
stopped by PID at the end, also when the test fails.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from project.testing.isolation import alive
from tests.conftest import REPO
from tests.integration.conftest import opened
from tests.integration.support.helpers import ITEMS_TOTAL, free_port, order

pytestmark = pytest.mark.integration
BUS = str(Path(sys.executable).with_name("bus"))
STARTED = re.compile(r"\| started (\S+) \(pid (\d+)\)")


class Up:
    """A running `bus up`: its process and every line it printed (read by a thread)."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen([BUS, "up", *args], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                        start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self.reader.start()

    def children(self) -> dict[str, int]:
        """{name: pid} of the children it said it started."""
        return {m[1]: int(m[2]) for m in map(STARTED.search, list(self.lines)) if m}

    def output(self) -> str:
        return "".join(self.lines[-150:])

    def wait_for(self, what: str, probe, timeout: float = 40.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"bus up exited with {self.process.returncode}:\n{self.output()}"
            value = probe()
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}:\n{self.output()}")

    def kill_everything(self) -> None:
        """Teardown: whatever is left of the runner and its children, by PID (process groups)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        for pid in self.children().values():
            if alive(pid):
                os.killpg(pid, signal.SIGKILL)


def answers(url: str, **options) -> int | None:
    try:
        return httpx.get(url, timeout=1, **options).status_code
    except httpx.TransportError:
        return None


def test_bus_up_runs_every_process_handles_a_command_and_ctrl_c_stops_them_all(tmp_path_factory, uid):
    with opened("redis", "sqlite", tmp_path_factory, "up") as scenario:
        # Given a Redis database and a SQLite file of this test's own, and Flower credentials
        api, flower = free_port(), free_port()
        env = {**os.environ, **scenario.env, "FLOWER_BASIC_AUTH": "dev:secret"}
        # When `bus up` starts
        up = Up(["--api-port", str(api), "--flower-port", str(flower)], env)
        try:
            # Then it starts a worker per boundary (the maintenance boundary too), beat, Flower and the API
            expected = {"worker.accounts", "worker.audit", "worker.billing", "worker.bus", "worker.fulfilment",
                        "worker.inventory", "worker.notifications", "worker.orders", "worker.shipping", "beat",
                        "flower", "api"}
            children = up.wait_for("every child to start",
                                   lambda: len(up.children()) == len(expected) and up.children(), timeout=60)
            assert set(children) == expected
            base = f"http://127.0.0.1:{api}"
            up.wait_for("the API", lambda: answers(f"{base}/openapi.json") == 200)
            # And an order posted to the API is handled by the orders worker
            posted = httpx.post(f"{base}/orders", json=order(f"o-{uid}"), timeout=10)
            assert posted.status_code == 202, posted.text
            state = up.wait_for("the order to succeed", lambda: (
                body := httpx.get(base + posted.headers["location"], timeout=5).json())["status"] != "pending"
                and body)
            assert (state["status"], state["result"]) == ("succeeded", {"order_id": f"o-{uid}", "total": ITEMS_TOTAL})
            # And its event reaches the subscribers in the billing and notifications workers
            up.wait_for("both subscribers of OrderPlaced", lambda: {r.subscriber for r in scenario.rows(
                "SELECT subscriber FROM bus_inbox")} >= {"billing.charge_payment",
                                                         "notifications.send_order_confirmation"})
            # And Flower serves with the credentials only
            up.wait_for("Flower", lambda: answers(f"http://127.0.0.1:{flower}/", auth=("dev", "secret")) == 200)
            assert answers(f"http://127.0.0.1:{flower}/") == 401
            # And every line is prefixed with the name of the child that printed it
            assert any(re.match(r"worker\.orders +\| .*orders\.place_order.*succeeded", line) for line in up.lines)

            # When the developer presses Ctrl-C
            up.process.send_signal(signal.SIGINT)
            code = up.process.wait(30)
            up.reader.join(5)

            # Then it exits 0, and every child (and its process group) is gone
            assert code == 0, up.output()
            assert [name for name, pid in children.items() if alive(pid)] == []
            for pid in children.values():
                with pytest.raises(ProcessLookupError):
                    os.killpg(pid, 0)
        finally:
            up.kill_everything()
