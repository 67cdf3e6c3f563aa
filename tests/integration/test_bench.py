"""`bus bench` stays runnable: a short run per broker reports every figure.

Smoke only: nothing here says anything about speed (a shared 2-core machine cannot
promise any). The figures must be there and positive, the targets judged, the bench's
broker namespace and database gone afterwards. With --peers, dramatiq and FastStream
get rows too (skipped without the [bench] extra; under CI=true that fails instead).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.integration.support.bus_services import missing, require

pytestmark = pytest.mark.integration
BUS = str(Path(sys.executable).with_name("bus"))


def bench(tmp_path: Path, *args: str) -> dict:
    """Run `bus bench ... --json` as a user would; its report."""
    done = subprocess.run([BUS, "bench", "--json", *args], env={**os.environ, "COLUMNS": "200", "TMPDIR": str(tmp_path)},
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


# RabbitMQ only in CI (about 25 s): on Redis the peers run and the results-in-the-database run below
# measure the commands and fan-out phases of both sides
@pytest.mark.parametrize("broker", ["amqp"])
def test_a_short_bench_run_reports_every_figure(broker, tmp_path):
    # Given a real broker and SQLite
    require(broker)
    # When the bench runs briefly with two subscribers
    report = bench(tmp_path, "--broker", broker, "--db", "sqlite", "--n", "40", "--latency-n", "40",
                   "--subscribers", "2", "--stall", "5")
    summary = report["summary"]
    # Then commands, .delay() rates and their ratio are there, for both sides
    commands = summary["commands"]
    assert all(positive(commands[key]) for key in ("bare", "bus", "bare_send", "bus_send", "ratio")), commands
    # And the CPU a command costs, per process, on both sides: every column found (SQLite's in the pool)
    for side in ("bare", "bus"):
        breakdown = commands["cpu"][side]
        assert breakdown["unknown"] == [] and positive(breakdown["total_us"]), breakdown
        assert breakdown["columns"]["database"]["label"] == "in pool", breakdown
    # And latency percentiles of both sides, and what the bus adds
    for side in ("bare", "bus"):
        assert all(positive(summary["latency"][side][p]) for p in ("p50", "p90", "p99", "max")), summary["latency"]
    assert isinstance(summary["latency"]["added_p50"], float)
    # And fan-out deliveries for K=2 on both sides (bare Redis fan-out is PUB/SUB: some copies only)
    fanout = summary["fanout"]["2"]
    assert positive(fanout["bare"]) and positive(fanout["bus"]) and positive(fanout["ratio"]), fanout
    assert fanout["bus_delivered"] == 1.0, "the bus delivers every copy"
    if broker == "amqp":
        assert fanout["bare_delivered"] == 1.0, "RabbitMQ's fanout delivers every copy"
    # And the relay, timed on its own
    assert positive(summary["relay"]["2"]["per_s"]), summary["relay"]
    # And every target this run can judge, judged
    assert {t["target"].split(" ")[0] for t in summary["targets"]} >= {"commands", "added"}
    assert all(t["met"] in (True, False) for t in summary["targets"]), summary["targets"]
    # And the run records its machine and settings
    run = report["run"]
    assert run["broker"] == broker and run["concurrency"] == 2 and run["load_before"]
    # And nothing of the run is left behind (its home held the logs and the SQLite file)
    assert not list(tmp_path.glob("bb-*")), "the bench's working directory was removed"
    if broker == "amqp":
        vhosts = subprocess.run(["rabbitmqctl", "-q", "list_vhosts"], capture_output=True, text=True).stdout
        assert run["created_and_removed"]["vhost"] not in vhosts.split()


# ---- --peers: dramatiq and FastStream beside bare Celery and the bus -----------------------
def peers_installed() -> None:
    """Skip (fail when CI=true) unless the [bench] extra is installed."""
    absent = [module for module in ("dramatiq", "faststream") if importlib.util.find_spec(module) is None]
    if absent:
        missing(f"{' and '.join(absent)} not installed; the peers come with the [bench] extra: "
                "pip install -e '.[bench]'")


def one_line(text: str) -> str:
    """`text` with the boxes and line breaks of typer's error panel taken out."""
    return " ".join(text.replace("│", " ").split())


# Redis only in CI (about 50 s a broker): the peers' RabbitMQ brokers are measured by
# `bus bench --peers --broker amqp` (docs/benchmarks.md)
@pytest.mark.parametrize("broker", ["redis"])
def test_the_peers_are_measured_beside_bare_celery_and_the_bus(broker, tmp_path):
    # Given a real broker and the [bench] extra
    require(broker)
    peers_installed()
    # When the bench runs briefly with --peers, its table on stdout and its report in a file
    report_file = tmp_path / "report.json"
    done = subprocess.run([BUS, "bench", "--peers", "--broker", broker, "--db", "sqlite", "--n", "40",
                           "--subscribers", "2", "--phases", "commands,fanout", "--stall", "5",
                           "--output", str(report_file)],
                          env={**os.environ, "COLUMNS": "250", "TMPDIR": str(tmp_path)}, cwd=REPO,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    peers = json.loads(report_file.read_text())["summary"]["peers"]
    # Then each peer drained the no-op messages, and the bus is compared with it
    assert set(peers) == {"dramatiq", "faststream"}
    for name, peer in peers.items():
        assert positive(peer["commands"]["per_s"]) and positive(peer["commands"]["send_per_s"]), (name, peer)
        assert positive(peer["commands"]["bus_ratio"]) and positive(peer["commands"]["bare_ratio"]), (name, peer)
        assert peer["settings"]["processes"] == 2 and peer["version"], (name, peer)
    # And FastStream fanned out every copy to both subscribers; dramatiq says it has no fan-out
    fan = peers["faststream"]["fanout"]["2"]
    assert positive(fan["per_s"]) and positive(fan["bus_ratio"]) and fan["delivered"] == 1.0, fan
    assert "no fan-out" in peers["dramatiq"]["fanout"]["2"]["not_measured"]
    # And the table has a row for each library
    for row in ("bare Celery", "bus", "dramatiq", "FastStream"):
        assert f"│ {row} " in done.stdout, done.stdout
    # And FastStream's CPU a message is broken down beside the bus's
    assert positive(peers["faststream"]["commands"]["cpu"]["total_us"]), peers["faststream"]["commands"]
    assert "CPU per message, no-op commands" in done.stdout, done.stdout
    # And each peer ran in a namespace of its own, removed afterwards
    created = [n for peer in peers.values() for n in peer["created_and_removed"]]
    assert len(created) == 3, created  # dramatiq: commands; FastStream: commands, fan-out K=2
    if broker == "amqp":
        vhosts = subprocess.run(["rabbitmqctl", "-q", "list_vhosts"], capture_output=True, text=True).stdout.split()
        assert not {n["vhost"] for n in created} & set(vhosts)
    assert not list(tmp_path.glob("bb-*")), "the bench's working directory was removed"


@pytest.mark.parametrize("args, says", [
    (["--phases", "latency,relay"], "the peers run the commands and fanout phases; add commands or fanout to "
                                    "--phases (given: latency,relay)"),
    (["--pool", "threads"], "the peers match Celery's prefork pool (C processes, one message at a time each), "
                            "not --pool threads; use --pool prefork or solo"),
], ids=["phases-without-commands-or-fanout", "threads-pool"])
def test_peers_refuse_a_run_they_cannot_measure_with_the_fix(args, says, tmp_path):
    # Given a --peers run the peers cannot be matched in
    # When it starts
    done = subprocess.run([BUS, "bench", "--peers", *args], env={**os.environ, "COLUMNS": "300",
                                                                 "TMPDIR": str(tmp_path)},
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    # Then it exits 2 (usage error) saying how to fix it, before touching any broker
    assert done.returncode == 2, done.stderr
    assert f"Invalid value for --peers: {says}" in one_line(done.stderr)
    assert not list(tmp_path.glob("bb-*"))


def test_bare_celery_with_results_and_bus_results_in_the_database_are_measured(tmp_path):
    # Given Redis, whose default keeps results in Redis
    require("redis")
    # When the bench runs with the baseline storing results and the bus storing them in its database
    report = bench(tmp_path, "--broker", "redis", "--db", "sqlite", "--n", "40", "--phases", "commands",
                   "--bare-results", "--results", "database", "--stall", "5")
    # Then the report says so, and both sides drained every command
    assert report["run"]["bare_results"] is True
    assert report["run"]["result_backend"].startswith("db+sqlite"), report["run"]["result_backend"]
    commands = report["summary"]["commands"]
    assert positive(commands["bare"]) and positive(commands["bus"]), commands


def test_an_unknown_results_choice_is_refused_with_the_choices(tmp_path):
    # Given --results with a value the bench does not know
    # When it starts
    done = subprocess.run([BUS, "bench", "--results", "memory"], env={**os.environ, "COLUMNS": "300",
                                                                      "TMPDIR": str(tmp_path)},
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    # Then it exits 2 naming the choices, before touching any broker
    assert done.returncode == 2, done.stderr
    assert "Invalid value for --results: use one of default, database, redis" in one_line(done.stderr)
    assert not list(tmp_path.glob("bb-*"))
