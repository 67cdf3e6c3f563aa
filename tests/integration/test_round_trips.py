"""Round trips to PostgreSQL per message, on a real server (the bus in process, no broker).

Each statement is a network round trip, and on a busy machine each one waits for a
PostgreSQL backend to be scheduled: most of what the bus adds to a message. A command
costs BEGIN, its claim, the handler's statements, one statement for the stored result
and the execution log, and COMMIT; a subscriber BEGIN, its inbox claim, the handler's
statements, the log and COMMIT. A pooled connection is pinged only after sitting idle.
"""
from __future__ import annotations

from typing import Iterator

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.exc import OperationalError

from handlers.messages import UserAccountCreated
from project.headers import EVENT_ID
from project.messaging.execution import Delivery
from project.store import engine as db
from project.store.tables import commands, executions, inbox
from project.store.uow import UnitOfWork
from tests.databases import migrated_database
from tests.integration.support.scenarios import PG_ADMIN_URL
from tests.statements import statements, until_commit

pytestmark = pytest.mark.integration
REGISTER = "accounts.register_user"
WELCOME = "notifications.send_welcome_email"


@pytest.fixture(scope="module")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh PostgreSQL database at the migrations' head."""
    with migrated_database("postgresql", tmp_path_factory.mktemp("round-trips")) as url:
        yield url


@pytest.fixture
def harness(database_url: str):
    """The in-process harness of the reference domain, on the PostgreSQL database."""
    from project.testing.harness import BusHarness
    from project.testing.pytest_plugin import _loaded_bus
    with BusHarness(_loaded_bus(), database_url) as harness:
        yield harness


def test_a_command_sends_its_claim_the_handlers_statements_and_one_for_result_and_log(harness, uid: str):
    # Given a registration nobody sent before
    bus = harness.bus
    fields = {"user_id": f"u-{uid}", "email": f"ada-{uid}@example.com", "name": "Ada", "idempotency_key": uid}
    # When its command runs once
    with statements(bus.engine()) as seen:
        bus.execution.command(bus.registry.commands[REGISTER], fields, Delivery(REGISTER, f"m-{uid}"))
    # Then PostgreSQL got the claim, a savepoint (a refusal keeps the claim), the handler's
    # three statements, and the stored result with the execution log as one statement (plus
    # BEGIN and COMMIT, which psycopg sends); the harness's publish of the event comes after the commit
    assert until_commit(seen) == ["INSERT bus_commands", "SAVEPOINT", "SELECT users", "INSERT users", "INSERT bus_outbox",
                                  "UPDATE bus_commands + INSERT bus_executions", "COMMIT"], seen
    # and the combined statement wrote both rows
    with bus.engine().connect() as conn:
        assert conn.execute(select(commands.c.status, commands.c.result).where(commands.c.key == uid)).one() == (
            "succeeded", {"user_id": f"u-{uid}"})
        assert conn.execute(select(executions.c.state).where(executions.c.message_id == f"m-{uid}")).scalar_one() \
            == "succeeded"


def test_a_duplicate_gets_the_stored_result_without_running(harness, uid: str):
    # Given a registration that ran
    bus = harness.bus
    fields = {"user_id": f"u-{uid}", "email": f"ada-{uid}@example.com", "name": "Ada", "idempotency_key": uid}
    first = bus.execution.command(bus.registry.commands[REGISTER], fields, Delivery(REGISTER, f"m-{uid}"))
    # When it is delivered again
    again = bus.execution.command(bus.registry.commands[REGISTER], fields, Delivery(REGISTER, f"m-{uid}"))
    # Then the stored result comes back and the handler did not run
    assert (first.ran, again.ran, again.value) == (True, False, {"user_id": f"u-{uid}"})


def test_a_subscriber_sends_its_inbox_claim_the_handlers_statements_and_the_log(harness, uid: str):
    # Given an event the welcome mail has not handled
    bus = harness.bus
    fields = {**UserAccountCreated(user_id=f"u-{uid}", email="ada@example.com", name="Ada").payload(),
              EVENT_ID: f"e-{uid}"}
    # When the subscriber runs it
    with statements(bus.engine()) as seen:
        bus.execution.subscriber(bus.registry.subscribers[WELCOME], fields, Delivery(WELCOME, f"m-{uid}"))
    # Then PostgreSQL got the inbox claim, the handler's statement and the log
    assert until_commit(seen) == ["INSERT bus_inbox", "INSERT port_calls", "INSERT bus_executions", "COMMIT"], seen
    with bus.engine().connect() as conn:
        assert conn.execute(select(inbox.c.subscriber).where(inbox.c.event_id == f"e-{uid}")).scalar_one() == WELCOME


def cut_connections(database_url: str) -> int:
    """Terminate every server process of the database (as a restart or a proxy timeout would)."""
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            return len(conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                         "WHERE datname = :d AND pid <> pg_backend_pid()"),
                                    {"d": database_url.rsplit("/", 1)[1]}).all())
    finally:
        admin.dispose()


def one_transaction(engine) -> None:
    with UnitOfWork(engine) as uow:
        uow.session.execute(text("SELECT 1"))
        uow.commit()


def test_a_connection_idle_past_the_threshold_is_pinged_and_replaced_when_dead(database_url, monkeypatch):
    # Given a pooled connection whose server process was terminated while it sat idle
    db.dispose(database_url)
    engine = db.engine_for(database_url)
    one_transaction(engine)
    assert cut_connections(database_url) >= 1
    # When it is checked out after the idle threshold
    monkeypatch.setattr(db, "PING_AFTER_IDLE", 0.0)
    # Then the ping finds it dead and the transaction runs on a fresh connection
    one_transaction(engine)


def test_a_connection_used_a_moment_ago_is_not_pinged(database_url, monkeypatch):
    # Given a pooled connection used a moment ago, whose server process is then terminated
    db.dispose(database_url)
    engine = db.engine_for(database_url)
    one_transaction(engine)
    monkeypatch.setattr(db, "PING_AFTER_IDLE", 3600.0)
    assert cut_connections(database_url) >= 1
    # When it is checked out again at once, Then no round trip was spent on a ping: the
    # transaction meets the cut (a transient error, which the retry policies retry)
    with pytest.raises(OperationalError):
        one_transaction(engine)
    # and the pool replaced it for the next one
    one_transaction(engine)
