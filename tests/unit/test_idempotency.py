"""Idempotency claims on a real SQLite file at the migrations' head (the bus's own engine).

claim -> handler -> finish happen in one transaction: a rollback (a crash before
commit) leaves no claim; a committed claim makes every later claim of the key fail and
hands back the stored outcome.
"""
from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from project import idempotency
from project.db import commands, utcnow
from project.uow import UnitOfWork

TASK = "orders.place_order"
PAYLOAD = {"order_id": "o-1", "customer_id": "c-1", "items": [{"sku": "book", "quantity": 2}]}



def claim(engine: Engine, key: str = "k", digest: str = "h1", payload: dict = PAYLOAD, *,
          result=None, commit: bool = True) -> bool:
    with UnitOfWork(engine) as uow:
        claimed = idempotency.claim(uow.session, TASK, key, digest, payload, "message-1")
        if claimed:
            idempotency.finish(uow.session, TASK, key, result=result)
        if commit:
            uow.commit()
    return claimed


def stored(engine: Engine, key: str = "k") -> idempotency.Outcome:
    with UnitOfWork(engine) as uow:
        return idempotency.previous(uow.session, TASK, key)


def test_the_first_claim_wins_and_stores_the_outcome(engine):
    # Given a new key, When it is claimed and finished with a result
    assert claim(engine, result={"order_id": "o-1"}) is True
    # Then the outcome is stored with the payload and its hash
    outcome = stored(engine)
    assert (outcome.status, outcome.result, outcome.payload_hash, outcome.payload) == (
        "succeeded", {"order_id": "o-1"}, "h1", PAYLOAD)


def test_a_second_claim_of_the_key_fails_and_finds_the_first_outcome(engine):
    claim(engine, result={"order_id": "o-1"})
    assert claim(engine, result={"order_id": "OTHER"}) is False
    assert stored(engine).result == {"order_id": "o-1"}


def test_the_same_key_of_another_command_is_another_claim(engine):
    claim(engine)
    with UnitOfWork(engine) as uow:
        assert idempotency.claim(uow.session, "accounts.register_user", "k", "h1", {}, "m") is True


def test_a_rolled_back_claim_leaves_nothing_so_the_redelivery_runs(engine):
    # Given a claim whose transaction never commits (the worker died before commit)
    assert claim(engine, commit=False) is True
    # When the message is redelivered, Then its claim succeeds
    assert claim(engine, result={"run": 2}) is True
    assert stored(engine).result == {"run": 2}


def test_absorbed_counts_duplicates(engine):
    claim(engine)
    for _ in range(3):
        with UnitOfWork(engine) as uow:
            idempotency.absorbed(uow.session, TASK, "k")
            uow.commit()
    with engine.connect() as conn:
        assert conn.execute(select(commands.c.duplicates)).scalar_one() == 3


def test_a_domain_error_is_stored_as_a_failed_outcome(engine):
    with UnitOfWork(engine) as uow:
        idempotency.claim(uow.session, TASK, "k", "h1", PAYLOAD, "m")
        idempotency.finish(uow.session, TASK, "k", error_type="handlers.accounts.EmailAlreadyRegistered",
                           error_message="taken")
        uow.commit()
    outcome = stored(engine)
    assert (outcome.status, outcome.error_type, outcome.error_message) == (
        "failed", "handlers.accounts.EmailAlreadyRegistered", "taken")


def test_a_concurrent_claim_waits_for_the_first_transaction_then_fails(engine):
    # Given one transaction holding a fresh claim, not yet committed
    first_claimed, release, second = threading.Event(), threading.Event(), {}

    def first() -> None:
        with UnitOfWork(engine) as uow:
            idempotency.claim(uow.session, TASK, "k", "h1", PAYLOAD, "m1")
            first_claimed.set()
            release.wait(10)
            idempotency.finish(uow.session, TASK, "k", result={"by": "first"})
            uow.commit()

    def duplicate() -> None:
        with UnitOfWork(engine) as uow:
            second["claimed"] = idempotency.claim(uow.session, TASK, "k", "h1", PAYLOAD, "m2")
            second["outcome"] = idempotency.previous(uow.session, TASK, "k")
            second["at"] = time.monotonic()

    one = threading.Thread(target=first)
    one.start()
    assert first_claimed.wait(10)
    # When a duplicate claims the same key meanwhile
    two = threading.Thread(target=duplicate)
    two.start()
    time.sleep(0.3)
    committed_at = time.monotonic()
    release.set()
    one.join(10)
    two.join(10)
    # Then it waited for the first commit, lost, and sees the first outcome
    assert second["claimed"] is False
    assert second["at"] >= committed_at
    assert second["outcome"].result == {"by": "first"}


def test_differing_fields_names_every_changed_added_or_removed_field():
    first = {"order_id": "o-1", "customer_id": "c-1", "items": [1], "note": "x"}
    second = {"order_id": "o-1", "customer_id": "c-2", "items": [2], "gift": True}
    assert idempotency.differing_fields(first, second) == ["customer_id", "gift", "items", "note"]
    assert idempotency.differing_fields(first, dict(first)) == []


def test_purge_forgets_keys_claimed_before_the_given_time(engine):
    claim(engine, key="old")
    claim(engine, key="new")
    with engine.begin() as conn:
        conn.execute(update(commands).where(commands.c.key == "old").values(created_at=utcnow() - timedelta(days=8)))
    with UnitOfWork(engine) as uow:
        assert idempotency.purge(uow.session, utcnow() - timedelta(days=7)) == 1
        uow.commit()
    with engine.connect() as conn:
        assert set(conn.execute(select(commands.c.key)).scalars()) == {"new"}
    # a forgotten key can be claimed again
    assert claim(engine, key="old") is True
