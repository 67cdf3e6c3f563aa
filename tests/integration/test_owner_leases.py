"""Claiming owner leases (project/ownership.py, lease.acquire_all) on real databases, from many threads at once.

A worker claims all its command queues in one transaction: askers at one instant, each
listing the queues in its own order, must neither deadlock nor split the queues between
them: one handler gets every lease, the others get none.
"""
from __future__ import annotations

import random
import threading
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy.engine import Engine

from project import lease, ownership
from project.db import engine_for
from project.errors import OwnerConflict
from tests.databases import migrated_database

pytestmark = pytest.mark.integration
ASKERS = 6
QUEUES = ["accounts.register_user", "billing.refund", "orders.cancel_order", "orders.place_order"]
TTL = timedelta(seconds=30)


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A fresh database of each kind at the migrations' head."""
    with migrated_database(request.param, tmp_path, prefix="bus_owner") as url:
        yield engine_for(url)


def claim_together(engine: Engine) -> list[object]:
    """Every asker claims all QUEUES (in its own order, with its own handler) at one instant; what each got."""
    barrier, outcome = threading.Barrier(ASKERS), [None] * ASKERS

    def ask(n: int) -> None:
        order = random.Random(n).sample(QUEUES, len(QUEUES))
        barrier.wait()
        try:
            outcome[n] = ownership.claim(engine, {q: f"handler-{n}" for q in order}, f"worker-{n}@h", TTL)
        except Exception as exc:  # noqa: BLE001 - the test inspects what each asker got
            outcome[n] = exc

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(ASKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return outcome


def test_workers_claiming_the_same_queues_at_once_one_gets_all_and_nobody_deadlocks(engine):
    # Given no owner leases
    # When six workers with six handlers claim the same four queues at one instant, each in its own order
    outcome = claim_together(engine)

    # Then exactly one started; every other one was refused with OwnerConflict (no deadlock, no other error)
    winners = [n for n, got in enumerate(outcome) if isinstance(got, list)]
    assert len(winners) == 1, outcome
    assert all(isinstance(got, OwnerConflict) for n, got in enumerate(outcome) if n != winners[0]), outcome
    # and every lease names the winner: none of the losers left one behind
    winner = winners[0]
    assert {(h.name, h.key, h.holder) for h in lease.listing(engine, ownership.PREFIX)} == {
        (ownership.lease_name(q), f"handler-{winner}", f"worker-{winner}@h") for q in QUEUES}
