"""The workers' outbox relay (project/messaging/relay.py) without a broker: lease, ticks, settings.

The lease lives in a real SQLite database (the unit `engine` fixture); the relaying
itself is a fake that records what it was asked to publish.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from celery import Celery
from sqlalchemy.engine import Engine

from project.errors import ConfigurationError
from project.messaging.relay import LEASE, OutboxRelay, Relayer, RelayThread, install
from project.store import lease
from tests.unit.test_settings import celeryconfig

GRACE = timedelta(seconds=5)


@dataclass
class FakeRelay:
    """Stands for `outbox.relay`: records the grace of every call, returns `rows`."""

    rows: int = 0
    graces: list[timedelta] = field(default_factory=list)

    def __call__(self, grace: timedelta) -> int:
        self.graces.append(grace)
        return self.rows


def worker(engine: Engine, name: str, relay: FakeRelay, interval: float = 10) -> Relayer:
    return Relayer(lambda: engine, relay, f"{name}@host", interval, GRACE)


def test_the_first_worker_to_tick_holds_the_lease_and_relays_what_is_older_than_the_grace(engine):
    # Given two workers' relays
    first, second = FakeRelay(rows=3), FakeRelay()
    a, b = worker(engine, "a", first), worker(engine, "b", second)
    # When both tick, a first
    assert a.tick() == 3
    assert b.tick() == 0
    # Then a holds the lease alone and relayed with the grace; b relayed nothing
    [held] = lease.listing(engine, LEASE)
    assert (held.key, held.holder) == ("a@host", "a@host")
    assert (first.graces, second.graces) == ([GRACE], [])
    # And the lease lasts a few intervals, renewed by each tick
    assert held.expires_at - held.renewed_at == timedelta(seconds=30)


def test_when_the_holder_releases_the_lease_the_next_worker_to_tick_takes_over(engine):
    # Given a holds the lease
    first, second = FakeRelay(), FakeRelay()
    a, b = worker(engine, "a", first), worker(engine, "b", second)
    a.tick()
    b.tick()
    # When a gives it up (its worker stops)
    a.release()
    # Then b's next tick takes it and relays, and a's next tick stands by
    b.tick()
    a.tick()
    assert [held.holder for held in lease.listing(engine, LEASE)] == ["b@host"]
    assert (len(first.graces), len(second.graces)) == (1, 1)


def test_releasing_a_lease_another_worker_took_over_leaves_it_with_that_worker(engine):
    # Given a's lease expired and b took it (a's state still says it holds it)
    a, b = worker(engine, "a", FakeRelay(), interval=0), worker(engine, "b", FakeRelay())
    a.tick()
    b.tick()
    # When a releases, Then b keeps it
    a.release()
    assert [held.holder for held in lease.listing(engine, LEASE)] == ["b@host"]


@dataclass
class FlakyRelayer:
    """Stands for a `Relayer` whose first tick fails (database away); records ticks and the release."""

    interval: float = 0.01
    ticks: int = 0
    released: bool = False
    ticked_again: threading.Event = field(default_factory=threading.Event)

    def tick(self) -> int:
        self.ticks += 1
        if self.ticks == 1:
            raise ConnectionError("database is away")
        self.ticked_again.set()
        return 0

    def release(self) -> None:
        self.released = True


def test_a_failed_tick_is_logged_and_the_next_tick_comes_and_stopping_releases_the_lease(caplog):
    # Given a relay thread whose first tick fails
    relayer = FlakyRelayer()
    thread = RelayThread(relayer)
    # When it runs
    thread.start()
    # Then it ticks again after the failure, which it logged
    assert relayer.ticked_again.wait(10)
    assert "outbox relay: tick failed" in caplog.text
    # And when it stops, it ends and gives up the lease
    thread.stop()
    assert not thread.is_alive()
    assert relayer.released


@dataclass
class FakeWorker:
    app: Celery
    hostname: str = "w@host"


def test_workers_relay_every_10_seconds_rows_older_than_5_by_default(engine):
    # Given an app with the relay installed and the default settings
    app = Celery("relay-test")
    app.config_from_object({"bus_relay_interval": 10, "bus_relay_grace": 5})
    relay = FakeRelay()
    install(app, lambda: engine, relay)
    # When a worker builds its steps, Then the relay step is among them, with the settings
    assert OutboxRelay in app.steps["worker"]
    step = OutboxRelay(FakeWorker(app))
    assert step.enabled
    thread = step.create(FakeWorker(app))
    assert (thread.relayer.holder, thread.relayer.interval, thread.relayer.grace) == (
        "w@host", 10.0, timedelta(seconds=5))


def test_an_interval_of_0_turns_the_workers_relay_off():
    app = Celery("relay-off")
    app.config_from_object({"bus_relay_interval": 0})
    assert not OutboxRelay(FakeWorker(app)).enabled


def test_celeryconfig_reads_the_relay_settings(monkeypatch, tmp_path):
    assert {k: v for k, v in celeryconfig(monkeypatch, tmp_path).items() if k.startswith("bus_relay")} == {
        "bus_relay_interval": 10, "bus_relay_grace": 5}
    conf = celeryconfig(monkeypatch, tmp_path, BUS_RELAY_INTERVAL="0", BUS_RELAY_GRACE="30")
    assert (conf["bus_relay_interval"], conf["bus_relay_grace"]) == (0, 30)


@pytest.mark.parametrize(("name", "value", "default"), [
    ("BUS_RELAY_INTERVAL", "10s", 10), ("BUS_RELAY_INTERVAL", "-1", 10), ("BUS_RELAY_GRACE", "1.5", 5)])
def test_a_bad_relay_setting_stops_the_configuration_naming_the_accepted_form(monkeypatch, tmp_path, name, value,
                                                                              default):
    with pytest.raises(ConfigurationError) as error:
        celeryconfig(monkeypatch, tmp_path, **{name: value})
    assert str(error.value) == f"{name}={value!r} is not valid; use a whole number >= 0 (default {default})"
