"""Leases (project/store/lease.py, project/messaging/ownership.py) on real databases: askers at the same instant cannot both win.

The owner of a command queue and the outbox relay rest on this: PostgreSQL and SQLite,
with threads that ask at one barrier, each on its own connection.
"""
from __future__ import annotations

import random
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy.engine import Engine

from project.errors import OwnerConflict
from project.messaging import ownership
from project.store import lease
from project.store.engine import engine_for
from tests.databases import migrated_database
from tests.together import at_one_instant

pytestmark = pytest.mark.integration
ASKERS = 8
TTL = timedelta(seconds=30)
#: owner leases: askers listing the same queues, each in its own order, must neither deadlock nor split them
OWNER_ASKERS = 6
QUEUES = ["accounts.register_user", "billing.refund", "orders.cancel_order", "orders.place_order"]


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A fresh database of each kind at the migrations' head."""
    with migrated_database(request.param, tmp_path, prefix="bus_lease") as url:
        yield engine_for(url)


def ask_together(engine: Engine, keys: list[str], name: str = "owner:orders.place_order") -> list[bool]:
    """Every key asks for `name` at the same instant, each from its own thread; who won."""
    return at_one_instant(len(keys), lambda n: lease.acquire(engine, name, keys[n], holder=f"worker-{n}", ttl=TTL)[0])


def test_askers_with_different_keys_at_one_instant_one_wins(engine):
    # Given nobody holds the lease
    # When eight askers with eight different keys ask at the same instant, on their own connections
    won = ask_together(engine, [f"handler-{n}" for n in range(ASKERS)])

    # Then exactly one wins, and the lease names its key
    assert won.count(True) == 1
    winner = won.index(True)
    [held] = lease.listing(engine)
    assert (held.key, held.holder) == (f"handler-{winner}", f"worker-{winner}")


def test_askers_with_one_key_at_one_instant_all_share_it(engine):
    # Given nobody holds the lease
    # When eight replicas of one handler ask at the same instant
    won = ask_together(engine, ["handlers.orders.place_order"] * ASKERS)

    # Then all of them hold it
    assert won == [True] * ASKERS


def test_a_held_lease_refuses_another_key_until_it_expires(engine):
    # Given a lease held by one key, and another that expired
    assert lease.acquire(engine, "held", "a", "w1", TTL)[0]
    assert lease.acquire(engine, "stale", "a", "w1", timedelta(seconds=-1))[0]

    # When another key asks for both
    refused, current = lease.acquire(engine, "held", "b", "w2", TTL)
    taken, _ = lease.acquire(engine, "stale", "b", "w2", TTL)

    # Then the held one is refused and still names its holder; the expired one is taken over
    assert not refused
    assert (current.key, current.holder) == ("a", "w1")
    assert not current.expired()
    assert taken
    assert {(x.name, x.key) for x in lease.listing(engine)} == {("held", "a"), ("stale", "b")}


def test_release_with_the_wrong_key_keeps_the_lease(engine):
    # Given a lease held by key a
    lease.acquire(engine, "relay", "a", "w1", TTL)

    # When it is released with key b, then with key a
    wrong, right = lease.release(engine, "relay", "b"), lease.release(engine, "relay", "a")

    # Then only the right key released it
    assert (wrong, right) == (False, True)
    assert lease.listing(engine) == []


# ---- owner leases: a worker claims all its command queues in one transaction ---------------------
def claim_together(engine: Engine) -> list[object]:
    """Every one of six askers claims all QUEUES (in its own order, with its own handler) at one instant; what each got."""
    def ask(n: int) -> object:
        order = random.Random(n).sample(QUEUES, len(QUEUES))
        return ownership.claim(engine, {q: f"handler-{n}" for q in order}, f"worker-{n}@h", TTL)

    return at_one_instant(OWNER_ASKERS, ask)


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
