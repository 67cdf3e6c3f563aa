"""Publishers' claims on outbox rows (project/messaging/outbox.py): a failed publish gives its claim back,
a crashed publisher's claim keeps other publishers off until it expires, then the relay
publishes the row. Real SQLite database (the unit `engine` fixture); Celery's in-memory
broker for a publish that works, a closed port for one that fails.
"""
from __future__ import annotations

from datetime import timedelta

import pytest
from celery import Celery
from kombu.exceptions import OperationalError
from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from project.messaging import outbox
from project.messaging.registry import Registry
from project.messaging.topology import Topology
from project.messaging.wiring import Wiring
from project.store.tables import outbox as outbox_table
from project.store.tables import utcnow
from tests.integration.support.helpers import free_port

ROW = "row-1"


def bus_on(broker: str, engine: Engine) -> Wiring:
    """What a publisher uses of a bus whose app publishes to `broker` (no publish retries) and whose
    store is `engine`'s database."""
    app = Celery("claims", broker=broker, set_as_current=False)
    app.conf.update(task_publish_retry=False, broker_connection_retry=False, broker_connection_timeout=1)
    return Wiring(app, Topology(Registry()), lambda: engine, ensure_broker=lambda: None)


def write_row(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(outbox_table.insert().values(id=ROW, kind="event", name="events.order_placed",
                                                  payload={"order_id": "o-1"}, created_at=utcnow() - timedelta(minutes=1)))


def state(engine: Engine) -> tuple:
    with engine.connect() as conn:
        row = conn.execute(select(outbox_table.c.published_at, outbox_table.c.claimed_until)
                           .where(outbox_table.c.id == ROW)).one()
    return row.published_at is not None, row.claimed_until is not None


def test_a_failed_publish_gives_its_claim_back_and_the_relay_publishes_the_row(engine):
    # Given a committed row, and a worker whose broker refuses connections
    write_row(engine)
    broken = bus_on(f"redis://127.0.0.1:{free_port()}/0", engine)

    # When the worker publishes it after commit
    with pytest.raises(OperationalError):
        outbox.publish(broken, [ROW])

    # Then the row is neither published nor claimed
    assert state(engine) == (False, False)
    # And a relay with a working broker publishes it at once
    assert outbox.relay(bus_on("memory://", engine)) == 1
    assert state(engine) == (True, True)


def test_a_crashed_publishers_claim_holds_the_row_until_it_expires(engine):
    # Given a row claimed by a publisher that died before publishing it
    write_row(engine)
    with engine.begin() as conn:
        conn.execute(update(outbox_table).values(claimed_until=utcnow() + timedelta(seconds=30)))
    relay = bus_on("memory://", engine)

    # When a relay runs while the claim lasts, and again once it has expired
    during = outbox.relay(relay)
    with engine.begin() as conn:
        conn.execute(update(outbox_table).values(claimed_until=utcnow() - timedelta(seconds=1)))
    after = outbox.relay(relay)

    # Then the row waits for the claim, and is published once it expired: nothing lost
    assert (during, after) == (0, 1)
    assert state(engine)[0]
