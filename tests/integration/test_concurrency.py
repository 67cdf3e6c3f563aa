"""Concurrent duplicates: one key sent 20 times at once runs the handler once.

The cluster matrix (tests/integration/conftest.py): Redis and RabbitMQ with SQLite and PostgreSQL,
the embedded broker with SQLite, quorum queues with PostgreSQL.
The shared worker of the pair has 2 processes (-c 2), so the duplicates are claimed by
both processes at the same time: the second claim of the key waits on the first one's
transaction (PostgreSQL row lock, SQLite write lock), then finds its outcome. On the
Redis pairs the worker batches (the default there): duplicates in one batch meet in one
transaction, each in its own savepoint, and find the first one's claim.
"""
from __future__ import annotations

import re

import pytest

from tests.integration.support.helpers import ITEMS_TOTAL, PLACE_ORDER, order
from tests.integration.support.scenarios import Scenario

pytestmark = pytest.mark.integration
TIMES = 20


def test_twenty_concurrent_duplicates_run_the_handler_once(cluster: Scenario, uid: str):
    # Given one order and one idempotency key
    fields, key = order(f"o-{uid}"), f"checkout-{uid}"

    # When the same command is sent 20 times back to back, faster than one is handled
    ids = cluster.client.burst(PLACE_ORDER, fields, key, TIMES)

    # Then every send got the same AsyncResult, holding the handler's result
    assert set(ids) == {ids[0]}
    assert cluster.client.get(ids[0]) == {"order_id": f"o-{uid}", "total": ITEMS_TOTAL}
    # and all 20 deliveries were processed: 1 execution, 19 absorbed by the claim
    cluster.wait_for("19 absorbed duplicates", lambda: cluster.rows(
        "SELECT 1 FROM bus_commands WHERE task = :t AND key = :k AND duplicates = :n",
        t=PLACE_ORDER, k=key, n=TIMES - 1))
    [(status, duplicates)] = cluster.rows("SELECT status, duplicates FROM bus_commands WHERE task = :t AND key = :k",
                                          t=PLACE_ORDER, k=key)
    assert (status, duplicates) == ("succeeded", TIMES - 1)
    # and the handler's effect exists once; no delivery failed or was dead-lettered
    assert cluster.rows("SELECT count(*) FROM orders WHERE order_id = :o", o=f"o-{uid}") == [(1,)]
    assert cluster.rows("SELECT reason FROM bus_dead_letters WHERE message_id = :m", m=ids[0]) == []


def pool_processes_that_handled(log: str, key: str) -> set[str]:
    """Which pool processes (ForkPoolWorker-N) logged a delivery of `key`."""
    return set(re.findall(rf"/(ForkPoolWorker-\d+)\] .*key {re.escape(repr(key))}", log))


def test_a_burst_is_shared_by_both_worker_processes(cluster: Scenario, uid: str):
    """The premise of the test above: the two processes really race for the key.

    Unbatched (RabbitMQ pairs), each process takes one delivery at a time, and every burst
    is shared. Batched (Redis pairs, the default there), a burst is split between the two
    processes' batches only when it arrives while both are free: up to 3 bursts, one must be.
    """
    # Given the shared worker with 2 processes
    seen: list[set[str]] = []
    for attempt in range(3):
        key = f"checkout-{uid}-{attempt}"
        # When one key is sent 20 times back to back
        ids = cluster.client.burst(PLACE_ORDER, order(f"o-{uid}-{attempt}"), key, TIMES)
        cluster.client.get(ids[0])
        cluster.wait_for("19 absorbed duplicates", lambda: cluster.rows(
            "SELECT 1 FROM bus_commands WHERE task = :t AND key = :k AND duplicates = :n",
            t=PLACE_ORDER, k=key, n=TIMES - 1))
        seen.append(pool_processes_that_handled(cluster.worker.logfile.read_text(), key))
        if seen[-1] == {"ForkPoolWorker-1", "ForkPoolWorker-2"}:
            break
    # Then both pool processes handled deliveries of one key
    assert {"ForkPoolWorker-1", "ForkPoolWorker-2"} in seen, seen


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def threaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A Redis scenario whose worker runs the threads pool (4 threads share one engine)."""
    from tests.integration.conftest import opened
    with opened("redis", request.param, tmp_path_factory, "threads") as scenario:
        scenario.worker = scenario.start_worker(concurrency=4, pool="threads", name="threads")
        scenario.client = scenario.driver()
        yield scenario


def test_concurrent_duplicates_on_the_threads_pool_run_the_handler_once(threaded: Scenario, uid: str):
    # Given a worker with the threads pool: four threads share the process's engine and its pool
    fields, key = order(f"o-{uid}"), f"checkout-{uid}"
    # When one key is sent 20 times at once
    ids = threaded.client.burst(PLACE_ORDER, fields, key, TIMES)
    # Then the handler ran once, and each thread's session kept to its own connection
    assert threaded.client.get(ids[0]) == {"order_id": f"o-{uid}", "total": ITEMS_TOTAL}
    threaded.wait_for("19 absorbed duplicates", lambda: threaded.rows(
        "SELECT 1 FROM bus_commands WHERE task = :t AND key = :k AND duplicates = :n",
        t=PLACE_ORDER, k=key, n=TIMES - 1))
    assert threaded.rows("SELECT count(*) FROM orders WHERE order_id = :o", o=f"o-{uid}") == [(1,)]
    assert threaded.rows("SELECT count(*) FROM bus_dead_letters") == [(0,)]
    assert "concurrency: 4 (thread)" in threaded.worker.logfile.read_text()


def test_a_threads_pool_worker_with_batching_unset_runs_unbatched_reserving_one_message_per_thread(threaded: Scenario):
    # Given the threads-pool worker, BUS_BATCH_MAX unset on Redis (where batching is on by default)
    worker = threaded.worker
    # When it is asked what it reserves (a retry waiting out its countdown holds one more slot while it
    # waits: the duplicates of the test above can leave one, for a few seconds)
    def reserved() -> int:
        replies = threaded.control.control.inspect(destination=[worker.hostname], timeout=5).stats()
        return replies[worker.hostname]["prefetch_count"]

    threaded.wait_for("the prefetch window without held retries", lambda: reserved() == 4, timeout=20)
    # Then it fell back to unbatched execution (no prefork event loop), saying why, and reserves
    # BUS_PREFETCH (1) per thread (4), not the two batches' worth a batching process reserves (128)
    log = worker.logfile.read_text()
    assert "batched execution off (BUS_BATCH_MAX unset)" in log and "run -P prefork" in log


def test_an_explicit_batch_size_on_a_threads_pool_worker_refuses_to_start_naming_the_fix(
        threaded: Scenario):
    # Given BUS_BATCH_MAX=8 asked for explicitly, When a threads-pool worker starts
    with pytest.raises(RuntimeError, match=r"exited") as refused:
        threaded.start_worker(concurrency=2, pool="threads", name="threads-batched", env={"BUS_BATCH_MAX": "8"})
    # Then it stops, naming the pool and both ways out
    assert "BUS_BATCH_MAX=8 needs the prefork pool's event loop" in str(refused.value)
    assert "run -P prefork, or BUS_BATCH_MAX=0" in str(refused.value)
