"""Durable timers in the in-process harness: they wait for its clock, fire once, and a cancelled one never.

A bus of its own: `remind` handles Remind and, when asked, sends a FollowUp after a
delay (a timer its execution commits); `follow_up` handles FollowUp. The harness runs
them against a SQLite copy of the migrated database (project/testing/harness.py).
Real workers agree: tests/integration/test_timers.py.
"""
from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import pytest
from celery import Celery
from sqlalchemy import select

from project.contracts import Command, CommandSender
from project.core import Bus
from project.store import timers
from project.store.tables import outbox
from project.testing.harness import BusHarness

TWO_HOURS = 7200


class Remind(Command, boundary="reminders", natural_key=("reminder_id",)):
    reminder_id: str
    follow_up_after: float = 0  # seconds; 0: no follow-up


class FollowUp(Command, boundary="reminders", natural_key=("reminder_id",)):
    reminder_id: str


def remind(cmd: Remind, *, commands: CommandSender) -> None:
    if cmd.follow_up_after:
        commands.send(FollowUp(reminder_id=cmd.reminder_id), delay=timedelta(seconds=cmd.follow_up_after))


def follow_up(cmd: FollowUp) -> None:
    pass


@pytest.fixture
def harness(bus_harness_template: Path, tmp_path: Path) -> Iterator[BusHarness]:
    app = Celery("harness-timers", set_as_current=False)
    app.conf.include = [__name__]
    bus = Bus(app)
    bus.command(Remind)(remind)
    bus.command(FollowUp)(follow_up)
    database = tmp_path / "bus.db"
    shutil.copyfile(bus_harness_template, database)
    with BusHarness(bus, f"sqlite:///{database}") as harness:
        yield harness


REMIND, FOLLOW_UP = "reminders.remind", "reminders.follow_up"


def test_a_command_sent_two_hours_ahead_runs_once_when_the_clock_gets_there(harness):
    # Given a reminder sent two hours ahead (a timer in the outbox), twice with one key
    first = harness.send(Remind(reminder_id="r-1"), delay=TWO_HOURS)
    second = harness.send(Remind(reminder_id="r-1"), delay=timedelta(hours=3))
    assert first == second
    assert [t.id for t in timers.pending(harness.bus.engine())] == [first]
    # When the harness runs, and the clock moves to a second before it is due
    harness.run_until_idle()
    harness.advance(TWO_HOURS - 1)
    harness.run_until_idle()
    # Then nothing ran
    assert harness.runs == []
    # When the clock reaches its due time
    harness.advance(1)
    harness.run_until_idle()
    # Then it ran once, at that time, and runs no more however far the clock goes
    assert [(r.name, r.outcome, r.at) for r in harness.runs] == [(REMIND, "ran", TWO_HOURS)]
    harness.advance(timedelta(days=1))
    harness.run_until_idle()
    assert harness.handled(REMIND) == 1
    assert harness.sent(Remind) == [Remind(reminder_id="r-1")]


def test_a_timer_cancelled_before_it_is_due_never_runs(harness):
    # Given a reminder two hours ahead, cancelled an hour later
    timer = harness.send(Remind(reminder_id="r-1"), delay=TWO_HOURS)
    harness.advance(3600)
    assert timers.cancel(harness.bus.engine(), timer) is timers.Cancel.CANCELLED
    # When the clock passes its due time
    harness.advance(TWO_HOURS)
    harness.run_until_idle()
    # Then it did not run
    assert harness.runs == []


def test_a_timer_a_handler_commits_waits_for_the_clock_and_can_be_cancelled_until_then(harness):
    # Given reminders whose handler sends a follow-up an hour later (two reminders: one follow-up is cancelled)
    harness.send(Remind(reminder_id="r-1", follow_up_after=3600))
    harness.send(Remind(reminder_id="r-2", follow_up_after=3600))
    harness.run_until_idle()
    assert harness.handled(REMIND) == 2 and harness.handled(FOLLOW_UP) == 0
    [kept, dropped] = [t.id for t in timers.pending(harness.bus.engine())]
    assert timers.cancel(harness.bus.engine(), dropped) is timers.Cancel.CANCELLED
    # When the clock passes the hour
    harness.advance(3600)
    harness.run_until_idle()
    # Then the follow-up left runs once; the cancelled one does not
    assert [(r.name, r.message_id) for r in harness.runs if r.name == FOLLOW_UP] == [(FOLLOW_UP, kept)]


def test_a_follow_up_due_within_the_lookahead_is_in_flight_at_once_as_on_a_worker(harness):
    # Given a follow-up 30 s later: a worker's publish after commit hands it to the broker at once, with its eta
    harness.send(Remind(reminder_id="r-1", follow_up_after=30))
    harness.run_until_idle()
    # Then it is no longer pending, and cannot be cancelled any more
    assert timers.pending(harness.bus.engine()) == []
    [row] = _handed_over(harness)
    assert timers.cancel(harness.bus.engine(), row.id) is timers.Cancel.TOO_LATE
    # And it runs once the clock gets there, not before
    harness.run_until_idle()
    assert harness.handled(FOLLOW_UP) == 0
    harness.advance(30)
    harness.run_until_idle()
    assert [(r.name, r.message_id, r.at) for r in harness.runs][-1] == (FOLLOW_UP, row.id, 30)


def test_a_short_delay_waits_for_the_clock_as_celerys_eta_would_and_is_no_timer(harness):
    # Given a reminder sent 10 s ahead (within the threshold: Celery's eta, nothing in the outbox)
    harness.send(Remind(reminder_id="r-1"), delay=10)
    assert _handed_over(harness) == [] and timers.pending(harness.bus.engine()) == []
    harness.run_until_idle()
    assert harness.runs == []
    # When the clock passes it, Then it runs once
    harness.advance(10)
    harness.run_until_idle()
    assert [(r.name, r.at) for r in harness.runs] == [(REMIND, 10)]


def _handed_over(harness: BusHarness) -> list:
    """The timers of the outbox published already (handed to the broker)."""
    with harness.bus.engine().connect() as conn:
        return list(conn.execute(select(outbox.c.id).where(outbox.c.due_at.is_not(None),
                                                           outbox.c.published_at.is_not(None))))
