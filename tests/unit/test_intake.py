"""The HTTP intake's records (project/messaging/intake.py) on a migrated SQLite file: what became of a command.

A command whose key the purge has forgotten is `expired`, not `pending` for good; an
outcome or a dead letter still wins; a re-acceptance of the same key and body makes it
pending again (the send may run it anew once its key is gone).
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import insert, update
from sqlalchemy.engine import Engine

from handlers.messages import PlaceOrder
from project.errors import IdempotencyConflict
from project.messaging import intake
from project.store.retention import purge_keys
from project.store.tables import commands, dead_letters, utcnow
from project.store.tables import intake as intake_table

KEY_RETENTION = timedelta(days=30)
ORDER = {"order_id": "o-1", "customer_id": "c-1", "items": [{"sku": "book", "quantity": 2, "unit_price": "12.50"}]}


class RecordingBus:
    """What `intake.accept` uses of a bus: its engine, and a send that records instead of publishing."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.sent: list[tuple[Any, str | None]] = []

    def engine(self) -> Engine:
        return self._engine

    def send(self, command: Any, *, idempotency_key: str | None = None) -> None:
        self.sent.append((command, idempotency_key))


@pytest.fixture
def bus(engine: Engine) -> RecordingBus:
    return RecordingBus(engine)


def accepted(bus: RecordingBus, key: str = "k-1", days_ago: int = 0, **fields: Any) -> intake.Accepted:
    """Accept a PlaceOrder under `key`, as if `days_ago` days ago."""
    done = intake.accept(bus.engine(), bus.send, PlaceOrder(**{**ORDER, **fields}), key)
    backdate(bus.engine(), done.id, days_ago)
    return done


def backdate(engine: Engine, command_id: str, days: int) -> None:
    with engine.begin() as conn:
        conn.execute(update(intake_table).where(intake_table.c.id == command_id)
                     .values(accepted_at=utcnow() - timedelta(days=days)))


def finished(engine: Engine, key: str, days_ago: int, message_id: str = "m-1") -> None:
    """The claim a worker stored: the command succeeded `days_ago` days ago."""
    with engine.begin() as conn:
        conn.execute(insert(commands).values(
            task="orders.place_order", key=key, payload_hash="0" * 64, payload={}, status="succeeded",
            result={"total": "25.00"}, message_id=message_id, duplicates=0,
            created_at=utcnow() - timedelta(days=days_ago), finished_at=utcnow() - timedelta(days=days_ago)))


def state_of(engine: Engine, command_id: str) -> intake.CommandState | None:
    return intake.state(engine, command_id, expire_after=KEY_RETENTION)


def test_a_finished_command_whose_key_was_purged_is_expired_not_pending(bus: RecordingBus, engine: Engine):
    # Given a command accepted 31 days ago that succeeded then
    command = accepted(bus, days_ago=31)
    finished(engine, "k-1", days_ago=31)
    assert state_of(engine, command.id).status == "succeeded"
    # When keys past the 30-day retention are purged
    assert purge_keys(engine, utcnow() - KEY_RETENTION)["keys"] == 1
    # Then the command is reported expired: its outcome is no longer known
    assert state_of(engine, command.id) == intake.CommandState(command.id, "orders.place_order", "expired")


def test_a_young_command_without_an_outcome_is_pending(bus: RecordingBus, engine: Engine):
    # Given a command accepted a day ago that no worker finished yet
    command = accepted(bus, days_ago=1)
    # When its state is asked, Then it is pending
    assert state_of(engine, command.id).status == "pending"


def test_an_outcome_or_a_dead_letter_wins_over_age(bus: RecordingBus, engine: Engine):
    # Given two commands accepted 40 days ago: one whose claim (made late) is still kept, one dead-lettered
    kept = accepted(bus, "k-kept", days_ago=40)
    finished(engine, "k-kept", days_ago=2)
    dead = accepted(bus, "k-dead", days_ago=40, order_id="o-2")
    with engine.begin() as conn:
        conn.execute(insert(dead_letters).values(message_id=dead.id, task="orders.place_order",
                                                 reason="retries-exhausted", error="ConnectionError: down"))
    # When their states are asked, Then the outcome and the dead letter are reported, not expiry
    assert state_of(engine, kept.id).status == "succeeded"
    assert state_of(engine, dead.id).status == "dead-lettered"


def test_re_accepting_an_expired_command_makes_it_pending_again(bus: RecordingBus, engine: Engine):
    # Given a command accepted 31 days ago whose key is gone
    first = accepted(bus, days_ago=31)
    assert state_of(engine, first.id).status == "expired"
    # When the same key and body are accepted again
    again = intake.accept(bus.engine(), bus.send, PlaceOrder(**ORDER), "k-1")
    # Then it is the same command, sent again, and pending until a worker runs it
    assert (again.id, again.duplicate) == (first.id, True)
    assert [key for _, key in bus.sent] == ["k-1", "k-1"]
    assert state_of(engine, first.id).status == "pending"


def test_the_same_key_with_another_body_is_still_a_conflict(bus: RecordingBus, engine: Engine):
    # Given an accepted command
    accepted(bus, days_ago=31)
    # When the same key comes with another customer, Then it is refused naming the field, and not sent
    with pytest.raises(IdempotencyConflict, match="customer_id"):
        intake.accept(bus.engine(), bus.send, PlaceOrder(**{**ORDER, "customer_id": "c-2"}), "k-1")
    assert len(bus.sent) == 1


def test_an_id_this_intake_never_accepted_is_unknown(engine: Engine):
    assert state_of(engine, "no-such-command") is None


def test_a_resend_absorbed_by_the_claim_does_not_make_a_purged_command_pending(bus: RecordingBus, engine: Engine):
    # Given a command accepted and finished 31 days ago, and resent yesterday while its claim still held the key
    command = accepted(bus, days_ago=31)
    finished(engine, "k-1", days_ago=31)
    assert intake.accept(bus.engine(), bus.send, PlaceOrder(**ORDER), "k-1").duplicate
    # When keys past the 30-day retention are purged
    assert purge_keys(engine, utcnow() - KEY_RETENTION)["keys"] == 1
    # Then the command reads expired: the resend ran nothing, so it did not renew the acceptance
    assert state_of(engine, command.id).status == "expired"
