"""Durable timers without a worker: where a delayed send goes, what publishers take, cancelling, the setting.

A bus on kombu's in-memory transport (a fake broker that records what was published) and
a real SQLite database at the migrations' head: a delay up to BUS_TIMER_THRESHOLD is
Celery's ETA (a message now, with its eta), a longer one is a row of the outbox with a
due time and no message. The publishers (project/messaging/outbox.py) take a timer only
within the lookahead, a cancelled one never; `cancel` (project/store/timers.py) stops a
timer no publisher has. Real workers and brokers: tests/integration/test_timers.py.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from handlers.messages import OrderPlaced, PlaceOrder
from project.cli.main import cli
from project.core import Bus
from project.errors import ConfigurationError
from project.messaging import outbox
from project.messaging.sending import prepare
from project.store import backlog, timers
from project.store.tables import as_utc, utcnow
from project.store.tables import outbox as outbox_table
from project.store.uow import UnitOfWork
from project.testing.timers import due_now
from tests.unit.test_sending import FIELDS, drain, memory_bus
from tests.unit.test_settings import celeryconfig

QUEUE = "orders.place_order"
KEY = "checkout-77"


@pytest.fixture
def bus(engine: Engine, tmp_path: Path) -> Iterator[Bus]:
    """A bus on the in-memory transport with PlaceOrder bound, its store the unit `engine`'s database."""
    yield from memory_bus(f"timers-{tmp_path.name}", tmp_path, str(engine.url))


def rows(engine: Engine) -> list:
    with engine.connect() as conn:
        return list(conn.execute(select(outbox_table).order_by(outbox_table.c.created_at)))


def write_timer(engine: Engine, row_id: str, due_in: timedelta, kind: str = "command", name: str = QUEUE) -> None:
    with engine.begin() as conn:
        conn.execute(outbox_table.insert().values(id=row_id, kind=kind, name=name, payload={"order_id": row_id},
                                                  created_at=utcnow(), due_at=utcnow() + due_in))


def state(engine: Engine, row_id: str) -> tuple[bool, bool]:
    """(published, cancelled) of the row."""
    with engine.connect() as conn:
        row = conn.execute(select(outbox_table).where(outbox_table.c.id == row_id)).one()
    return row.published_at is not None, row.cancelled_at is not None


# ---- where a delayed send goes -------------------------------------------------------------
def test_a_countdown_at_the_threshold_is_celerys_eta_and_one_past_it_is_a_timer(bus, engine):
    # Given the default threshold of 60 s
    # When a command is sent 60 s ahead, and another 61 s ahead
    at = bus.place_order.apply_async(kwargs={**FIELDS, "order_id": "o-60"}, countdown=60)
    past = bus.place_order.apply_async(kwargs={**FIELDS, "order_id": "o-61"}, countdown=61)

    # Then the first is a message now, with Celery's eta, and no timer
    [message] = drain(bus)
    assert message["headers"]["id"] == at.id and message["headers"]["eta"]
    # And the second is no message but a timer in the outbox, under the task id the send would have had
    [row] = rows(engine)
    assert (row.id, row.kind, row.name) == (past.id, "command", QUEUE)
    assert past.id == prepare(PlaceOrder, {**FIELDS, "order_id": "o-61"}, None)[1]
    assert row.payload == prepare(PlaceOrder, {**FIELDS, "order_id": "o-61"}, None)[0]
    assert timedelta(seconds=60) < as_utc(row.due_at) - as_utc(row.created_at) <= timedelta(seconds=61.5)
    assert row.correlation_id == past.id and row.published_at is None


def test_bus_send_with_an_eta_past_the_threshold_is_a_timer_due_then(bus, engine):
    # Given an eta two hours ahead, in another time zone
    due = datetime.now(timezone(timedelta(hours=2))).replace(microsecond=0) + timedelta(hours=2)
    # When bus.send sends a command with it
    result = bus.send(PlaceOrder(**FIELDS), idempotency_key=KEY, eta=due)
    # Then nothing is published, and the timer is due at that instant, under the key's task id
    assert drain(bus) == []
    [row] = rows(engine)
    assert row.id == result.id == prepare(PlaceOrder, FIELDS, KEY)[1]
    assert as_utc(row.due_at) == due


def test_the_same_key_sent_twice_with_a_delay_is_one_timer(bus, engine):
    # When one key is sent twice two hours ahead, through both senders
    first = bus.place_order.apply_async(kwargs=FIELDS, idempotency_key=KEY, countdown=7200)
    second = bus.send(PlaceOrder(**FIELDS), idempotency_key=KEY, countdown=7300)
    # Then both results name one timer, the first one written
    [row] = rows(engine)
    assert first.id == second.id == row.id
    assert as_utc(row.due_at) - as_utc(row.created_at) < timedelta(seconds=7201)


def test_the_threshold_is_the_apps_setting(bus, engine):
    # Given a threshold of 5 s, When a command is sent 6 s ahead, Then it is a timer
    bus.app.conf.bus_timer_threshold = 5
    bus.place_order.apply_async(kwargs=FIELDS, countdown=6)
    assert drain(bus) == [] and len(rows(engine)) == 1


def test_a_retry_keeps_celerys_eta_whatever_its_countdown(bus, engine):
    # Given a retry's publish (Celery's retry() passes `retries`), longer than the threshold
    bus.app.conf.bus_timer_threshold = 5
    # When it is published, Then it is a message with its eta, not a timer
    bus.place_order.apply_async(kwargs=FIELDS, countdown=8, retries=1)
    assert len(drain(bus)) == 1 and rows(engine) == []


def test_an_option_a_timer_cannot_keep_is_refused_naming_the_fix(bus, engine):
    # When a command is sent two hours ahead with a priority
    with pytest.raises(ValueError) as refused:
        bus.place_order.apply_async(kwargs=FIELDS, countdown=7200, priority=5)
    # Then nothing is written or published, and the error says what to do
    assert str(refused.value) == (
        "orders.place_order is delayed 7200 s, past BUS_TIMER_THRESHOLD (60 s): it waits in the outbox as a durable "
        "timer, which keeps its fields and route only, so priority would be lost. Send it without priority, or with "
        "a delay of at most 60 s")
    assert rows(engine) == [] and drain(bus) == []


# ---- BUS_TIMER_THRESHOLD -------------------------------------------------------------------
def test_the_threshold_is_60_seconds_or_half_a_shorter_visibility_timeout_by_default(monkeypatch, tmp_path):
    assert celeryconfig(monkeypatch, tmp_path)["bus_timer_threshold"] == 60
    assert celeryconfig(monkeypatch, tmp_path, BUS_VISIBILITY_TIMEOUT="11")["bus_timer_threshold"] == 5
    assert celeryconfig(monkeypatch, tmp_path, BUS_TIMER_THRESHOLD="0")["bus_timer_threshold"] == 0


@pytest.mark.parametrize("env, message", [
    ({"BUS_TIMER_THRESHOLD": "300"},
     "BUS_TIMER_THRESHOLD=300 must be below BUS_VISIBILITY_TIMEOUT=300: a delay up to the threshold waits in a worker "
     "unacknowledged, and past the visibility timeout Redis hands it to another worker (it runs twice). Lower "
     "BUS_TIMER_THRESHOLD below 300 (or unset it: 60 s here), or raise BUS_VISIBILITY_TIMEOUT above 300"),
    ({"BUS_TIMER_THRESHOLD": "60", "BUS_VISIBILITY_TIMEOUT": "30"},
     "BUS_TIMER_THRESHOLD=60 must be below BUS_VISIBILITY_TIMEOUT=30: a delay up to the threshold waits in a worker "
     "unacknowledged, and past the visibility timeout Redis hands it to another worker (it runs twice). Lower "
     "BUS_TIMER_THRESHOLD below 30 (or unset it: 15 s here), or raise BUS_VISIBILITY_TIMEOUT above 60"),
    ({"BUS_TIMER_THRESHOLD": "-1"}, "BUS_TIMER_THRESHOLD='-1' is not valid; use a whole number >= 0 (default 60)"),
    ({"BUS_TIMER_THRESHOLD": "1m"}, "BUS_TIMER_THRESHOLD='1m' is not valid; use a whole number >= 0 (default 60)"),
], ids=["at the visibility timeout", "above a lowered visibility timeout", "negative", "not a number"])
def test_a_bad_threshold_stops_the_configuration_naming_both_settings_and_the_fix(monkeypatch, tmp_path, env,
                                                                                  message):
    with pytest.raises(ConfigurationError) as refused:
        celeryconfig(monkeypatch, tmp_path, **env)
    assert str(refused.value) == message


# ---- what the publishers take --------------------------------------------------------------
def test_the_relay_publishes_a_command_timer_within_the_lookahead_with_its_due_time_as_eta(bus, engine):
    # Given timers due in 2 hours, in 30 s (within the 60 s lookahead) and a minute ago
    write_timer(engine, "later", timedelta(hours=2))
    write_timer(engine, "soon", timedelta(seconds=30))
    write_timer(engine, "overdue", timedelta(minutes=-1))
    # When the relay runs
    assert outbox.relay(bus.wiring) == 2
    # Then the two due within the lookahead are published, the soon one with its due time as eta, the later waits
    published = {m["headers"]["id"]: m["headers"]["eta"] for m in drain(bus)}
    assert set(published) == {"soon", "overdue"} and published["overdue"] is None
    with engine.connect() as conn:
        soon = conn.execute(select(outbox_table.c.due_at).where(outbox_table.c.id == "soon")).scalar_one()
    assert datetime.fromisoformat(published["soon"]) == as_utc(soon)
    assert state(engine, "later") == (False, False)


def test_an_event_timer_is_published_when_due_not_before(bus, engine):
    # Given an event timer due in 30 s (within the lookahead of commands)
    write_timer(engine, "event", timedelta(seconds=30), kind="event", name="events.order_placed")
    # When the relay runs, Then it waits; once due, it is published
    assert outbox.relay(bus.wiring) == 0
    due_now(engine, "event")
    assert outbox.relay(bus.wiring) == 1


def test_a_cancelled_timer_is_never_published_even_when_due(bus, engine):
    # Given a timer cancelled, then made due
    write_timer(engine, "t-1", timedelta(hours=2))
    assert timers.cancel(engine, "t-1") is timers.Cancel.CANCELLED
    due_now(engine, "t-1")
    # When the relay and a publish after commit run, Then neither publishes it
    assert outbox.relay(bus.wiring) == 0
    assert outbox.publish(bus.wiring, ["t-1"]) == 0
    assert drain(bus) == [] and state(engine, "t-1") == (False, True)


def test_a_handlers_delays_become_due_times_and_the_publish_after_commit_leaves_later_ones_to_the_relay(bus, engine):
    # Given a handler's execution that sends a command at once, one 10 s later, one in an hour,
    # publishes an event in an hour, and schedules a bus command
    due = datetime.now(timezone.utc) + timedelta(minutes=5)
    with UnitOfWork(engine) as uow:
        sink = outbox.OutboxSink(uow.session, "orders", "orders.place_order:k-1")
        sink.send(PlaceOrder(**{**FIELDS, "order_id": "now"}))
        sink.send(PlaceOrder(**{**FIELDS, "order_id": "soon"}), delay=10)
        sink.send(PlaceOrder(**{**FIELDS, "order_id": "later"}), delay=timedelta(hours=1))
        sink.publish(OrderPlaced(order_id="o-1", customer_id="c-1", total="1.00"), delay=timedelta(hours=1))
        scheduled = sink.schedule(QUEUE, {"order_id": "x"}, due)
        uow.commit()
    # Then each row has its due time, the scheduled one with a deterministic id
    by_order = {r.payload.get("order_id"): r for r in rows(engine)}
    assert by_order["now"].due_at is None
    assert [round((as_utc(by_order[o].due_at) - utcnow()).total_seconds() / 10) for o in ("soon", "later", "o-1")] == [
        1, 360, 360]
    assert scheduled == sink.written[-1] == by_order["x"].id and as_utc(by_order["x"].due_at) == due
    # When the worker publishes them after commit
    assert outbox.publish(bus.wiring, sink.written) == 2
    # Then the one due at once and the one due within the lookahead went out; the others wait for the relay
    assert {m["body"][1]["order_id"] for m in drain(bus)} == {"now", "soon"}


def handler_sends(engine: Engine, delay: timedelta | None = None) -> list[str]:
    """A handler's execution that sends the caller's command (same key, same payload) with `delay`; what it wrote."""
    with UnitOfWork(engine) as uow:
        sink = outbox.OutboxSink(uow.session, "orders", "billing.charge_payment:e-1")
        sink.send(PlaceOrder(**FIELDS), idempotency_key=KEY, delay=delay)
        uow.commit()
    return sink.written


def test_a_handler_sending_the_command_of_a_pending_timer_now_makes_that_one_message_due_now(bus, engine):
    # Given a caller's command two hours ahead (a timer under the key's task id)
    timer = bus.send(PlaceOrder(**FIELDS), idempotency_key=KEY, countdown=7200).id
    # When a handler sends the same command (key and payload) at once
    written = handler_sends(engine)
    # Then its execution committed (no duplicate-key error), and the two sends are one row, due now,
    [row] = rows(engine)
    assert written == [timer] == [row.id] and row.due_at is None
    # ... published once after the handler's commit; the relay finds nothing more
    assert outbox.publish(bus.wiring, written) == 1 and outbox.relay(bus.wiring) == 0
    assert [m["headers"]["id"] for m in drain(bus)] == [timer]


def test_a_handler_sending_it_later_than_the_pending_timer_keeps_the_earlier_time(bus, engine):
    # Given a caller's command two hours ahead, When a handler sends the same command three hours ahead
    bus.send(PlaceOrder(**FIELDS), idempotency_key=KEY, countdown=7200)
    handler_sends(engine, delay=timedelta(hours=3))
    # Then it is one timer, still due in two hours
    [row] = rows(engine)
    assert round((as_utc(row.due_at) - utcnow()).total_seconds() / 60) == 120


def test_a_handler_sending_the_command_of_a_cancelled_timer_sends_it(bus, engine):
    # Given a caller's command two hours ahead, cancelled
    timer = bus.send(PlaceOrder(**FIELDS), idempotency_key=KEY, countdown=7200).id
    assert timers.cancel(engine, timer) is timers.Cancel.CANCELLED
    # When a handler sends the same command at once, Then it goes out: the cancel was of the earlier send
    assert outbox.publish(bus.wiring, handler_sends(engine)) == 1
    assert state(engine, timer) == (True, False)


def test_a_handler_sending_a_command_already_published_leaves_it_to_the_claim(bus, engine):
    # Given a command a handler sent and the worker published
    assert outbox.publish(bus.wiring, handler_sends(engine)) == 1
    drain(bus)
    [before] = rows(engine)
    # When another execution sends the same command (key and payload)
    written = handler_sends(engine)
    # Then that execution commits, the row is as it was and nothing is published again (a redelivery would be
    # absorbed by the command's claim all the same)
    assert rows(engine) == [before]
    assert outbox.publish(bus.wiring, written) == 0 and drain(bus) == []


@pytest.mark.parametrize("delay, error", [
    (-1, "a delay of -1 is negative; give 0 or more (0: at once)"),
    ("5m", "a delay is a timedelta or seconds, got '5m': e.g. timedelta(minutes=5) or 300"),
])
def test_a_bad_delay_in_a_handler_is_refused_naming_the_accepted_forms(engine, delay, error):
    with UnitOfWork(engine) as uow:
        sink = outbox.OutboxSink(uow.session, "orders", "o:k")
        with pytest.raises((TypeError, ValueError)) as refused:
            sink.send(PlaceOrder(**FIELDS), delay=delay)
    assert str(refused.value) == error


def test_schedule_refuses_a_due_time_without_a_time_zone(engine):
    with UnitOfWork(engine) as uow:
        with pytest.raises(ValueError, match="takes an aware due_at"):
            outbox.OutboxSink(uow.session, "orders", "o:k").schedule(QUEUE, {}, datetime(2030, 1, 1))


# ---- cancelling ----------------------------------------------------------------------------
def test_cancel_stops_a_pending_timer_and_says_too_late_or_unknown_otherwise(engine):
    # Given a pending timer, a published one, one a publisher holds, one whose publisher's claim expired,
    # and an outbox row that is no timer
    for row_id in ("pending", "published", "claimed", "expired"):
        write_timer(engine, row_id, timedelta(hours=2))
    write_timer(engine, "plain", timedelta(0))
    with engine.begin() as conn:
        conn.execute(update(outbox_table).where(outbox_table.c.id == "published").values(published_at=utcnow()))
        conn.execute(update(outbox_table).where(outbox_table.c.id == "claimed")
                     .values(claimed_until=utcnow() + timedelta(seconds=30)))
        conn.execute(update(outbox_table).where(outbox_table.c.id == "expired")
                     .values(claimed_until=utcnow() - timedelta(seconds=1)))
        conn.execute(update(outbox_table).where(outbox_table.c.id == "plain").values(due_at=None))
    # When each is cancelled (the pending one twice)
    outcomes = {row_id: timers.cancel(engine, row_id).value
                for row_id in ("pending", "published", "claimed", "expired", "plain", "nope")}
    # Then a timer no publisher has is cancelled, one published or held is too late, the rest unknown
    assert outcomes == {"pending": "cancelled", "published": "too late", "claimed": "too late",
                        "expired": "cancelled", "plain": "unknown", "nope": "unknown"}
    assert timers.cancel(engine, "pending") is timers.Cancel.CANCELLED
    assert [state(engine, r) for r in ("pending", "published", "claimed")] == [(False, True), (True, False),
                                                                                (False, False)]
    # And the pending list leaves out what is published or cancelled
    assert [r.id for r in timers.pending(engine)] == ["claimed"]


def test_the_backlog_counts_a_timer_from_its_due_time_and_never_a_cancelled_one(engine):
    # Given rows written ten minutes ago: a timer due in an hour, one due 5 minutes ago, a cancelled one
    for row_id, due_in in (("future", timedelta(hours=1)), ("overdue", timedelta(minutes=-5)),
                           ("cancelled", timedelta(minutes=-5))):
        write_timer(engine, row_id, due_in)
    with engine.begin() as conn:
        conn.execute(update(outbox_table).values(created_at=utcnow() - timedelta(minutes=10)))
        conn.execute(update(outbox_table).where(outbox_table.c.id == "cancelled").values(cancelled_at=utcnow()))
    # When the backlog is read, Then only the overdue timer waits, since its due time
    count, waited = backlog.waiting(engine, timedelta(seconds=60))
    assert count == 1 and timedelta(minutes=5) <= waited < timedelta(minutes=6)


def test_due_now_refuses_an_id_that_is_no_unpublished_timer(engine):
    with pytest.raises(LookupError, match="no unpublished timer 'nope'"):
        due_now(engine, "nope")


# ---- bus timers ----------------------------------------------------------------------------
def timers_cli(engine: Engine, tmp_path: Path, *args: str):
    env = {"BUS_DATABASE_URL": str(engine.url), "BUS_HOME": str(tmp_path), "COLUMNS": "300"}
    return CliRunner().invoke(cli, ["timers", *args], env=env)


def test_bus_timers_lists_pending_timers_soonest_first(engine, tmp_path):
    # Given two timers, one cancelled
    write_timer(engine, "in-2h", timedelta(hours=2, seconds=5))
    write_timer(engine, "in-1h", timedelta(hours=1, seconds=5))
    timers.cancel(engine, "in-1h")
    write_timer(engine, "in-3m", timedelta(minutes=3, seconds=5))
    # When listed, Then the pending ones show soonest first, with kind, name and when they are due
    done = timers_cli(engine, tmp_path, "list")
    assert done.exit_code == 0, done.output
    lines = [line for line in done.output.splitlines() if line.startswith("│ in-")]
    assert [line.split()[1] for line in lines] == ["in-3m", "in-2h"]
    assert "command" in lines[1] and QUEUE in lines[1] and "in 2h" in lines[1]


@pytest.mark.parametrize("timer_id, code, says", [
    ("pending", 0, "timer pending is cancelled: it will not run"),
    ("published", 1, "too late: timer published is published or being published; it runs as due"),
    ("nope", 1, "unknown: no timer nope; `bus timers list` shows the pending ones"),
    ("x" * 65, 2, f"error: {'x' * 65!r} is not a timer id (1 to 64 characters); `bus timers list` shows the ids"),
    (" ", 2, "error: ' ' is not a timer id (1 to 64 characters)"),
], ids=["pending", "published", "unknown", "too long", "blank"])
def test_bus_timers_cancel_says_what_it_did_in_one_line_and_its_exit_status(engine, tmp_path, timer_id, code, says):
    write_timer(engine, "pending", timedelta(hours=2))
    write_timer(engine, "published", timedelta(hours=2))
    with engine.begin() as conn:
        conn.execute(update(outbox_table).where(outbox_table.c.id == "published").values(published_at=utcnow()))
    done = timers_cli(engine, tmp_path, "cancel", timer_id)
    assert done.exit_code == code, done.output
    assert says in done.output and len(done.output.strip().splitlines()) == 1, done.output
