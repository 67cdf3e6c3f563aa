"""Retention end to end: `bus purge` on SQLite and PostgreSQL, its refusals, and a purge during traffic.

- `bus purge` empties every bus table past its retention (keys and execution logs,
  published outbox rows, inbox rows, intake rows), in batches, on both databases, and
  keeps what the relay still owes;
- a malformed duration, a batch of 0 and retentions that break a rule are refused
  with the fix, before anything is touched;
- a purge running in a loop while orders flow through a real worker (PostgreSQL,
  Redis) loses nothing and duplicates no effect, although it deletes outbox rows as
  soon as they are published.
"""
from __future__ import annotations

import re
import threading
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, insert, select

from adapters.orm import port_calls
from project.store.tables import (
    commands,
    dead_letters,
    executions,
    inbox,
    intake,
    outbox,
    utcnow,
)
from tests.integration.conftest import opened
from tests.integration.support.helpers import ITEMS_TOTAL, PLACE_ORDER, order
from tests.integration.support.scenarios import Scenario
from tests.integration.test_cli import BUS, run

pytestmark = pytest.mark.integration
OLD, NEW = 100, 0  # days


def at(days: int) -> Any:
    return utcnow() - timedelta(days=days)


def seed(scenario: Scenario, prefix: str, days: int, count: int) -> None:
    """`count` rows of every purgeable table, `days` old: published outbox rows and their inbox, keys, intake."""
    with scenario.engine().begin() as conn:
        conn.execute(insert(outbox), [{"id": f"{prefix}-{n}", "kind": "event", "name": "events.order_placed",
                                       "payload": {}, "created_at": at(days), "published_at": at(days)}
                                      for n in range(count)])
        conn.execute(insert(inbox), [{"event_id": f"{prefix}-{n}", "subscriber": "billing.charge_payment",
                                      "duplicates": 0, "processed_at": at(days)} for n in range(count)])
        conn.execute(insert(commands), [{"task": "orders.place_order", "key": f"{prefix}-{n}", "payload_hash": "0" * 64,
                                         "payload": {}, "status": "succeeded", "message_id": f"{prefix}-m{n}",
                                         "duplicates": 0, "created_at": at(days)} for n in range(count)])
        conn.execute(insert(intake), [{"id": f"{prefix}-c{n}", "task": "orders.place_order", "key": f"{prefix}-{n}",
                                       "payload_hash": "0" * 64, "payload": {}, "accepted_at": at(days)}
                                      for n in range(count)])
        conn.execute(insert(executions), [{"message_id": f"{prefix}-m{n}", "task": "orders.place_order",
                                           "kind": "command", "state": "succeeded", "attempts": 1,
                                           "started_at": at(days), "finished_at": at(days)} for n in range(count)])


def counts(scenario: Scenario, prefix: str) -> dict[str, int]:
    """How many rows of each table `seed(scenario, prefix, ...)` wrote are left."""
    columns = {"outbox": outbox.c.id, "inbox": inbox.c.event_id, "keys": commands.c.key, "intake": intake.c.key,
               "executions": executions.c.message_id}
    with scenario.engine().connect() as conn:
        return {name: conn.execute(select(func.count()).where(column.like(f"{prefix}-%"))).scalar_one()
                for name, column in columns.items()}


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_bus_purge_empties_every_table_past_its_retention_in_batches(tmp_path_factory, database):
    with opened("embedded", database, tmp_path_factory, "retention") as scenario:
        # Given 5 rows of each table 100 days old, 3 fresh ones, and an old event the relay still owes
        # (a subscriber ran it: the publish went out, the crash came before it was marked published)
        seed(scenario, "old", OLD, 5)
        seed(scenario, "new", NEW, 3)
        with scenario.engine().begin() as conn:
            conn.execute(insert(outbox).values(id="owed", kind="event", name="events.order_placed", payload={},
                                               created_at=at(OLD)))
            conn.execute(insert(inbox).values(event_id="owed", subscriber="billing.charge_payment", duplicates=0,
                                              processed_at=at(OLD)))
        # When `bus purge` runs with the default retentions, 2 rows per batch
        done = scenario.bus("purge", "--batch", "2")
        # Then every old row is gone and it says so, table by table
        assert done.returncode == 0, done.stderr
        assert counts(scenario, "old") == {"outbox": 0, "inbox": 0, "keys": 0, "intake": 0, "executions": 0}
        assert ("purged 5 idempotency key(s) and 5 execution log(s) older than 30d, 5 published outbox row(s) "
                "older than 7d, 5 inbox row(s) older than 30d, 5 intake row(s) older than 60d") in " ".join(
            done.stdout.split())
        # ... the fresh rows stay, and so do the unpublished event and its inbox row (the relay may send it again)
        assert counts(scenario, "new") == {"outbox": 3, "inbox": 3, "keys": 3, "intake": 3, "executions": 3}
        assert scenario.rows("SELECT id FROM bus_outbox WHERE published_at IS NULL") == [("owed",)]
        assert scenario.rows("SELECT event_id FROM bus_inbox WHERE event_id = 'owed'") == [("owed",)]


@pytest.mark.parametrize("args, message", [
    (["--inbox", "banana"], "Invalid value for --inbox: 'banana' is not a duration; write a whole number and a "
                            "unit: 90s, 15m, 12h or 7d"),
    (["--keys", "7w"], "Invalid value for --keys: '7w' is not a duration"),
    (["--batch", "0"], "Invalid value for '--batch'"),
    (["--inbox", "1d"], "--inbox=1d is shorter than BUS_KEY_RETENTION=30d"),
    (["--keys", "90d", "--intake", "60d"], "--intake=60d is shorter than --keys=90d"),
])
def test_bus_purge_refuses_bad_input_naming_the_fix_and_touches_nothing(tmp_path, args, message):
    # Given a mistyped duration or batch, or retentions that break a rule
    # When `bus purge` runs with them
    done = run([BUS, "purge", *args], tmp_path)
    # Then it exits 2 (usage error) saying what is wrong and how to fix it, and touches nothing
    assert done.returncode == 2, done.stdout
    assert message in " ".join(done.stderr.split())
    assert not (tmp_path / "bus.db").exists()


def test_a_purge_during_traffic_loses_nothing_and_duplicates_no_effect(tmp_path_factory: pytest.TempPathFactory):
    with opened("redis", "postgresql", tmp_path_factory, "purging") as scenario:
        # Given a worker, 500 rows of every table past their retention, and `bus purge` running in a loop
        # that also deletes outbox rows as soon as they are published (--outbox 0s), 20 rows per batch
        scenario.start_worker(concurrency=2)
        client = scenario.driver()
        seed(scenario, "old", OLD, 500)
        traffic_done, purges = threading.Event(), []

        def purge_until_done() -> None:
            while not traffic_done.is_set():
                purges.append(scenario.bus("purge", "--outbox", "0s", "--batch", "20"))

        purger = threading.Thread(target=purge_until_done)
        purger.start()
        customers, results = {}, []
        try:
            # When orders are placed, 10 at a time, until the purge has run three times meanwhile
            while len(purges) < 3 and len(customers) < 200:
                wave = {f"o-{len(customers) + n}": f"c-purge-{len(customers) + n}" for n in range(10)}
                sent = [client.delay(PLACE_ORDER, idempotency_key=f"k-{o}", **order(o, c)) for o, c in wave.items()]
                results += [client.get(task_id, timeout=90) for task_id in sent]
                customers.update(wave)
            scenario.wait_for("every order charged and confirmed",
                              lambda: effects(scenario) >= 2 * len(customers), timeout=90)
        finally:
            traffic_done.set()
            purger.join(180)
        assert all(p.returncode == 0 for p in purges), [p.stderr for p in purges if p.returncode]
        assert len(purges) >= 3, f"the purge ran {len(purges)} time(s) during {len(customers)} orders"
        # Then every order succeeded, and each was charged once and confirmed once (nothing lost, nothing twice)
        assert [r["total"] for r in results] == [ITEMS_TOTAL] * len(customers)
        for customer in customers.values():
            assert calls(scenario, "gateway", customer) == 1
            assert calls(scenario, "mail", f"{customer}@customers.example") == 1
        # ... the inbox holds one claim of each OrderPlaced per subscriber (the new rows were not purged)
        assert scenario.rows("SELECT count(*) FROM bus_inbox WHERE event_id NOT LIKE 'old-%' AND subscriber IN "
                             "('billing.charge_payment', 'notifications.send_order_confirmation')")[0][0] \
            == 2 * len(customers)
        # ... nothing was dead-lettered, the old rows are gone, and the relay owes nothing
        assert scenario.rows(f"SELECT count(*) FROM {dead_letters.name}")[0][0] == 0
        assert counts(scenario, "old") == {"outbox": 0, "inbox": 0, "keys": 0, "intake": 0, "executions": 0}
        assert scenario.rows("SELECT count(*) FROM bus_outbox WHERE published_at IS NULL "
                             "AND due_at IS NULL")[0][0] == 0  # fulfilment's payment timers are not due
        # ... although the purges after the first deleted rows the orders had just published
        assert sum(int(re.search(r"(\d+) published outbox row", " ".join(p.stdout.split())).group(1))
                   for p in purges[1:]) > 0


def effects(scenario: Scenario) -> int:
    with scenario.engine().connect() as conn:
        return conn.execute(select(func.count()).select_from(port_calls).where(
            port_calls.c.port.in_(["gateway", "mail"]), port_calls.c.target.like("c-purge-%"))).scalar_one()


def calls(scenario: Scenario, port: str, target: str) -> int:
    with scenario.engine().connect() as conn:
        return conn.execute(select(func.count()).select_from(port_calls).where(
            port_calls.c.port == port, port_calls.c.target == target)).scalar_one()
