"""Celery's result backend in front of the bus (project/store/results.py): a command's result is stored once.

Celery's real database backend on a SQLite file of its own; the bus's claims in the
harness's database. No broker, no worker.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from celery import states
from celery.app.task import Context
from sqlalchemy import create_engine, func, select, text

from project.messaging.execution import Delivery
from project.store import results

REGISTER = "accounts.register_user"


@pytest.mark.parametrize(("url", "setting"), [
    ("redis://h:6379/0", "project.store.results:RedisBackend+redis://h:6379/0"),
    ("rediss://h:6380/1", "project.store.results:RedisBackend+rediss://h:6380/1"),
    ("redis+socket:///run/bus/redis.sock", "project.store.results:RedisBackend+socket:///run/bus/redis.sock"),
    ("db+postgresql+psycopg://u@h/bus", "project.store.results:DatabaseBackend+postgresql+psycopg://u@h/bus"),
    ("db+sqlite:///bus.db", "project.store.results:DatabaseBackend+sqlite:///bus.db"),
    ("rpc://", "rpc://"),
])
def test_the_bus_backend_goes_in_front_of_redis_and_database_backends_only(url, setting):
    assert results.backend_url(url) == setting


@pytest.fixture
def backend(bus_harness, tmp_path: Path):
    """The bus's database backend on a SQLite file; the bus (redirected by the harness) holds the claims."""
    url = f"sqlite:///{tmp_path}/results.db"
    backend = results.DatabaseBackend(app=bus_harness.bus.app, url=url)
    yield backend
    backend.ResultSession().get_bind().dispose()


def celery_rows(backend) -> int:
    """Rows in Celery's own result table."""
    engine = create_engine(backend.url)
    try:
        with engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(text("celery_taskmeta"))).scalar_one()
    finally:
        engine.dispose()


def register(harness, message_id: str, key: str = "k-1"):
    fields = {"user_id": "u-1", "email": "ada@example.com", "name": "Ada", "idempotency_key": key}
    return harness.bus.execution.command(harness.bus.registry.commands[REGISTER], fields,
                                         Delivery(REGISTER, message_id))


def request(message_id: str, stored_under: str | None) -> Context:
    req = Context(id=message_id, task=REGISTER, args=[], kwargs={})
    results.mark(req, stored_under)
    return req


def test_a_commands_success_is_not_stored_twice_and_is_read_from_its_claim(bus_harness, backend):
    # Given a command whose handler ran as message m-1 (its claim stores the result under m-1)
    executed = register(bus_harness, "m-1")
    assert executed.stored_under == "m-1"
    # When Celery stores its STARTED state (BUS_TRACK_STARTED=on), then its SUCCESS
    backend.store_result("m-1", None, states.STARTED, request=request("m-1", executed.stored_under))
    backend.store_result("m-1", executed.value, states.SUCCESS, request=request("m-1", executed.stored_under))
    # Then Celery's table keeps STARTED only, and the result is read from the claim
    assert celery_rows(backend) == 1
    meta = backend.get_task_meta("m-1")
    assert (meta["status"], meta["result"], meta["name"]) == (states.SUCCESS, {"user_id": "u-1"}, REGISTER)


def test_a_duplicate_under_another_task_id_keeps_celerys_copy(bus_harness, backend):
    # Given the command ran as m-1, and a duplicate arrives as m-2 (a sender chose its own task id)
    register(bus_harness, "m-1")
    again = register(bus_harness, "m-2")
    assert (again.ran, again.stored_under) == (False, "m-1")
    # When Celery stores the duplicate's SUCCESS, Then it is stored (the claim is not under m-2)
    backend.store_result("m-2", again.value, states.SUCCESS, request=request("m-2", again.stored_under))
    assert celery_rows(backend) == 1
    assert backend.get_task_meta("m-2")["result"] == {"user_id": "u-1"}


def test_failures_and_other_tasks_are_stored_by_celery_and_unknown_ids_stay_pending(bus_harness, backend):
    # Given a failure of a command, and a task that is not a command (no mark on its request)
    backend.store_result("m-3", ValueError("refused"), states.FAILURE, request=request("m-3", "m-3"))
    backend.store_result("t-1", 42, states.SUCCESS, request=Context(id="t-1", task="bus.relay_outbox"))
    # Then both are Celery's rows, read back as usual
    assert celery_rows(backend) == 2
    assert backend.get_task_meta("m-3")["status"] == states.FAILURE
    assert backend.get_task_meta("t-1")["result"] == 42
    # and an id nobody ran is pending
    assert backend.get_task_meta("m-404")["status"] == states.PENDING
