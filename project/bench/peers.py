"""`bus bench --peers`: the same no-op work and fan-out on dramatiq and FastStream, beside bare Celery and the bus.

After the bare and bus phases of a run, on the same broker server, each peer gets a
broker namespace of its own per worker group (project/testing/isolation.py: an empty Redis
database number, or a RabbitMQ vhost; on the embedded broker a database number of the
run's own server, flushed after use), and is measured exactly as bare Celery is:
- a real worker of the peer, started by its own CLI
  (`dramatiq project.bench.peer_dramatiq`, `faststream run project.bench.peer_faststream:app`);
- a sending process (project/bench/peer_sender.py) that sends N messages as fast as one
  thread can, with the same requests and repeats as the Celery sides (project/bench/phases.py);
- throughput from the first send to the last completion as the worker saw it
  (project/bench/peer_probe.py, the counterpart of project/bench/probe.py);
- fan-out: FastStream's K subscribers of one message (a RabbitMQ fanout exchange bound
  to K durable queues; on Redis a stream read by K consumer groups). dramatiq has no
  fan-out (a message goes to one actor): not measured, and the report says so.

Concurrency is matched with the Celery workers' (`--pool prefork --concurrency C`: C
processes, each handling one message at a time): dramatiq `--processes C --threads 1`,
FastStream `--workers C` (C processes, an asyncio event loop each, async no-op handlers);
`--pool solo` is C=1. Prefetch is each library's default for that concurrency and is
recorded in the report, as are the delivery settings: every side acks after the
handler and sends persistent messages, with publisher confirms where the bus and bare
Celery use them (RabbitMQ: project/config.py's confirm_publish). The bench's --loglevel goes
to every worker: at `info` Celery and FastStream log each message, dramatiq does not.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import typer
from rich.console import Console
from rich.table import Table

from project.bench import cpu
from project.bench import peer_probe as bench_peer_probe
from project.bench.common import BenchError, Options, fmt, load_average, median, ratio
from project.bench.installation import Sender
from project.bench.phases import Bench
from project.testing import isolation
from project.testing.processes import WorkerProcess

PEERS = ("dramatiq", "faststream")
TITLES = {"dramatiq": "dramatiq", "faststream": "FastStream"}
#: the pools whose concurrency a peer can match (C processes, one message at a time each)
POOLS = ("prefork", "solo")
EXTRA = "pip install 'celery-bus[bench]'"
NO_FANOUT = {"dramatiq": "no fan-out in dramatiq (a message goes to one actor)"}
READY_TIMEOUT = 90.0
NOT_MEASURED = "no fan-out"


def check(options: Options, installed: Callable[[str], bool] | None = None) -> None:
    """Refuse, with the fix, a --peers run that cannot measure them (typer exits 2)."""
    if options.pool not in POOLS:
        raise typer.BadParameter(f"the peers match Celery's prefork pool (C processes, one message at a time "
                                 f"each), not --pool {options.pool}; use --pool prefork or solo",
                                 param_hint="--peers")
    if not {"commands", "fanout"} & set(options.phases):
        raise typer.BadParameter("the peers run the commands and fanout phases; add commands or fanout to "
                                 f"--phases (given: {','.join(options.phases)})", param_hint="--peers")
    installed = installed or (lambda module: importlib.util.find_spec(module) is not None)
    missing = [peer for peer in PEERS if not installed(peer)]
    if missing:
        raise typer.BadParameter(f"{' and '.join(missing)} not installed; the peers come with the [bench] "
                                 f"extra: {EXTRA}", param_hint="--peers")


def processes(options: Options) -> int:
    """How many worker processes match the Celery workers' pool and concurrency."""
    return 1 if options.pool == "solo" else options.concurrency


def publisher_confirms(options: Options) -> bool:
    """Whether the peers send with publisher confirms: where project/config.py gives them to the bus and bare Celery."""
    return options.broker == "amqp"


# ---- one peer worker ---------------------------------------------------------------------
class PeerWorker:
    """A peer's worker (its CLI's process group, stopped by PID) and its counters."""

    #: the peers use no database: its CPU breakdown says "none" there (project/bench/cpu.py)
    uses_database = False

    def __init__(self, process: WorkerProcess, counts: Path) -> None:
        self.process = process
        self.counts = counts

    def probe(self, op: str = "read", count: int = 0) -> dict[str, Any]:
        """The counters, in bench_probe's shape (for phases.Bench.drain)."""
        if self.process.process.poll() is not None:
            raise BenchError(f"{self.process.hostname} exited with {self.process.process.returncode}; "
                             f"log {self.process.logfile}:\n{self.process.log()[-2000:]}")
        return bench_peer_probe.read(self.counts)

    def wait_ready(self, expected: int, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while self.probe()["processes"] < expected:
            if time.monotonic() > deadline:
                raise BenchError(f"{self.process.hostname}: {expected} worker processes not consuming after "
                                 f"{timeout:g}s; log {self.process.logfile}:\n{self.process.log()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.process.stop(grace=10)


def _command(peer: str, options: Options) -> list[str]:
    count = str(processes(options))
    if peer == "dramatiq":
        return [sys.executable, "-m", "dramatiq", "project.bench.peer_dramatiq", "--processes", count,
                "--threads", "1", *(["--verbose"] if options.loglevel.lower() == "debug" else [])]
    return [sys.executable, "-m", "faststream", "run", "project.bench.peer_faststream:app", "--workers", count,
            "--log-level", options.loglevel.lower()]


class PeerRun:
    """One worker group of one peer (a context manager): its namespace, worker and sender, released on exit."""

    def __init__(self, bench: Bench, peer: str, subscribers: int) -> None:
        self.bench, self.peer, self.subscribers = bench, peer, subscribers
        self.stack = ExitStack()
        self.namespace: dict[str, Any] = {}

    def __enter__(self) -> "PeerRun":
        inst, o = self.bench.inst, self.bench.options
        try:
            cleanups: isolation.Cleanups = []
            self.stack.callback(_release, cleanups)
            url = self._namespace(cleanups)
            tag = f"{self.peer}-{uuid.uuid4().hex[:6]}"
            counts = inst.home / "peers" / tag
            counts.mkdir(parents=True)
            env = {**os.environ, bench_peer_probe.URL_ENV: url, bench_peer_probe.COUNTS_ENV: str(counts),
                   bench_peer_probe.CONFIRM_ENV: "1" if publisher_confirms(o) else "0",
                   "BUS_BENCH_SUBSCRIBERS": str(self.subscribers)}
            logfile = inst.home / "logs" / f"peer-{tag}.log"
            logfile.parent.mkdir(parents=True, exist_ok=True)
            with open(logfile, "wb") as out:
                popen = subprocess.Popen(_command(self.peer, o), env=env, cwd=inst.home, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            self.worker = PeerWorker(WorkerProcess(popen, f"{self.peer} worker", logfile, {}), counts)
            self.stack.callback(self.worker.stop)
            inst.cleanups.append(self.worker.stop)  # also on an interrupt between here and close()
            self.sender = Sender.start(self.peer, env, inst.home, inst.home / "logs" / f"sender-{tag}.log",
                                       module="project.bench.peer_sender")
            self.stack.callback(self.sender.close)
            inst.cleanups.append(self.sender.close)
            self.worker.wait_ready(processes(o))
            self.sender.result(timeout=READY_TIMEOUT)  # "ready"
            self.sender.call("warm")
        except BaseException:
            self.stack.close()
            raise
        return self

    def __exit__(self, *_: Any) -> None:
        self.stack.close()

    def _namespace(self, cleanups: isolation.Cleanups) -> str:
        o = self.bench.options
        if o.broker == "redis":
            self.namespace = {"redis_db": isolation.claim_redis_db(cleanups, o.redis_url)}
            return f"{o.redis_url.rstrip('/')}/{self.namespace['redis_db']}"
        if o.broker == "amqp":
            self.namespace = {"vhost": isolation.rabbitmq_vhost(cleanups, prefix="bus-bench-peer")}
            return f"{o.amqp_url.rstrip('/')}/{self.namespace['vhost']}"
        self.namespace = {"embedded_db": 1}  # of the run's own server, where the bus uses db 0
        url = f"unix://{self.bench.inst.home}/redis.sock?db=1"
        cleanups.append(lambda: _flush(url))
        return url


def _flush(url: str) -> None:
    import redis
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


def _release(cleanups: isolation.Cleanups) -> None:
    for step in reversed(cleanups):
        step()


# ---- the phases ---------------------------------------------------------------------------
def measure(bench: Bench) -> dict[str, Any]:
    """Every peer's raw runs: `commands` and, per K, `fanout` (absent where the peer has none)."""
    o = bench.options
    warm = 4 * processes(o)
    found: dict[str, Any] = {}
    for peer in PEERS:
        runs: dict[str, Any] = {"commands": [], "fanout": {}, "created": [], "load_before": load_average()}
        title = TITLES[peer]
        if "commands" in o.phases:
            with PeerRun(bench, peer, 0) as run:
                runs["created"].append(run.namespace)
                bench.throughput("warming up", run.worker, run.sender, warm)
                for r in range(o.repeat):
                    runs["commands"].append(bench.throughput(f"{title} no-op [{r + 1}/{o.repeat}]", run.worker,
                                                             run.sender, o.n))
        for k in o.subscribers if "fanout" in o.phases and peer not in NO_FANOUT else []:
            events = max(20, round(o.n / k))
            runs["fanout"][k] = []
            with PeerRun(bench, peer, k) as run:
                runs["created"].append(run.namespace)
                bench.fanout("warming up", run.worker, run.sender, max(1, warm // k), k)
                for r in range(o.repeat):
                    runs["fanout"][k].append(bench.fanout(f"{title} fan-out K={k} [{r + 1}/{o.repeat}]",
                                                          run.worker, run.sender, events, k))
        runs["load_after"] = load_average()
        found[peer] = runs
    return found


# ---- report -------------------------------------------------------------------------------
def settings(peer: str, options: Options) -> dict[str, Any]:
    """What each peer ran with (recorded in the report)."""
    count, amqp = processes(options), options.broker == "amqp"
    if peer == "dramatiq":
        from dramatiq.worker import QUEUE_PREFETCH
        return {"command": f"dramatiq --processes {count} --threads 1", "processes": count, "threads": 1,
                "prefetch_per_process": QUEUE_PREFETCH or 2, "ack": "after the actor",
                "publisher_confirms": publisher_confirms(options)}
    return {"command": f"faststream run --workers {count}", "processes": count, "event_loop": "one per process",
            "prefetch_per_process": "unlimited" if amqp else "a stream read takes what is there",
            "ack": "after the handler", "publisher_confirms": publisher_confirms(options),
            "structure": "durable queues; fan-out: a fanout exchange bound to K queues" if amqp
            else "streams with consumer groups; fan-out: one stream, K groups"}


def summarize(options: Options, raw: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """Per peer: medians; `bus_ratio` bus ÷ peer and `bare_ratio` bare Celery ÷ peer; versions and settings."""
    found = {}
    for peer, runs in raw.items():
        per_s = median(runs["commands"], "per_s")
        entry: dict[str, Any] = {
            "commands": {"per_s": per_s, "send_per_s": median(runs["commands"], "send_per_s"),
                         "bus_ratio": ratio(summary["commands"]["bus"], per_s),
                         "bare_ratio": ratio(summary["commands"]["bare"], per_s),
                         "cpu": cpu.median([r["cpu"] for r in runs["commands"]])},
            "fanout": {}, "version": importlib.metadata.version(peer), "settings": settings(peer, options),
            "load_before": runs["load_before"], "load_after": runs["load_after"],
            "created_and_removed": runs["created"]}
        for k in options.subscribers if "fanout" in options.phases else []:
            fan = runs["fanout"].get(k)
            if fan is None:
                entry["fanout"][str(k)] = {"not_measured": NO_FANOUT.get(peer, "not run")}
                continue
            bus = summary["fanout"].get(str(k), {})
            peer_per_s = median(fan, "per_s")
            entry["fanout"][str(k)] = {
                "per_s": peer_per_s, "events": fan[0]["events"] if fan else 0,
                "delivered": min(r["done"] / r["expected"] for r in fan) if fan else math.nan,
                "bus_ratio": ratio(bus.get("bus", math.nan), peer_per_s),
                "bare_ratio": ratio(bus.get("bare", math.nan), peer_per_s),
                "cpu": cpu.median([r["cpu"] for r in fan])}
        found[peer] = entry
    return found


def render(report: dict[str, Any], console: Console) -> None:
    """The table: bare Celery, the bus and each peer, one row each, with bus ÷ that row."""
    s, run = report["summary"], report["run"]
    ks = list(s["fanout"])
    count = 1 if run["pool"] == "solo" else run["concurrency"]
    table = Table(title=f"the bus beside its peers: {run['broker']}, {count} worker processes each; messages "
                        f"completed per second (bus ÷ row above 1: the bus is faster)")
    table.add_column("library")
    for column in ("no-op/s", "sends/s", *(f"fan-out K={k}/s" for k in ks), "bus ÷ row no-op",
                   *(f"bus ÷ row K={k}" for k in ks), "load (1 min) before -> after"):
        table.add_column(column, justify="right")

    def row(name: str, commands: float | None, sends: float | None, fans: list[Any], load: str) -> None:
        bus = [s["commands"]["bus"], *(s["fanout"][k]["bus"] for k in ks)]
        table.add_row(name, fmt(commands), fmt(sends), *(fmt(f) if f != NOT_MEASURED else f for f in fans),
                      *(fmt(b / f, 2) if _number(b) and _number(f) else "-"
                        for b, f in zip(bus, [commands, *fans])), load)
    # the Celery sides ran first: from the run's start until the first peer started
    first_peer = next(iter(s["peers"].values()), {})
    load = f"{run['load_before'].split()[0]} -> {first_peer.get('load_before', run['load_after']).split()[0]}"
    c = s["commands"]
    row("bare Celery", c["bare"], c["bare_send"], [s["fanout"][k]["bare"] for k in ks], load)
    row("bus", c["bus"], c["bus_send"], [s["fanout"][k]["bus"] for k in ks], load)
    for peer, entry in s["peers"].items():
        row(f"{TITLES[peer]} {entry['version']}", entry["commands"]["per_s"], entry["commands"]["send_per_s"],
            [entry["fanout"].get(k, {}).get("per_s", NOT_MEASURED) for k in ks],
            f"{entry['load_before'].split()[0]} -> {entry['load_after'].split()[0]}")
    console.print(table)
    for peer, entry in s["peers"].items():
        settings_text = "; ".join(f"{key.replace('_', ' ')}: {value}" for key, value in entry["settings"].items())
        console.print(f"  {TITLES[peer]}: {settings_text}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value) and value > 0
