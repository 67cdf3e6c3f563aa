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
5. with --phases timers (bus only): N durable timers written already due, then one relay
   pass timed while a bus worker runs them: timers relayed/s, and run/s from the relay's
   start to the last one run;
6. with --phases process (bus only): N pairs through a process manager (a starting step,
   then a handled step per instance), steps/s beside one plain subscriber's deliveries/s
   (fan-out K=1 of this run if it ran, else measured in the phase);
7. with --peers, 1 and 2 on dramatiq and FastStream, after the above, against the same
   broker server (project/bench/peers.py): the bus beside the libraries users would otherwise pick.

Throughput is timed from the first send to the last completion, as the worker saw it
(project/bench/probe.py): worker start-up and the sender's start-up are excluded, and
sending overlaps draining, as in production. Each figure is the median of --repeat
runs; bare and bus phases alternate within each repeat so that a noisy neighbour hits
both. Workers and senders are separate processes, started and stopped by PID.

The parts: project/bench/common.py (options, figures), installation.py (namespace,
database, workers, senders), phases.py (the measurements), peers.py (--peers); this
module is the command, the report and its tables. `bus bench` imports it only when it
runs (project/cli/main.py), so that nothing of the bench loads with the bus.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

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

from project.bench import cpu
from project.bench import peers as bench_peers
from project.bench.common import (
    BROKERS,
    DATABASES,
    DEFAULT_PHASES,
    PHASES,
    RESULTS,
    BenchError,
    Options,
    fmt,
    load_average,
    median,
    ratio,
)
from project.bench.installation import Installation
from project.bench.phases import Bench
from project.observe.console import make_console
from project.testing import isolation

#: settings of the bus (project/config.py) that cost per message and that bare Celery leaves off (recorded in reports)
BUS_SETTINGS = ("worker_send_task_events", "task_send_sent_event", "task_track_started", "task_acks_late")
#: the issue's targets (ratios are bus / bare in the same run)
TARGETS = {"commands_sqlite": 0.9, "commands_postgresql": 0.7, "fanout_amqp": 0.8,
           "added_p50_ms": 2.0, "added_p99_ms": 10.0, "relay_postgresql": 5000.0}
#: the bare column of the bus-only figures
NO_TIMERS = "none: no durable timers"
NO_PROCESS = "none: no process managers"



def summarize(options: Options, raw: dict[str, Any]) -> dict[str, Any]:
    """The figures (medians over the repeats), the ratios bus/bare and the targets."""
    c = {key: raw.get("commands", {}).get(key, []) for key in ("bare", "bus", "bare_latency", "bus_latency")}
    commands = {"bare": median(c["bare"], "per_s"), "bus": median(c["bus"], "per_s"),
                "bare_send": median(c["bare"], "send_per_s"), "bus_send": median(c["bus"], "send_per_s")}
    commands["ratio"] = ratio(commands["bus"], commands["bare"])
    commands["cpu"] = {side: cpu.median([r["cpu"] for r in c[side]]) for side in ("bare", "bus")}
    latency: dict[str, Any] = {"rate": options.rate, "n": options.latency_n}
    for side in ("bare", "bus"):
        latency[side] = {p: median(c[f"{side}_latency"], p) for p in ("p50", "p90", "p99", "max", "mean")}
    latency["added_p50"] = latency["bus"]["p50"] - latency["bare"]["p50"]
    latency["added_p99"] = latency["bus"]["p99"] - latency["bare"]["p99"]
    fanout, relay = {}, {}
    for k, runs in raw["fanout"].items():
        entry = {"events": runs["bus"][0]["events"] if runs["bus"] else 0,
                 "bare": median(runs["bare"], "per_s"), "bus": median(runs["bus"], "per_s"),
                 "bare_delivered": min(r["done"] / r["expected"] for r in runs["bare"]) if runs["bare"] else math.nan,
                 "bus_delivered": min(r["done"] / r["expected"] for r in runs["bus"]) if runs["bus"] else math.nan}
        entry["ratio"] = ratio(entry["bus"], entry["bare"])
        entry["cpu"] = {side: cpu.median([r["cpu"] for r in runs[side]]) for side in ("bare", "bus")}
        fanout[str(k)] = entry
        relay[str(k)] = {"per_s": median(runs["relay"], "per_s"), "write_per_s":
                         options.n / median(runs["relay"], "write_s") if runs["relay"] else math.nan}
    report = {"commands": commands, "latency": latency, "fanout": fanout, "relay": relay}
    if raw.get("timers"):
        report["timers"] = summarize_timers(options, raw["timers"])
    if raw.get("process"):
        report["process"] = summarize_process(options, raw["process"], fanout)
    report["targets"] = targets(options, report)
    if raw.get("peers"):
        report["peers"] = bench_peers.summarize(options, raw["peers"], report)
    return report


def summarize_timers(options: Options, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Durable timers: relayed/s (rows published / relay wall time) and run/s (relay start to last run)."""
    bus = runs["bus"]
    return {"timers": options.n, "relayed_per_s": median(bus, "relayed_per_s"), "run_per_s": median(bus, "per_s"),
            "write_per_s": options.n / median(bus, "write_s") if bus else math.nan,
            "run": min(r["done"] / r["expected"] for r in bus) if bus else math.nan, "bare": NO_TIMERS}


def summarize_process(options: Options, runs: dict[str, list[dict[str, Any]]],
                      fanout: dict[str, Any]) -> dict[str, Any]:
    """Process manager steps/s beside one plain subscriber's deliveries/s: measured in the phase, or fan-out K=1."""
    steps = runs["steps"]
    if runs["subscriber"]:
        subscriber, source = median(runs["subscriber"], "per_s"), "process phase"
    else:
        subscriber, source = fanout.get("1", {}).get("bus", math.nan), "fan-out K=1"
    entry = {"pairs": options.n, "steps_per_s": median(steps, "per_s"), "subscriber_per_s": subscriber,
             "subscriber_from": source,
             "completed": min(r["steps"] / (2 * r["pairs"]) for r in steps) if steps else math.nan,
             "failed": max((r["failed"] for r in steps), default=0), "bare": NO_PROCESS}
    entry["ratio"] = ratio(entry["steps_per_s"], subscriber)
    return entry


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


def render(report: dict[str, Any], console: Console) -> None:
    """The tables of a report."""
    meta = report["run"]
    console.print(f"[bold]bus bench[/bold] {meta['broker']} + {meta['db']}: pool {meta['pool']}, concurrency "
                  f"{meta['concurrency']}, prefetch {meta['prefetch_multiplier']}, batches of up to "
                  f"{meta.get('batch_max') or 1}, n={meta['n']}, "
                  f"repeat {meta['repeat']} (medians); load {meta['load_before']} -> {meta['load_after']}")
    s = report["summary"]
    table = Table(title="throughput (messages completed per second)")
    for column in ("figure", "bare Celery", "bus", "bus/bare"):
        table.add_column(column, justify="right" if column != "figure" else "left")
    c = s["commands"]
    table.add_row("no-op commands/s", fmt(c["bare"]), fmt(c["bus"]), fmt(c["ratio"], 2))
    table.add_row(".delay() calls/s (sender)", fmt(c["bare_send"]), fmt(c["bus_send"]),
                  fmt(ratio(c["bus_send"], c["bare_send"]), 2))
    for k, f in s["fanout"].items():
        lossy = "" if f["bare_delivered"] >= 1 else f" ({f['bare_delivered']:.0%} delivered)"
        table.add_row(f"fan-out K={k}: deliveries/s ({f['events']} events)", fmt(f["bare"]) + lossy,
                      fmt(f["bus"]), fmt(f["ratio"], 2))
    for k, f in s["relay"].items():
        table.add_row(f"outbox relay K={k}: events/s", "", fmt(f["per_s"]), "")
    if "timers" in s:
        t = s["timers"]
        missed = "" if t["run"] >= 1 else f" ({t['run']:.0%} run)"
        table.add_row(f"durable timers: relayed/s ({t['timers']} due)", t["bare"], fmt(t["relayed_per_s"]), "")
        table.add_row("durable timers: run/s, relay start to last run", t["bare"], fmt(t["run_per_s"]) + missed, "")
    if "process" in s:
        p = s["process"]
        missed = "" if p["completed"] >= 1 else f" ({p['completed']:.0%} of steps)"
        table.add_row(f"process manager: steps/s ({p['pairs']} pairs, 2 steps each)", p["bare"],
                      fmt(p["steps_per_s"]) + missed, "")
        table.add_row(f"  beside: 1 subscriber, deliveries/s ({p['subscriber_from']})", "",
                      fmt(p["subscriber_per_s"]), "")
        table.add_row("  steps / deliveries", "", fmt(p["ratio"], 2), "")
    console.print(table)
    lat = s["latency"]
    table = Table(title=f"latency, .delay() to handler start, at {lat['rate']:g} msg/s (ms)")
    for column in ("side", "p50", "p90", "p99", "max"):
        table.add_column(column, justify="right" if column != "side" else "left")
    for side in ("bare", "bus"):
        table.add_row(side, *(fmt(lat[side][p], 2) for p in ("p50", "p90", "p99", "max")))
    table.add_row("added by the bus", fmt(lat["added_p50"], 2), "", fmt(lat["added_p99"], 2), "")
    console.print(table)
    table = Table(title="targets")
    for column in ("target", "value", "bound", "met"):
        table.add_column(column)
    for t in s["targets"]:
        table.add_row(t["target"], fmt(t["value"], 2), ("≥ " if t["higher_is_better"] else "≤ ") + fmt(t["bound"], 2),
                      {True: "[green]yes[/green]", False: "[red]no[/red]", None: "-"}[t["met"]])
    console.print(table)
    if s.get("peers"):
        bench_peers.render(report, console)
    render_cpu(report, console)


def render_cpu(report: dict[str, Any], console: Console) -> None:
    """The CPU breakdowns (project/bench/cpu.py): no-op commands, then each fan-out, every side measured."""
    s, meta = report["summary"], report["run"]
    peers = s.get("peers", {})

    def peer_rows(pick: Any) -> list[tuple[str, Any]]:
        return [(bench_peers.TITLES[peer], pick(entry)) for peer, entry in peers.items()]

    def fastest(pick: Any) -> tuple[str, str] | None:
        """The peer that completed the most messages a second (the issue's best peer): the reference row."""
        rates = [(rate, bench_peers.TITLES[peer]) for peer, entry in peers.items()
                 if isinstance(rate := pick(entry), (int, float)) and rate > 0]
        return (max(rates)[1], "the fastest peer of this run") if rates else None
    where = f"{meta['broker']} + {meta['db']}"
    cpu.render([("bare Celery", s["commands"]["cpu"]["bare"]), ("bus", s["commands"]["cpu"]["bus"]),
                *peer_rows(lambda entry: entry["commands"].get("cpu"))], console,
               f"CPU per message, no-op commands ({where}): µs of CPU a completed message, by process",
               fastest(lambda entry: entry["commands"]["per_s"]))
    for k, f in s["fanout"].items():
        cpu.render([("bare Celery", f["cpu"]["bare"]), ("bus", f["cpu"]["bus"]),
                    *peer_rows(lambda entry: entry["fanout"].get(k, {}).get("cpu"))], console,
                   f"CPU per delivery, fan-out K={k} ({where}): µs of CPU a delivered copy, by process",
                   fastest(lambda entry: entry["fanout"].get(k, {}).get("per_s")))


def run(options: Options, console: Console) -> dict[str, Any]:
    """One full bench run; the report (raw runs, medians, targets, machine)."""
    import celery
    import kombu

    from project import config as bus_config
    home = Path(tempfile.mkdtemp(prefix="bb-", dir=options.workdir))  # short: the embedded socket path
    load_before = load_average()
    started = time.time()
    inst = Installation(options, home)
    raw: dict[str, Any] = {"fanout": {}}
    servers: dict[str, cpu.Source] = {}
    try:
        inst.open()
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            bench = Bench(options, inst, progress)
            servers = bench.servers
            raw["commands"] = bench.commands() if {"commands", "latency"} & set(options.phases) else {}
            for k in options.subscribers if {"fanout", "relay"} & set(options.phases) else []:
                raw["fanout"][k] = bench.fanouts(k)
            if "timers" in options.phases:
                raw["timers"] = bench.timers()
            if "process" in options.phases:
                raw["process"] = bench.process(subscriber=not ("fanout" in options.phases
                                                               and 1 in options.subscribers))
            if options.peers:
                raw["peers"] = bench_peers.measure(bench)
    except BaseException:
        console.print(f"bench stopped; worker and sender logs kept in {home}/logs")
        raise
    finally:
        inst.close()
    report = {
        "run": {"broker": options.broker, "db": options.db, "phases": list(options.phases), "n": options.n,
                "repeat": options.repeat,
                "subscribers": options.subscribers, "latency_n": options.latency_n, "rate": options.rate,
                "pool": options.pool, "concurrency": options.concurrency, "loglevel": options.loglevel,
                "prefetch_multiplier": bus_config.worker_prefetch_multiplier,
                "batch_max": getattr(bus_config, "bus_batch_max", 0),
                "bus_settings": {name: getattr(bus_config, name, None) for name in BUS_SETTINGS},
                "result_backend": inst.settings.result_backend.split(":", 1)[0], "bare_results": options.bare_results,
                "load_before": load_before, "load_after": load_average(), "cpus": os.cpu_count(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                "duration_s": round(time.time() - started, 1), "created_and_removed": inst.created,
                "versions": {"python": platform.python_version(), "celery": celery.__version__,
                             "kombu": kombu.__version__, **inst.versions},
                "cpu": cpu.legend(servers)},
        "summary": summarize(options, raw),
        "raw": raw,
    }
    shutil.rmtree(home, ignore_errors=True)
    return report


# ---- helpers -------------------------------------------------------------------------
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
    phases: str = typer.Option(",".join(DEFAULT_PHASES), "--phases", help="Which measurements, a comma list of "
                               + ", ".join(PHASES) + " (timers and process: the bus only)."),
    peers: bool = typer.Option(False, "--peers", help="Also run the same no-op work and fan-out on dramatiq and "
                               "FastStream, on the same broker (needs the bench extra: pip install 'celery-bus\\[bench]')."),
    results: str = typer.Option("default", "--results", help="Where the bus keeps Celery results: default (Redis "
                                "on Redis, the bus database on RabbitMQ), database (the bus database on any broker) or redis (a Redis "
                                "database of the run's on any broker: what BUS_BATCH_MAX needs on RabbitMQ)."),
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
    """Measure the bus against bare Celery on one broker and database: throughput, fan-out, latency, relay
    (and, asked for, durable timers and process manager steps)."""
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
    err = make_console(stderr=True)
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
        render(report, make_console())


#: `bus bench` as an app of its own: project/cli/main.py imports this module only when the command runs
app = typer.Typer(add_completion=False)
app.command()(bench)
