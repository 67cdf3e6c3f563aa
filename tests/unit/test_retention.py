"""Retention of the bus's tables (project/store/retention.py) on a migrated SQLite file.

Each table loses its rows past their retention, in batches; what the relay still owes
(an unpublished outbox row, the inbox rows of its event) and an intake row whose key is
still claimed are kept whatever their age; settings that would let a redelivered message
run twice, or hide an expired command, stop the configuration naming the fix.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event, insert, select
from sqlalchemy.engine import Engine

from project.errors import ConfigurationError
from project.store import retention
from project.store.retention import Retention
from project.store.tables import commands, executions, inbox, intake, outbox, utcnow
from tests.unit.test_settings import celeryconfig

DAY = timedelta(days=1)
RETENTION = Retention(keys=30 * DAY, outbox=7 * DAY, inbox=30 * DAY, intake=60 * DAY)


def ago(days: float) -> Any:
    return utcnow() - timedelta(days=days)


def add(engine: Engine, table: Any, *rows: dict[str, Any]) -> None:
    with engine.begin() as conn:
        conn.execute(insert(table), list(rows))


def ids(engine: Engine, *columns: Any) -> set[Any]:
    with engine.connect() as conn:
        return {row[0] if len(row) == 1 else tuple(row) for row in conn.execute(select(*columns))}


def outbox_row(row_id: str, published_days_ago: float | None, created_days_ago: float = 100) -> dict[str, Any]:
    published = None if published_days_ago is None else ago(published_days_ago)
    return {"id": row_id, "kind": "event", "name": "events.order_placed", "payload": {},
            "created_at": ago(created_days_ago), "published_at": published}


def claim_row(key: str, days_ago: float) -> dict[str, Any]:
    return {"task": "orders.place_order", "key": key, "payload_hash": "0" * 64, "payload": {}, "status": "succeeded",
            "message_id": f"m-{key}", "duplicates": 0, "created_at": ago(days_ago)}


def intake_row(key: str, days_ago: float) -> dict[str, Any]:
    return {"id": f"c-{key}", "task": "orders.place_order", "key": key, "payload_hash": "0" * 64, "payload": {},
            "accepted_at": ago(days_ago)}


def test_published_outbox_rows_past_their_retention_go_unpublished_ones_never(engine: Engine):
    # Given published rows 8 and 6 days old, and rows 100 and 1 days old the relay has not published
    add(engine, outbox, outbox_row("old", 8), outbox_row("young", 6), outbox_row("owed", None),
        outbox_row("owed-new", None, created_days_ago=1))
    # When the bus's tables are purged (published outbox rows are kept 7 days)
    purged = retention.purge(engine, RETENTION)
    # Then only the published row past 7 days is gone; an unpublished row is never purged
    assert purged["outbox"] == 1
    assert ids(engine, outbox.c.id) == {"young", "owed", "owed-new"}


def test_cancelled_timers_go_a_retention_after_their_cancel_pending_ones_never(engine: Engine):
    # Given timers cancelled 8 and 6 days ago, and a timer due in a year (all written 100 days ago)
    def timer(row_id: str, cancelled_days_ago: float | None) -> dict[str, Any]:
        return {**outbox_row(row_id, None), "kind": "command", "name": "orders.cancel_order", "due_at": ago(-365),
                "cancelled_at": None if cancelled_days_ago is None else ago(cancelled_days_ago)}
    add(engine, outbox, timer("cancelled-old", 8), timer("cancelled-young", 6), timer("pending", None))
    # When the bus's tables are purged (outbox rows are kept 7 days after their publish or cancel)
    purged = retention.purge(engine, RETENTION)
    # Then only the timer cancelled 8 days ago is gone; a pending timer is never purged, however old
    assert purged["outbox"] == 1
    assert ids(engine, outbox.c.id) == {"cancelled-young", "pending"}


def test_inbox_rows_past_their_retention_go_unless_their_event_awaits_the_relay(engine: Engine):
    # Given inbox rows 31 days old (one of an event whose outbox row is still unpublished) and 29 days old
    add(engine, outbox, outbox_row("e-owed", None), outbox_row("e-sent", 31))
    add(engine, inbox, *({"event_id": e, "subscriber": s, "duplicates": 0, "processed_at": ago(d)}
                         for e, s, d in [("e-sent", "billing.charge_payment", 31), ("e-gone", "billing.charge_payment", 31),
                                         ("e-owed", "billing.charge_payment", 31), ("e-gone", "audit.record", 29)]))
    # When the bus's tables are purged (inbox rows are kept 30 days)
    purged = retention.purge(engine, RETENTION)
    # Then the old rows go, but the relay may still send e-owed again: its inbox row stays
    assert purged["inbox"] == 2
    assert ids(engine, inbox.c.event_id, inbox.c.subscriber) == {
        ("e-owed", "billing.charge_payment"), ("e-gone", "audit.record")}


def test_intake_rows_past_their_retention_go_unless_their_key_is_still_claimed(engine: Engine):
    # Given intake rows 61 days old (one whose command was claimed late, 10 days ago) and 59 days old
    add(engine, intake, intake_row("old", 61), intake_row("claimed-late", 61), intake_row("young", 59))
    add(engine, commands, claim_row("claimed-late", 10))
    # When the bus's tables are purged (intake rows are kept 60 days)
    purged = retention.purge(engine, RETENTION)
    # Then the old one goes; the one whose outcome is still known stays, to answer GET /commands/{id}
    assert purged["intake"] == 1
    assert ids(engine, intake.c.key) == {"claimed-late", "young"}


def test_keys_and_execution_logs_past_the_key_retention_go(engine: Engine):
    # Given keys and execution logs 31 and 29 days old
    add(engine, commands, claim_row("old", 31), claim_row("young", 29))
    add(engine, executions, *({"message_id": m, "task": "orders.place_order", "kind": "command", "state": "succeeded",
                               "attempts": 1, "started_at": ago(d), "finished_at": ago(d)}
                              for m, d in [("m-old", 31), ("m-young", 29)]))
    # When the bus's tables are purged (keys are kept 30 days)
    purged = retention.purge(engine, RETENTION)
    # Then the old key and log go
    assert (purged["keys"], purged["executions"]) == (1, 1)
    assert ids(engine, commands.c.key) == {"young"} and ids(engine, executions.c.message_id) == {"m-young"}


def test_the_purge_deletes_in_batches_of_primary_keys(engine: Engine):
    # Given 7 old inbox rows
    add(engine, inbox, *({"event_id": f"e-{n}", "subscriber": "s", "duplicates": 0, "processed_at": ago(40)}
                         for n in range(7)))
    deleted: list[int] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        if statement.lstrip().upper().startswith("DELETE FROM BUS_INBOX"):
            deleted.append(cursor.rowcount)

    # When the tables are purged 3 rows at a time
    event.listen(engine, "after_cursor_execute", record)
    try:
        purged = retention.purge(engine, RETENTION, batch=3)
    finally:
        event.remove(engine, "after_cursor_execute", record)
    # Then the inbox lost its 7 rows in three DELETEs of at most 3 rows, none a table-wide one
    assert purged["inbox"] == 7 and deleted == [3, 3, 1]
    assert ids(engine, inbox.c.event_id) == set()


def test_a_batch_must_hold_at_least_one_row(engine: Engine):
    with pytest.raises(ValueError, match="batch=0 .* use 1 or more"):
        retention.purge(engine, RETENTION, batch=0)


# ---- the rules the settings must keep -----------------------------------------------------------
REDELIVERY = timedelta(seconds=305)


def test_the_default_retentions_keep_every_rule(monkeypatch, tmp_path):
    # Given no retention set
    conf = celeryconfig(monkeypatch, tmp_path)
    # Then keys are kept 30 days, published outbox rows 7, inbox rows as long as keys, intake rows twice as long
    assert retention.configured(conf) == Retention(keys=30 * DAY, outbox=7 * DAY, inbox=30 * DAY, intake=60 * DAY)


def test_inbox_and_intake_follow_the_key_retention_unless_set(monkeypatch, tmp_path):
    # Given keys kept 90 days
    conf = celeryconfig(monkeypatch, tmp_path, BUS_KEY_RETENTION="90d")
    # Then inbox rows are kept 90 days and intake rows 180 days: raising one setting breaks no rule
    assert retention.configured(conf) == Retention(keys=90 * DAY, outbox=7 * DAY, inbox=90 * DAY, intake=180 * DAY)
    # ... and a retention set explicitly is taken as given
    conf = celeryconfig(monkeypatch, tmp_path, BUS_KEY_RETENTION="12h", BUS_INTAKE_RETENTION="2d",
                        BUS_OUTBOX_RETENTION="0s")
    assert retention.configured(conf) == Retention(keys=timedelta(hours=12), outbox=timedelta(0),
                                                   inbox=timedelta(hours=12), intake=2 * DAY)


@pytest.mark.parametrize("env, message", [
    ({"BUS_INBOX_RETENTION": "7d"},
     "BUS_INBOX_RETENTION=7d is shorter than BUS_KEY_RETENTION=30d: an event delivered again after its inbox row "
     "is purged runs its subscriber again, while a command is protected for 30d; set BUS_INBOX_RETENTION to 30d "
     "or more, or lower BUS_KEY_RETENTION"),
    ({"BUS_INTAKE_RETENTION": "10d"},
     "BUS_INTAKE_RETENTION=10d is shorter than BUS_KEY_RETENTION=30d: GET /commands/{id} would answer 404 for a "
     "command whose outcome is still kept, and never 'expired'; set BUS_INTAKE_RETENTION to 30d or more "
     "(default: twice BUS_KEY_RETENTION)"),
    ({"BUS_KEY_RETENTION": "5m", "BUS_INBOX_RETENTION": "5m"},
     "BUS_KEY_RETENTION=5m does not outlast the broker's redelivery window of 305s (BUS_VISIBILITY_TIMEOUT + "
     "BUS_UNACKED_RESTORE_INTERVAL): a command redelivered after its key is purged runs again; set "
     "BUS_KEY_RETENTION above 305s, or lower BUS_VISIBILITY_TIMEOUT"),
])
def test_a_retention_that_breaks_a_rule_stops_the_configuration_naming_the_fix(monkeypatch, tmp_path, env, message):
    # Given retentions that break a rule, When the configuration is read, Then it stops naming the fix
    with pytest.raises(ConfigurationError) as refused:
        celeryconfig(monkeypatch, tmp_path, **env)
    assert message in str(refused.value)


def test_a_short_redelivery_window_allows_short_retentions(monkeypatch, tmp_path):
    # Given a Redis visibility timeout of 60 s, When keys and inbox rows are kept 5 minutes, Then it is accepted
    conf = celeryconfig(monkeypatch, tmp_path, BUS_KEY_RETENTION="5m", BUS_VISIBILITY_TIMEOUT="60")
    assert retention.configured(conf).inbox == timedelta(minutes=5)


def test_a_malformed_retention_names_the_variable(monkeypatch, tmp_path):
    with pytest.raises(ConfigurationError, match="BUS_OUTBOX_RETENTION='a week' is not valid"):
        celeryconfig(monkeypatch, tmp_path, BUS_OUTBOX_RETENTION="a week")


def test_check_names_what_the_caller_calls_each_retention():
    # Given retentions an operator typed on the command line
    typed = {"keys": "--keys", "outbox": "--outbox", "inbox": "--inbox", "intake": "--intake"}
    # When the inbox is shorter than the keys, Then the error names the options
    with pytest.raises(ConfigurationError, match="--inbox=1d is shorter than --keys=30d"):
        retention.check(Retention(keys=30 * DAY, outbox=DAY, inbox=DAY, intake=60 * DAY), REDELIVERY, typed)


def test_beat_runs_the_purge_of_every_table_daily(engine: Engine):
    from project import app, bus
    # Given beat's schedule, and a published outbox row and an intake row past their default retentions
    assert app.conf.beat_schedule["bus-purge"] == {"task": "bus.purge", "schedule": 24 * 3600.0,
                                                   "options": {"queue": "bus.maintenance"}}
    purge = app.tasks["bus.purge"]
    add(engine, outbox, outbox_row("old", 8))
    add(engine, intake, intake_row("old", 61))
    # When the task it sends runs against the bus database
    with bus.redirected(database_url=str(engine.url), publisher=bus.publisher):
        purged = purge()
    # Then both rows are gone
    assert (purged["outbox"], purged["intake"]) == (1, 1)
    assert ids(engine, outbox.c.id) == set() and ids(engine, intake.c.id) == set()
