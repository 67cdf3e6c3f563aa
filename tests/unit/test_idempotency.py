"""Idempotency claims on a real SQLite file at the migrations' head (the bus's own engine).

claim -> handler -> finish happen in one transaction: a rollback (a crash before
commit) leaves no claim; a committed claim makes every later claim of the key fail and
hands back the stored outcome.

The execution around the claim (project/messaging/execution.py), on SQLite and on a PostgreSQL
database of its own: a key purged between a duplicate's claim and its read is claimed
again; a redelivery that finds its execution committed hands the rows that execution left
unpublished to the publisher, and a duplicate that waited on the claim leaves them to it.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from typing import Iterator

import pytest
from celery import Celery
from sqlalchemy import event, select, text, update
from sqlalchemy.engine import Engine

from handlers.messages import OrderPlaced, PlaceOrder
from project.contracts import DomainError
from project.core import Bus
from project.messaging.execution import Delivery, Executed
from project.store import idempotency, retention
from project.store.tables import commands, dead_letters, executions, outbox, utcnow
from project.store.uow import UnitOfWork
from tests.databases import migrated_database
from tests.statements import statements

TASK = "orders.place_order"
PAYLOAD = {"order_id": "o-1", "customer_id": "c-1", "items": [{"sku": "book", "quantity": 2}]}



def claim(engine: Engine, key: str = "k", digest: str = "h1", payload: dict = PAYLOAD, *,
          result=None, commit: bool = True) -> bool:
    with UnitOfWork(engine) as uow:
        claimed = idempotency.claim(uow.session, TASK, key, digest, payload, "message-1")
        if claimed:
            uow.write(idempotency.finished(TASK, key, result=result))
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
        uow.write(idempotency.finished(TASK, "k", error_type="handlers.accounts.EmailAlreadyRegistered",
                                       error_message="taken"))
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
            uow.write(idempotency.finished(TASK, "k", result={"by": "first"}))
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
    assert retention.purge_keys(engine, utcnow() - timedelta(days=7))["keys"] == 1
    with engine.connect() as conn:
        assert set(conn.execute(select(commands.c.key)).scalars()) == {"new"}
    # a forgotten key can be claimed again
    assert claim(engine, key="old") is True


# ---- the execution around the claim, on SQLite and PostgreSQL ------------------------------------
ITEMS = [{"sku": "book", "quantity": 2, "unit_price": "12.50"}]


class RecordingPublisher:
    """The bus's publisher as a fake: records the ids it is handed and publishes nothing.

    Rows it is handed stay unpublished, as when the process dies in the hand-off.
    """

    def __init__(self) -> None:
        self.handed: list[list[str]] = []

    def publish(self, ids: list[str]) -> None:
        self.handed.append(list(ids))


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """The URL of a fresh database at the migrations' head: a SQLite file, or a PostgreSQL database of its own."""
    with migrated_database(request.param, tmp_path) as url:
        yield url


class OrderRefused(DomainError):
    """The lab's business rule refused the order."""


@dataclass
class Lab:
    """A bus whose PlaceOrder handler records its runs (and, if `announce`, publishes OrderPlaced)."""

    bus: Bus
    publisher: RecordingPublisher
    ran: list[str] = field(default_factory=list)
    announce: bool = True
    refuse: bool = False  # raise OrderRefused after publishing
    #: set by the handler once it runs; it then waits for `release` (when `hold`)
    holding: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    hold: bool = False


@pytest.fixture
def lab(tmp_path, database: str) -> Iterator[Lab]:
    app = Celery(f"unit-{tmp_path.name}", broker="memory://", set_as_current=False)
    lab = Lab(Bus(app), RecordingPublisher())

    def place_order(cmd: PlaceOrder, *, events) -> dict:
        lab.ran.append(cmd.order_id)
        if lab.announce:
            events.publish(OrderPlaced(order_id=cmd.order_id, customer_id=cmd.customer_id, total=Decimal("25.00")))
        lab.holding.set()
        if lab.hold:
            lab.release.wait(10)
        if lab.refuse:
            raise OrderRefused(f"order {cmd.order_id} refused (run {len(lab.ran)})")
        return {"order_id": cmd.order_id}

    lab.bus.command(PlaceOrder)(place_order)
    with lab.bus.redirected(database_url=database, publisher=lab.publisher):
        yield lab
    app.close()


def deliver(bus: Bus, key: str = "k", message_id: str = "m-1", started_at=None, **fields) -> Executed:
    """One delivery of PlaceOrder under `key`, as a worker's execution gets it."""
    body = {"order_id": "o-1", "customer_id": "c-1", "items": ITEMS, **fields, "idempotency_key": key}
    delivery = Delivery(name="orders.place_order", message_id=message_id, started_at=started_at or utcnow())
    return bus.execution.command(bus.registry.commands["orders.place_order"], body, delivery)


@contextmanager
def purge_before_reading_the_claim(engine: Engine) -> Iterator[list[str]]:
    """Purge every key once, right before the next read of a claim (after that delivery's INSERT found the key).

    PostgreSQL: a real purge, committed by another connection (INSERT .. ON CONFLICT DO
    NOTHING does not lock the row it finds). SQLite: the same DELETE in the delivery's own
    transaction (another connection would wait for its write lock: SQLite cannot meet
    this race for real).
    """
    purged: list[str] = []

    def before(conn, cursor, statement: str, *_: object) -> None:
        if purged or not statement.lstrip().upper().startswith("SELECT") or "FROM bus_commands" not in statement:
            return
        purged.append(statement)  # first: the purge's own read of bus_commands comes through here too
        if engine.dialect.name == "sqlite":
            cursor.connection.execute("DELETE FROM bus_commands")
        else:
            retention.purge_keys(engine, utcnow())

    event.listen(engine, "before_cursor_execute", before)
    try:
        yield purged
    finally:
        event.remove(engine, "before_cursor_execute", before)


def test_a_key_purged_between_a_duplicates_claim_and_its_read_is_claimed_again(lab: Lab):
    # Given a command handled under key k (that publishes nothing: a re-run after a purge
    # would write its event's row, whose id derives from the key, a second time)
    bus, lab.announce = lab.bus, False
    assert deliver(bus).ran
    # When its duplicate's claim finds the key, and the key is purged before it reads the outcome
    with purge_before_reading_the_claim(bus.engine()) as purged:
        executed = deliver(bus)
    # Then the duplicate claims the forgotten key again and runs: nothing fails, nothing is dead-lettered
    assert purged, "the key was not purged between the claim and the read: the test proved nothing"
    assert executed.ran and executed.value == {"order_id": "o-1"}
    assert lab.ran == ["o-1", "o-1"]
    with bus.engine().connect() as conn:
        assert conn.execute(select(dead_letters.c.reason)).all() == []


def test_a_redelivery_after_the_commit_publishes_what_its_execution_left_unpublished(lab: Lab):
    # Given an execution that committed an event, whose process died in the hand-off (nothing published)
    bus, publisher = lab.bus, lab.publisher
    first = deliver(bus)
    [written] = publisher.handed
    # When its message is redelivered (it starts after that commit)
    again = deliver(bus)
    # Then the redelivery gets the stored result and hands the committed, unpublished rows to the publisher
    assert (first.ran, again.ran, again.value) == (True, False, {"order_id": "o-1"})
    assert publisher.handed == [written, written] and len(written) == 1
    assert lab.ran == ["o-1"]


def test_a_duplicate_that_waited_on_the_claim_leaves_the_publishing_to_the_execution(lab: Lab):
    # Given a duplicate that started before the execution committed (it waited on the claim):
    # the executing process hands its rows to the publisher right after its commit
    bus, publisher = lab.bus, lab.publisher
    waiting_since = utcnow()
    deliver(bus)
    # When the duplicate gets the stored outcome
    again = deliver(bus, started_at=waiting_since)
    # Then it publishes nothing itself (no second copy of the event)
    assert again.ran is False
    assert publisher.handed[1:] == [[]]


def test_a_duplicate_publishes_nothing_once_the_rows_are_published(lab: Lab):
    # Given an execution whose rows were published after its commit
    bus, publisher = lab.bus, lab.publisher
    deliver(bus)
    with bus.engine().begin() as conn:
        conn.execute(update(outbox).values(published_at=utcnow()))
    # When a duplicate arrives later, Then it hands nothing to the publisher
    deliver(bus)
    assert publisher.handed[1:] == [[]]


def test_a_refusal_undoes_the_handler_keeps_the_claim_and_stores_itself_in_the_same_transaction(lab: Lab):
    # Given a handler that publishes an event, then refuses
    lab.refuse = True
    # When its command runs
    with statements(lab.bus.engine()) as seen, pytest.raises(OrderRefused):
        deliver(lab.bus)
    # Then one transaction (one BEGIN, one COMMIT) undid the event's row and stored the
    # refusal with its log entry, under the claim it kept
    assert sum(s.startswith("BEGIN") for s in seen) <= 1 and seen.count("COMMIT") == 1, seen
    with lab.bus.engine().connect() as conn:
        assert conn.execute(select(commands.c.status, commands.c.error_type, commands.c.message_id)).one() == (
            "failed", f"{__name__}.OrderRefused", "m-1")
        assert conn.execute(select(executions.c.state, executions.c.error)).one() == (
            "refused", "OrderRefused: order o-1 refused (run 1)")
        assert conn.execute(select(outbox.c.id)).all() == []
    # and a duplicate gets the same refusal without running
    with pytest.raises(OrderRefused, match=r"order o-1 refused \(run 1\)"):
        deliver(lab.bus)
    assert lab.ran == ["o-1"] and lab.publisher.handed == []


def waiting_on_a_lock(engine: Engine) -> bool:
    """PostgreSQL: some transaction waits for a lock (the duplicate's claim of the key)."""
    with engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                 "AND wait_event_type = 'Lock'")).scalar_one() >= 1


def test_a_duplicate_waiting_on_a_refusing_execution_gets_its_refusal_without_running(lab: Lab):
    # Given an execution of key k whose handler holds its transaction, then refuses
    lab.refuse, lab.hold, outcomes = True, True, {}

    def run(name: str) -> None:
        try:
            deliver(lab.bus)
        except DomainError as exc:
            outcomes[name] = str(exc)

    first = threading.Thread(target=run, args=("first",))
    first.start()
    assert lab.holding.wait(10)
    # When a duplicate of k arrives meanwhile and waits on the claim
    second = threading.Thread(target=run, args=("second",))
    second.start()
    if lab.bus.engine().dialect.name == "postgresql":
        deadline = time.monotonic() + 10
        while not waiting_on_a_lock(lab.bus.engine()):
            assert time.monotonic() < deadline, "the duplicate never waited on the claim"
            time.sleep(0.02)
    else:
        time.sleep(0.3)  # SQLite shows no waiter: time for the duplicate's BEGIN IMMEDIATE to wait
    lab.release.set()
    first.join(10)
    second.join(10)
    # Then the handler ran once, and both deliveries ended with its refusal
    assert lab.ran == ["o-1"]
    assert outcomes == {"first": "order o-1 refused (run 1)", "second": "order o-1 refused (run 1)"}
