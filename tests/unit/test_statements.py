"""What one delivery costs the database: the statements of a command's and a subscriber's transaction.

On PostgreSQL every statement is a network round trip, which is most of what the bus
adds to a message (docs/benchmarks.md). These tests pin the bus's share, so that one
more statement per message is a decision, not an accident. PostgreSQL's own count is
in tests/integration/test_round_trips.py.
"""
from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.dialects import postgresql

from handlers.messages import UserAccountCreated
from project.headers import EVENT_ID
from project.messaging.execution import Delivery
from project.store import execution_log as trace
from project.store import idempotency
from project.store.tables import commands, executions
from project.store.uow import _together
from tests.statements import statements, until_commit

REGISTER = "accounts.register_user"
WELCOME = "notifications.send_welcome_email"


def test_a_command_is_one_transaction_of_claim_handler_result_and_log(bus_harness):
    # Given a registration nobody sent before
    bus = bus_harness.bus
    fields = {"user_id": "u-1", "email": "ada@example.com", "name": "Ada", "idempotency_key": "k-1"}
    # When its command runs once
    with statements(bus.engine()) as seen:
        bus.execution.command(bus.registry.commands[REGISTER], fields, Delivery(REGISTER, "m-1"))
    # Then its transaction is the claim, a savepoint (a domain refusal rolls back to it and
    # keeps the claim), the handler's own statements, the stored result and the execution
    # log, in one commit (on PostgreSQL the last two are one statement)
    assert until_commit(seen) == ["BEGIN IMMEDIATE", "INSERT bus_commands", "SAVEPOINT",
                                  "SELECT users", "INSERT users", "INSERT bus_outbox",
                                  "UPDATE bus_commands", "INSERT bus_executions", "COMMIT"]
    # and both the result and the log were written
    with bus.engine().connect() as conn:
        assert conn.execute(select(commands.c.status, commands.c.result)).one() == ("succeeded", {"user_id": "u-1"})
        assert conn.execute(select(executions.c.state, executions.c.task)).one() == ("succeeded", REGISTER)


def test_a_subscriber_is_one_transaction_of_inbox_claim_handler_and_log(bus_harness):
    # Given an event a subscriber has not handled
    bus = bus_harness.bus
    event_fields = UserAccountCreated(user_id="u-1", email="ada@example.com", name="Ada").payload()
    # When the subscriber runs it
    with statements(bus.engine()) as seen:
        bus.execution.subscriber(bus.registry.subscribers[WELCOME], {**event_fields, EVENT_ID: "e-1"},
                                 Delivery(WELCOME, "m-2"))
    # Then its transaction is the inbox claim, the handler's statement and the log
    assert until_commit(seen) == ["BEGIN IMMEDIATE", "INSERT bus_inbox", "INSERT port_calls",
                                  "INSERT bus_executions", "COMMIT"]


def test_on_postgresql_the_stored_result_and_the_log_are_one_statement():
    # Given the two writes that end a command's transaction
    binding = type("Binding", (), {"name": REGISTER, "boundary": "accounts"})()
    writes = [idempotency.finished(REGISTER, "k-1", result={"user_id": "u-1"}),
              trace.succeeded("postgresql", binding, Delivery(REGISTER, "m-1"))]
    # When UnitOfWork.write combines them for PostgreSQL
    sql = str(_together(tuple(w[0] for w in writes)).compile(dialect=postgresql.dialect()))
    # Then they are one statement: the UPDATE runs as a WITH clause of the log's INSERT
    assert re.match(r"WITH write_0 AS\s+\(UPDATE bus_commands SET .*\)\s+INSERT INTO bus_executions", sql, re.S), sql
    # and their parameters do not collide
    assert not writes[0][1].keys() & writes[1][1].keys()

