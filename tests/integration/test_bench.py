"""`bus bench` stays runnable: a short run per broker reports every figure.

Smoke only: nothing here says anything about speed (a shared 2-core machine cannot
promise any). The figures must be there and positive, the targets judged, the bench's
broker namespace and database gone afterwards.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.integration.bus_services import require

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


@pytest.mark.parametrize("broker", ["redis", "amqp"])
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
