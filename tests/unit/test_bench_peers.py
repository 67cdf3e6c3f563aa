"""`bus bench --peers` without services: what it refuses, and how a peer worker counts."""
from __future__ import annotations

import os
import time

import pytest
import typer

from project.bench import peer_probe as bench_peer_probe
from project.bench import peers as bench_peers
from project.bench.run import Options


def test_peers_without_the_bench_extra_are_refused_with_the_install_command():
    # Given a machine where dramatiq is installed and FastStream is not
    installed = {"dramatiq"}.__contains__
    # When a --peers run is checked
    with pytest.raises(typer.BadParameter) as refused:
        bench_peers.check(Options(peers=True), installed=installed)
    # Then it names what is missing and the command that installs it
    assert str(refused.value) == ("faststream not installed; the peers come with the [bench] extra: "
                                  "pip install 'celery-bus[bench]'")


def test_peers_match_the_celery_workers_processes():
    # Given the bench's default pool and concurrency, and the solo pool
    # Then a peer runs as many worker processes as Celery's pool has
    assert bench_peers.processes(Options(pool="prefork", concurrency=3)) == 3
    assert bench_peers.processes(Options(pool="solo", concurrency=3)) == 1


def test_each_worker_process_counts_in_a_file_of_its_own_and_the_reader_adds_them_up(tmp_path, monkeypatch):
    monkeypatch.setenv(bench_peer_probe.COUNTS_ENV, str(tmp_path))
    monkeypatch.setattr(bench_peer_probe._Mine, "view", None)
    started = time.time()
    # Given a forked worker process that handled 3 no-ops and 2 deliveries
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        bench_peer_probe.ready()
        for slot in (0, 0, 0, 1, 1):
            bench_peer_probe.completed(slot)
        os._exit(0)
    assert os.waitpid(child, 0)[1] == 0
    # And this process, ready and one no-op handled
    bench_peer_probe.ready()
    bench_peer_probe.completed(0)
    # When the orchestrator reads the counters
    counts = bench_peer_probe.read(tmp_path)
    # Then both processes are there, their counts added, the last completion the latest of them
    assert counts["processes"] == 2
    (noops, last_noop, failed), (deliveries, last_delivery, _) = counts["slots"]
    assert (noops, deliveries, failed) == (4, 2, 0)
    assert started <= last_delivery <= last_noop <= time.time()
