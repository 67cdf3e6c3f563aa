"""docs/your-service.md, followed literally: a service of one's own on the installed bus (issue 14).

The bus's wheel is built from a copy of this repository (the package alone, so that no
stale build/ leaks other top-level packages into it) and installed with its
dependencies into a fresh virtualenv outside the repository. The service's files are
the guide's blocks marked `# file: ...`, written to a folder of their own; the commands
are the guide's `sh` lines, run with that virtualenv first on PATH and nothing of this
repository on sys.path. A wrong file or command in the guide fails here.

Installing takes most of the time (about a minute, once per session); the worker runs on
a Redis database of its own with the service's SQLite file.
"""
from __future__ import annotations

import base64
import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from project.testing.isolation import claim_redis_db
from tests.conftest import REPO
from tests.e2e import guide
from tests.integration.support.bus_services import require
from tests.integration.support.helpers import free_port

pytestmark = pytest.mark.e2e

GUIDE = REPO / "docs" / "your-service.md"
#: what the environment of the test run must not pass on to the service's processes
FOREIGN = ("BUS_", "CELERY_", "FLOWER_", "PYTEST_", "PYTHONPATH", "VIRTUAL_ENV")


@dataclass(frozen=True)
class Service:
    """The guide's service, written to `root`, with the virtualenv the bus's wheel is installed in."""

    root: Path
    venv: Path
    text: str

    def env(self, **extra: str) -> dict[str, str]:
        """A shell with the virtualenv activated, and none of this test run's bus, Celery or pytest settings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN)}
        env.update(PATH=f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(self.venv), **extra)
        return env

    def run(self, line: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 120) -> str:
        """Run a command line as a shell would (no shell features); its stdout, or fail with its output."""
        args = shlex.split(line)
        done = subprocess.run([shutil.which(args[0], path=env["PATH"]) or args[0], *args[1:]], cwd=cwd or self.root,
                              env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, f"`{line}` exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    def start(self, line: str, env: dict[str, str], log: Path) -> subprocess.Popen:
        """Start a long-running command of the guide, in its own process group, its output in `log`."""
        args = shlex.split(line)
        with open(log, "wb") as out:
            return subprocess.Popen([str(self.venv / "bin" / args[0]), *args[1:]], cwd=self.root, env=env,
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)

    def rows(self, sql: str) -> list[tuple]:
        with sqlite3.connect(self.root / "inventory.db") as conn:
            return conn.execute(sql).fetchall()


def checked(command: subprocess.CompletedProcess) -> None:
    assert command.returncode == 0, f"{command.args} exited {command.returncode}:\n{command.stdout[-3000:]}\n" \
                                    f"{command.stderr[-3000:]}"


def build_and_install(workdir: Path) -> Path:
    """The bus's wheel, built from a clean copy of the package, installed with its dependencies in a new venv."""
    source = workdir / "source"
    shutil.copytree(REPO / "project", source / "project", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(REPO / name, source / name)
    pip = {"capture_output": True, "text": True, "timeout": 600}
    checked(subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(workdir / "dist"),
                            str(source)], **pip))
    [wheel] = (workdir / "dist").glob("celery_bus-*.whl")
    venv = workdir / "venv"
    checked(subprocess.run([sys.executable, "-m", "venv", str(venv)], **pip))
    # the guide's install line, with the wheel for the package index
    checked(subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{wheel}[flower]", "pytest"],
                           **pip))
    return venv


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Service:
    """The guide's files in a folder outside the repository, and a virtualenv with the bus's wheel."""
    venv = build_and_install(tmp_path_factory.mktemp("wheel"))
    root = tmp_path_factory.mktemp("your-service") / "inventory-service"
    text = GUIDE.read_text()
    guide.write(text, root)
    return Service(root, venv, text)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the main process (a warm shutdown), SIGKILL to its group after 15 s."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def wait_for(what: str, probe: Callable[[], Any], process: subprocess.Popen, log: Path, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode} while waiting for {what}:\n{log.read_text()[-3000:]}")
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.25)


@dataclass(frozen=True)
class Running:
    service: Service
    env: dict[str, str]
    hostname: str


@pytest.fixture(scope="module")
def running(service: Service) -> Iterator[Running]:
    """`bus db upgrade`, then the guide's worker, on a Redis database of its own and the service's SQLite file."""
    require("redis")
    cleanups: list[Callable[[], Any]] = []
    worker = None
    try:
        env = service.env(CELERY_BROKER_URL=f"redis://127.0.0.1:6379/{claim_redis_db(cleanups)}",
                          BUS_DATABASE_URL=f"sqlite:///{service.root}/inventory.db")
        upgrade, _ = guide.command(service.text, "bus db upgrade")
        assert f"and {service.root / 'migrations'}" in service.run(upgrade, env)  # the service's history too
        line, _ = guide.command(service.text, "celery -A project worker")
        hostname = f"inventory-{uuid.uuid4().hex[:8]}@{os.uname().nodename}"
        log = service.root / "worker.log"
        worker = service.start(f"{line} -n {hostname}", env, log)
        wait_for("the worker to be ready", lambda: f"{hostname} ready." in log.read_text(), worker, log)
        yield Running(service, env, hostname)
    finally:
        if worker is not None:
            stop(worker)
        for step in reversed(cleanups):
            step()


def test_the_layout_of_the_guide_lists_the_files_it_gives():
    # Given the guide's layout tree and its blocks marked `# file: ...`
    text = GUIDE.read_text()
    # Then they name the same files
    assert guide.layout(text) == set(guide.files(text))


def test_the_bus_comes_from_the_wheel_and_the_contracts_need_neither_celery_nor_sqlalchemy(service):
    # When the service's folder imports the bus and, in another process, the contracts alone
    where = service.run('python -c "import project; print(project.__file__)"', service.env())
    loaded = service.run('python -c "import sys, inventory.contracts; print(sorted({\'celery\', \'sqlalchemy\', '
                         '\'kombu\'} & set(sys.modules)))"', service.env())
    # Then the bus is the installed one, and the contracts loaded no Celery, kombu or SQLAlchemy
    assert Path(where.strip()).is_relative_to(service.venv), where
    assert loaded.strip() == "[]"


def test_a_command_sent_twice_with_one_key_runs_its_handler_once(running):
    service = running.service
    # When the guide's try_it.py sends one delivery twice with the same idempotency key
    line, expected = guide.command(service.text, "python try_it.py")
    printed = service.run(line, running.env)
    # Then both results agree, as the guide says, and the handler ran once: one row, 3 on hand
    assert printed.strip() == expected
    assert service.rows("SELECT sku, on_hand FROM inventory_stock WHERE sku = 'book'") == [("book", 3)]


def test_another_service_sends_with_the_contracts_alone_and_purchasing_gets_the_event(running, tmp_path):
    service = running.service
    # Given another service's folder: no celeryconfig.py, no tasks modules, the contracts importable
    sender = ("from project import bus\n"
              "from inventory.contracts import ReceiveStock, ReserveStock\n"
              "print(bus.send(ReceiveStock(delivery_id='d-200', sku='pen', quantity=6)).get(timeout=30))\n"
              "print(bus.send(ReserveStock(order_id='o-200', sku='pen', quantity=4)).get(timeout=30))\n")
    (tmp_path / "send.py").write_text(sender)
    # When it receives 6 pens and reserves 4 through bus.send
    printed = service.run("python send.py", {**running.env, "PYTHONPATH": str(service.root)}, cwd=tmp_path)
    # Then each command's result comes back, and the StockRanLow event reaches purchasing's subscriber
    assert printed.split("\n")[:2] == ["{'sku': 'pen', 'on_hand': 6}", "{'sku': 'pen', 'on_hand': 2}"]
    deadline = time.monotonic() + 30
    while not (ordered := service.rows("SELECT sku, quantity FROM purchasing_orders WHERE sku = 'pen'")):
        assert time.monotonic() < deadline, (service.root / "worker.log").read_text()[-3000:]
        time.sleep(0.25)
    assert ordered == [("pen", 20)]


def http_get(url: str, auth: tuple[str, str] | None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, ""


def test_flower_started_as_the_guide_says_asks_for_credentials_and_sees_the_worker(running):
    service = running.service
    # Given the guide's Flower command, on a free port
    line, _ = guide.command(service.text, "FLOWER_BASIC_AUTH=")
    assignment, command = line.split(" ", 1)
    user, password = assignment.split("=", 1)[1].split(":")
    port = free_port()
    log = service.root / "flower.log"
    flower = service.start(command.replace("--port=5555", f"--port={port} --address=127.0.0.1"),
                           {**running.env, "FLOWER_BASIC_AUTH": f"{user}:{password}"}, log)
    try:
        base = f"http://127.0.0.1:{port}"
        # When its API is asked without and with the credentials
        wait_for("Flower to answer", lambda: http_get(f"{base}/api/workers", None)[0], flower, log)
        anonymous, _ = http_get(f"{base}/api/workers", None)

        def workers() -> tuple[int, str] | None:
            got = http_get(f"{base}/api/workers?refresh=1", (user, password))
            return got if running.hostname in got[1] else None
        status, _ = wait_for("Flower to list the worker", workers, flower, log)
        # Then it refuses the first and lists the service's worker to the second
        assert anonymous == 401
        assert status == 200
    finally:
        stop(flower)


def test_the_service_own_tests_pass_with_the_bus_pytest_plugin(service):
    # When the guide's pytest runs in the service's folder (no broker, no database configured)
    line, expected = guide.command(service.text, "pytest")
    printed = service.run(line, service.env())
    # Then the guide's tests pass, on the bus_harness fixture of the installed plugin
    tests = service.root / "tests" / "test_inventory.py"
    assert expected == f"{tests.read_text().count('def test_')} passed"
    assert f" {expected} in " in printed, printed
