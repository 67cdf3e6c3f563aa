"""Flower on a real bus (issue 7): `celery -A project flower` against Redis and a real worker.

Two Flower processes watch one worker from before the first message (the worker starts
with task events off, as shipped, and Flower turns them on): one with basic
authentication (FLOWER_BASIC_AUTH), read through its HTTP API, and one started with
`--unauthenticated` (local development), which headless Chromium photographs: Chromium
does not send credentials written in a URL to the page's own requests, and the
unauthenticated instance also shows that the flag passes Flower's option parser.

The screenshot goes to the test's temporary folder; with UPDATE_DOCS_SCREENSHOT=1 it is
also copied to docs/flower-tasks.png. Without Chromium the screenshot test is skipped
(it fails under CI=true, where .ci/run installs it).
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from tests.conftest import REPO
from tests.integration.conftest import opened
from tests.integration.support.bus_services import missing
from tests.integration.support.helpers import (
    PLACE_ORDER,
    REGISTER_USER,
    free_port,
    order,
)
from tests.integration.support.scenarios import Scenario

pytestmark = pytest.mark.e2e

USER, PASSWORD = "bus", "s3cret-for-tests"
CHARGE = "billing.charge_payment"
CONFIRM = "notifications.send_order_confirmation"
#: what a worker logs when a remote control (Flower's) turns its task events on
EVENTS_ENABLED = "Events of group {task} enabled by remote."
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


@dataclass
class Flower:
    process: subprocess.Popen
    port: int
    logfile: Path
    auth: tuple[str, str] | None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, auth: tuple[str, str] | None | str = "default", timeout: float = 10) -> tuple[int, Any]:
        """(status, JSON or text) of GET `path`, with this Flower's credentials unless `auth` says otherwise."""
        credentials = self.auth if auth == "default" else auth
        request = urllib.request.Request(self.base + path)
        if credentials:
            token = base64.b64encode(":".join(credentials).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read().decode()
                status = response.status
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode(errors="replace")
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)


def start_flower(scenario: Scenario, *args: str, env: dict[str, str] | None = None,
                 auth: tuple[str, str] | None = None) -> Flower:
    """`celery -A project flower` on a free loopback port, as its own process group."""
    port = free_port()
    logfile = scenario.logdir / f"flower-{port}.log"
    scenario.logdir.mkdir(parents=True, exist_ok=True)
    # Flower reads every FLOWER_* variable: only the test's own reach it
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    full_env.update({**scenario.env, **(env or {})})
    with open(logfile, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "project", "flower", f"--port={port}", "--address=127.0.0.1", *args],
            env=full_env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    return Flower(process, port, logfile, auth)


def wait_until(what: str, probe, flower: Flower, timeout: float = 40.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        if flower.process.poll() is not None:
            raise AssertionError(f"Flower exited with {flower.process.returncode} while waiting for {what}:\n"
                                 f"{flower.log()}")
        try:
            value = probe()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; Flower log:\n{flower.log()}")
        time.sleep(0.25)


def sees_worker(flower: Flower, hostname: str) -> bool:
    """Flower's event stream has a heartbeat of `hostname` (so no task event after this is missed)."""
    status, workers = flower.get("/workers?json=1")
    return status == 200 and isinstance(workers, dict) and bool(workers.get("data")) and any(
        w.get("hostname") == hostname and w.get("status") for w in workers["data"])


@pytest.fixture(scope="module")
def flowers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """A Redis bus with a worker, two Flowers watching it, and three commands sent once both watch."""
    with opened("redis", "sqlite", tmp_path_factory, "flower") as scenario:
        # (not the fulfilment flow's boundaries: its commands would fill the first page of Flower's tasks table)
        scenario.worker = scenario.start_worker(concurrency=2, name="flowered",
                                                boundaries=["orders,accounts,billing,notifications,audit"])
        secured = start_flower(scenario, env={"FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}"}, auth=(USER, PASSWORD))
        open_ = start_flower(scenario, "--unauthenticated")
        try:
            for flower in (secured, open_):
                wait_until("Flower to see the worker", lambda f=flower: sees_worker(f, scenario.worker.hostname), flower)
            # The worker starts without task events (BUS_TASK_EVENTS is off by default): Flower
            # turns them on by remote control within 5 s; what is sent after that is listed.
            wait_until("Flower to turn the worker's task events on",
                       lambda: EVENTS_ENABLED in scenario.worker.logfile.read_text(), secured)
            scenario.client = scenario.driver()
            run = uuid.uuid4().hex[:6]
            orders = [scenario.client.delay(PLACE_ORDER, idempotency_key=f"flower-{run}-{n}",
                                            **order(f"o-{run}-{n}", customer_id=f"c-{n}")) for n in range(2)]
            user = scenario.client.delay(REGISTER_USER, user_id=f"u-{run}", email=f"ada-{run}@example.com",
                                         name="Ada")
            yield SimpleNamespace(scenario=scenario, secured=secured, open=open_, orders=orders, user=user, run=run)
        finally:
            secured.stop()
            open_.stop()


def tasks_by_name(flower: Flower) -> dict[str, list[dict]]:
    status, tasks = flower.get("/api/tasks")
    assert status == 200, tasks
    found: dict[str, list[dict]] = {}
    for task_id, task in tasks.items():
        found.setdefault(task.get("name"), []).append({**task, "uuid": task_id})
    return found


def all_succeeded(flower: Flower) -> dict[str, list[dict]] | None:
    """Flower's tasks by name once both orders, the user and both order subscribers succeeded."""
    found = tasks_by_name(flower)
    done = [len([t for t in found.get(name, []) if t["state"] == "SUCCESS"])
            for name in (PLACE_ORDER, REGISTER_USER, CHARGE, CONFIRM)]
    return found if done == [2, 1, 2, 2] else None


def test_flower_api_lists_commands_and_subscribers_by_name_state_and_contract_fields(flowers):
    # Given two PlaceOrder and one RegisterUser sent while Flower (basic auth) watches
    flower = flowers.secured
    # When its HTTP API is read with the credentials, until every subscriber has run
    found = wait_until("the commands and their subscribers to succeed in Flower", lambda: all_succeeded(flower),
                       flower)

    # Then the commands are listed under their command names, by their message ids, as SUCCESS
    orders = {t["uuid"]: t for t in found[PLACE_ORDER]}
    assert set(orders) == set(flowers.orders)
    assert found[REGISTER_USER][0]["uuid"] == flowers.user
    # and their arguments are the contract's fields, not an opaque body
    for n, message_id in enumerate(flowers.orders):
        kwargs = orders[message_id]["kwargs"]
        assert f"'order_id': 'o-{flowers.run}-{n}'" in kwargs and f"'customer_id': 'c-{n}'" in kwargs, kwargs
    # and the events' subscribers appear under their own names, one run per order each
    assert {t["kwargs"].split("'order_id': '")[1].split("'")[0] for t in found[CHARGE]} == {
        f"o-{flowers.run}-0", f"o-{flowers.run}-1"}
    assert len({t["uuid"] for t in found[CONFIRM]}) == 2
    # and the events themselves are not shown as tasks that never run (PENDING forever)
    assert not [name for name in found if name.startswith("events.")], sorted(found)


def test_flower_refuses_requests_without_or_with_wrong_credentials(flowers):
    flower = flowers.secured
    # When the API or the task page is asked without credentials, or with a wrong password
    for path in ("/api/tasks", "/tasks", "/api/queues/length"):
        status, _ = flower.get(path, auth=None)
        # Then Flower answers 401
        assert status == 401, path
    assert flower.get("/api/tasks", auth=(USER, "wrong"))[0] == 401
    assert flower.get("/api/tasks")[0] == 200


def test_flower_reports_the_length_of_every_command_and_subscriber_queue_on_redis(flowers):
    # When Flower's queue lengths are read (its broker tab uses the same call)
    status, body = flowers.secured.get("/api/queues/length")
    # Then every queue the worker consumes is there with a count
    assert status == 200, body
    lengths = {q["name"]: q["messages"] for q in body["active_queues"]}
    assert {PLACE_ORDER, REGISTER_USER, CHARGE, CONFIRM} <= set(lengths), lengths
    assert all(isinstance(n, int) and n >= 0 for n in lengths.values())


def test_flower_without_credentials_refuses_to_start(tmp_path):
    # Given no FLOWER_BASIC_AUTH and no --unauthenticated
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    env.update(BUS_HOME=str(tmp_path), PYTHONPATH=str(REPO))
    # When `celery -A project flower` starts
    done = subprocess.run([sys.executable, "-m", "celery", "-A", "project", "flower", f"--port={free_port()}",
                           "--address=127.0.0.1"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    # Then it exits 1 before serving, saying how to give it credentials
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Flower refuses to start without authentication: set FLOWER_BASIC_AUTH=user:password" in done.stderr
    assert "Visit me at" not in done.stdout + done.stderr


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        missing("Chromium is not installed (apt-get install -y chromium); the Flower screenshot needs it")
    return found


def test_screenshot_of_the_tasks_page_shows_the_command_names(flowers, tmp_path):
    browser = chromium()
    flower = flowers.open
    # Given the commands succeeded (the authenticated Flower, fed by the same events, says so)
    wait_until("the commands to succeed", lambda: all_succeeded(flowers.secured), flowers.secured)
    url = f"{flower.base}/tasks"
    common = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1900,1000",
              "--virtual-time-budget=8000"]
    # When headless Chromium renders the tasks page (after its scripts loaded the task table)
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    shot = tmp_path / "flower-tasks.png"
    picture = subprocess.run([*common, f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120)
    # Then the rendered table holds the command and subscriber names, and the picture exists
    assert dom.returncode == 0, dom.stderr[-2000:]
    table = dom.stdout.split("<tbody", 1)[-1]
    assert PLACE_ORDER in table and REGISTER_USER in table and CHARGE in table, table[:2000]
    assert picture.returncode == 0 and shot.exists(), picture.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    if os.environ.get("UPDATE_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(shot, REPO / "docs" / "flower-tasks.png")
