"""Start-up and cluster checks as logic: boundary options, owner leases, their heartbeat, the survey.

Owner leases are claimed on a real SQLite database (tests/unit/conftest.py); the
heartbeat renews through a fake lease store and the survey asks a fake control
channel, both recording what they were asked (the integration tests use real workers).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from handlers import accounts, orders
from handlers.messages import PlaceOrder, RegisterUser
from project.errors import ConfigurationError, OwnerConflict
from project.messaging import ownership
from project.messaging.registry import Registry
from project.observe.cluster import ask_workers, find_conflicts
from project.store import lease
from project.store.engine import dispose, engine_for
from project.store.lease import Lease
from project.transport.worker import parse_boundaries

REAL = "handlers.orders.place_order"
ROGUE = "elsewhere.place_order"


def test_parse_boundaries_accepts_repeated_and_comma_separated_names():
    assert parse_boundaries(("orders,billing", " audit "), {"orders", "billing", "audit"}) == [
        "orders", "billing", "audit"]
    assert parse_boundaries((), {"orders"}) == []


def test_unknown_boundary_is_refused_listing_the_known_ones():
    with pytest.raises(ConfigurationError) as error:
        parse_boundaries(("orders,nosuch", "typo"), {"orders", "billing"})
    assert str(error.value).startswith("--boundary nosuch, typo: no such boundary; known: billing, orders")
    assert "BUS_TASK_MODULES" in str(error.value)


def test_unknown_boundary_with_an_empty_registry_says_none():
    with pytest.raises(ConfigurationError) as error:
        parse_boundaries(("orders",), set())
    assert "known: none" in str(error.value)


def test_a_different_handler_on_another_host_is_a_conflict_naming_both():
    mine = {"orders.place_order": REAL}
    replies = [{"b@host": {"orders.place_order": ROGUE}}]
    assert find_conflicts(mine, replies, "a@host") == [
        f"orders.place_order is served by {ROGUE} on b@host, but a@host would serve it with {REAL}"]


def test_replicas_other_queues_myself_and_error_replies_are_no_conflict():
    mine = {"orders.place_order": REAL}
    replies = [
        {"replica@host": {"orders.place_order": REAL}},             # same handler: a replica
        {"accounts@host": {"accounts.register_user": "x.register"}},  # a queue I do not serve
        {"a@host": {"orders.place_order": ROGUE}},                  # my own reply
        {"old@host": "not a dict"},                                 # a malformed reply
    ]
    assert find_conflicts(mine, replies, "a@host") == []


@dataclass
class FakeControl:
    """Celery's app.control, answering broadcasts with canned replies; records the calls."""

    replies: list[dict[str, Any]]
    asked: list[tuple[str, dict]] = field(default_factory=list)

    def broadcast(self, command: str, **options: Any) -> list[dict[str, Any]]:
        self.asked.append((command, options))
        return self.replies


def registry() -> Registry:
    bound = Registry()
    bound.add_command(PlaceOrder, orders.place_order)
    bound.add_command(RegisterUser, accounts.register_user)
    return bound


def test_survey_reports_each_conflicting_pair_once():
    control = FakeControl([{"a@h": {"orders.place_order": REAL}}, {"b@h": {"orders.place_order": ROGUE}},
                           {"c@h": {"orders.place_order": REAL,
                                    "accounts.register_user": "handlers.accounts.register_user"}}])
    report = ask_workers(control, registry(), timeout=1.5)
    assert control.asked == [("bus_owners", {"reply": True, "timeout": 1.5})]
    assert report.workers == ["a@h", "b@h", "c@h"]
    assert report.conflicts == [
        f"orders.place_order is served by {ROGUE} on b@h, but a@h would serve it with {REAL}",
        f"orders.place_order is served by {REAL} on c@h, but b@h would serve it with {ROGUE}",
    ]
    assert report.unconsumed == []


def test_survey_lists_command_queues_no_worker_consumes():
    report = ask_workers(FakeControl([{"orders@h": {"orders.place_order": REAL}}]), registry(), timeout=1)
    assert report.conflicts == []
    assert report.unconsumed == ["accounts.register_user"]


def test_survey_of_an_empty_cluster_lists_every_command_queue():
    report = ask_workers(FakeControl([]), registry(), timeout=1)
    assert (report.workers, report.conflicts) == ([], [])
    assert report.unconsumed == ["accounts.register_user", "orders.place_order"]


# ---- owner leases at start-up (a real SQLite database) ----------------------------------------------
TTL = timedelta(seconds=60)
PLACE, REGISTER = "orders.place_order", "accounts.register_user"
MINE = {PLACE: REAL, REGISTER: "handlers.accounts.register_user"}


def leases_now(engine) -> dict[str, tuple[str, str]]:
    """{queue: (handler, holder)} of every owner lease."""
    return {ownership.queue_of(h): (h.key, h.holder) for h in lease.listing(engine, ownership.PREFIX)}


def test_a_first_worker_takes_every_lease_and_says_so(engine):
    # Given no leases
    # When a worker claims its command queues
    found = ownership.claim(engine, MINE, "a@h", TTL)
    # Then it holds them all, and each start-up line says it took the lease
    assert leases_now(engine) == {q: (h, "a@h") for q, h in MINE.items()}
    assert [c.line() for c in found] == [f"owner lease of {REGISTER}: took (handlers.accounts.register_user)",
                                         f"owner lease of {PLACE}: took ({REAL})"]


def test_a_replica_joins_and_a_restart_renews(engine):
    # Given worker a holds the leases
    ownership.claim(engine, MINE, "a@h", TTL)
    # When a replica (same handlers) claims, then a restarts under its own name
    joined = ownership.claim(engine, {PLACE: REAL}, "b@h", TTL)
    renewed = ownership.claim(engine, {REGISTER: MINE[REGISTER]}, "a@h", TTL)
    # Then both start; the lines say joined (with whom) and renewed
    assert [c.line() for c in joined] == [f"owner lease of {PLACE}: joined ({REAL}; shared with a@h)"]
    assert [c.outcome for c in renewed] == ["renewed"]


def test_another_handler_is_refused_naming_holder_expiry_and_fixes_and_nothing_is_left_behind(engine):
    # Given worker a holds orders.place_order with the real handler
    ownership.claim(engine, {PLACE: REAL}, "a@h", TTL)
    before = lease.listing(engine, ownership.PREFIX)
    # When worker b, with another handler for it and a queue nobody holds, claims both
    with pytest.raises(OwnerConflict) as error:
        ownership.claim(engine, {PLACE: ROGUE, REGISTER: MINE[REGISTER]}, "b@h", TTL)
    # Then the error names the queue, the holder's handler and host, the expiry, b's handler and the fixes
    message = str(error.value)
    assert message.startswith("refusing to start: a command has exactly one owner. "
                              f"{PLACE} is owned by {REAL} (last renewed by a@h, expires ")
    for part in ("UTC, in ", f"but b@h would serve it with {ROGUE}", "stop that worker",
                 "wait for the lease to expire", f"bus owners release {PLACE}"):
        assert part in message, message
    # and b left no lease behind: not the one it took first (accounts sorts before orders), not a renewal
    assert lease.listing(engine, ownership.PREFIX) == before


def test_an_expired_lease_of_another_handler_is_taken_over(engine):
    # Given a lease of another handler that expired
    lease.acquire(engine, ownership.lease_name(PLACE), ROGUE, "gone@h", timedelta(seconds=-5))
    # When the real handler's worker claims it
    [found] = ownership.claim(engine, {PLACE: REAL}, "a@h", TTL)
    # Then it takes it over, naming whose lease it was
    assert leases_now(engine) == {PLACE: (REAL, "a@h")}
    assert found.line().startswith(f"owner lease of {PLACE}: took over ({REAL}; it was held by {ROGUE} "
                                   f"(last renewed by gone@h, expired ")


def test_a_database_without_the_leases_table_is_refused_naming_the_migration(tmp_path):
    # Given a database nobody migrated
    engine = engine_for(f"sqlite:///{tmp_path}/empty.db")
    # When a worker claims its leases
    with pytest.raises(ConfigurationError) as error:
        ownership.claim(engine, MINE, "a@h", TTL)
    # Then it is told to migrate
    assert "no such table: bus_leases" in str(error.value)
    assert "run `bus db upgrade` first" in str(error.value)
    dispose(f"sqlite:///{tmp_path}/empty.db")


@pytest.mark.parametrize("raw", ["abc", "2", "-60", "1.5"])
def test_a_bad_lease_ttl_is_refused_naming_the_setting_and_its_form(raw):
    with pytest.raises(ConfigurationError) as error:
        ownership.lease_ttl({"BUS_OWNER_LEASE_TTL": raw})
    assert str(error.value) == f"BUS_OWNER_LEASE_TTL={raw!r} is not valid; use a whole number >= 3 (default 60)"


def test_the_lease_ttl_defaults_to_a_minute():
    assert ownership.lease_ttl({}) == timedelta(seconds=60)
    assert ownership.lease_ttl({"BUS_OWNER_LEASE_TTL": "9"}) == timedelta(seconds=9)


def test_examine_finds_leases_of_other_handlers_and_expired_ones():
    now = datetime(2025, 1, 1, 12, tzinfo=timezone.utc)

    def held(queue: str, handler: str, expires_in: int) -> Lease:
        return Lease(ownership.lease_name(queue), handler, "w@h", now, now, now + timedelta(seconds=expires_in))

    conflicts, expired = ownership.examine(MINE, [held(PLACE, ROGUE, 30), held(REGISTER, MINE[REGISTER], -30),
                                                  held("gone.queue", "x.y", 30)], now)
    assert conflicts == [f"{PLACE}: the owner lease names {ROGUE} (last renewed by w@h, expires 2025-01-01 "
                         f"12:00:30 UTC, in 30 s), but this registry binds {REAL}; stop those workers, or "
                         f"`bus owners release {PLACE}` once they are"]
    assert expired == [f"owner lease of {REGISTER}: handlers.accounts.register_user (last renewed by w@h, expired "
                       f"2025-01-01 11:59:30 UTC, 30 s ago); no worker renews it: the next worker to start for "
                       f"{REGISTER} takes it over, or `bus owners release {REGISTER}` removes it"]


# ---- the heartbeat (a fake lease store) -------------------------------------------------------------
@dataclass
class FakeLeases:
    """Answers renewals like lease.acquire: won unless `taken` names the queue, or raises while `down`."""

    taken: dict[str, str] = field(default_factory=dict)
    down: bool = False
    asked: list[tuple[str, str]] = field(default_factory=list)

    def renew(self, queue: str, handler: str) -> tuple[bool, Lease]:
        self.asked.append((queue, handler))
        if self.down:
            raise OperationalError("SELECT 1", {}, Exception("connection refused"))
        now = datetime.now(timezone.utc)
        key = self.taken.get(queue, handler)
        return key == handler, Lease(ownership.lease_name(queue), key, "other@h", now, now, now + TTL)


def beating(store: FakeLeases) -> tuple[ownership.Heartbeat, list[str]]:
    lost: list[str] = []
    return ownership.Heartbeat(store.renew, MINE, 20.0, lost.append), lost


def test_heartbeat_renews_every_lease_it_owns():
    store = FakeLeases()
    heartbeat, lost = beating(store)
    heartbeat.tick()
    assert sorted(store.asked) == sorted(MINE.items())
    assert (heartbeat.owned, lost) == (MINE, [])


def test_heartbeat_warns_while_the_database_is_down_and_keeps_its_queues(caplog):
    # Given the database does not answer
    store = FakeLeases(down=True)
    heartbeat, lost = beating(store)
    # When a renewal is due
    with caplog.at_level(logging.INFO, logger="project.messaging.ownership"):
        heartbeat.tick()
        # Then it warns, says when it tries again, and keeps consuming every queue
        assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
            ("WARNING", "owner leases not renewed, the bus database did not answer ((builtins.Exception) connection "
                        "refused); trying again in 20 s")]
        assert (heartbeat.owned, lost) == (MINE, [])
        # and when the database is back, the next tick renews and says so
        store.down = False
        heartbeat.tick()
    assert caplog.records[-1].getMessage() == f"owner leases renewed again: {REGISTER}, {PLACE}"


def test_heartbeat_gives_up_a_queue_another_handler_took_and_logs_an_error(caplog):
    # Given another handler took orders.place_order's lease (it expired during an outage)
    store = FakeLeases(taken={PLACE: ROGUE})
    heartbeat, lost = beating(store)
    # When a renewal is due
    with caplog.at_level(logging.INFO, logger="project.messaging.ownership"):
        heartbeat.tick()
    # Then that queue is handed to on_lost and no longer renewed; the other one is kept
    assert lost == [PLACE]
    assert heartbeat.owned == {REGISTER: MINE[REGISTER]}
    [error] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert error.getMessage().startswith(f"owner lease of {PLACE} is held by {ROGUE} (last renewed by other@h")
    assert f"this worker ({REAL}) stops consuming {PLACE}" in error.getMessage()
    store.asked.clear()
    heartbeat.tick()
    assert store.asked == [(REGISTER, MINE[REGISTER])]


def test_heartbeat_thread_renews_until_stopped():
    store = FakeLeases()
    heartbeat = ownership.Heartbeat(store.renew, {PLACE: REAL}, 0.01, lambda queue: None)
    heartbeat.start()
    deadline = time.monotonic() + 10
    while len(store.asked) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    heartbeat.stop()
    assert len(store.asked) >= 3
    assert not heartbeat._thread.is_alive()
