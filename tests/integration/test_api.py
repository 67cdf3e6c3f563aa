"""The HTTP intake end to end: `bus api` and a real worker on Redis, over real HTTP.

202 at once with a Location, the same key and body -> the same id, the same key with
another body -> 409, invalid body -> 422 with field errors, GET /commands/{id} tells
pending / succeeded / failed, and expired once the key is purged, 404 for unknown ids (and
once the intake row is purged too); schemathesis finds no server error.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from sqlalchemy import update

from project.store.tables import commands, intake, utcnow
from tests.integration.conftest import opened
from tests.integration.support.helpers import free_port
from tests.integration.support.scenarios import Scenario

ITEMS = [{"sku": "book", "quantity": 2, "unit_price": "12.50"}]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    with opened("redis", "sqlite", tmp_path_factory, "api") as scenario:
        scenario.start_worker(concurrency=2)
        yield scenario


@pytest.fixture(scope="module")
def api(scenario: Scenario) -> Iterator[str]:
    """`bus api` as a subprocess of the scenario; its base URL. Stopped by PID."""
    port = free_port()
    log = open(scenario.logdir / "api.log", "wb")
    process = subprocess.Popen([str(Path(sys.executable).with_name("bus")), "api", "--port", str(port)],
                               env={**os.environ, **scenario.env}, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        scenario.wait_for("the API to serve its schema", lambda: _up(base, process), timeout=30)
        yield base
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(10)
        log.close()


def _up(base: str, process: subprocess.Popen) -> bool:
    assert process.poll() is None, f"bus api exited with {process.returncode}"
    try:
        return httpx.get(f"{base}/openapi.json", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def wait_state(base: str, location: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = httpx.get(base + location).json()
        if body["status"] != "pending" or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


def test_an_order_is_accepted_at_once_and_succeeds(api: str, uid: str):
    # Given an order with an Idempotency-Key
    order = {"order_id": f"o-{uid}", "customer_id": "c-1", "items": ITEMS}
    # When it is posted twice with the key
    first = httpx.post(f"{api}/orders", json=order, headers={"Idempotency-Key": f"k-{uid}"})
    again = httpx.post(f"{api}/orders", json=order, headers={"Idempotency-Key": f"k-{uid}"})
    # Then both are 202 with the same id and Location, the second marked as a duplicate
    assert (first.status_code, again.status_code) == (202, 202)
    assert first.json()["id"] == again.json()["id"] and again.json()["duplicate"] is True
    assert first.headers["location"] == f"/commands/{first.json()['id']}"
    # ... and the command's state becomes succeeded with the handler's result
    assert wait_state(api, first.headers["location"]) == {
        "id": first.json()["id"], "task": "orders.place_order", "status": "succeeded",
        "result": {"order_id": f"o-{uid}", "total": "25.00"}, "error": None}


def test_the_same_key_with_another_body_is_a_conflict(api: str, uid: str):
    # Given an accepted order
    headers = {"Idempotency-Key": f"k-{uid}"}
    assert httpx.post(f"{api}/orders", json={"order_id": f"o-{uid}", "customer_id": "c-1", "items": ITEMS},
                      headers=headers).status_code == 202
    # When the same key comes with another customer
    conflict = httpx.post(f"{api}/orders", json={"order_id": f"o-{uid}", "customer_id": "c-2", "items": ITEMS},
                          headers=headers)
    # Then it is refused with 409 naming the differing field
    assert conflict.status_code == 409 and "customer_id" in conflict.json()["detail"]


def test_an_invalid_body_gets_the_field_errors(api: str):
    # When an order without items and with an empty customer is posted
    response = httpx.post(f"{api}/orders", json={"order_id": "o-x", "customer_id": "", "items": []})
    # Then 422 names both fields, and nothing was accepted
    assert response.status_code == 422
    assert {tuple(e["loc"][1:]) for e in response.json()["detail"]} == {("customer_id",), ("items",)}


def test_a_refused_command_reports_its_domain_error(api: str, uid: str):
    # Given a registered e-mail address
    user = {"user_id": f"u-{uid}", "email": f"ada-{uid}@example.com", "name": "Ada"}
    first = httpx.post(f"{api}/users", json=user)
    assert wait_state(api, first.headers["location"])["status"] == "succeeded"
    # When another account is registered with it
    second = httpx.post(f"{api}/users", json={**user, "user_id": f"u2-{uid}"})
    # Then the second command fails with the domain error
    state = wait_state(api, second.headers["location"])
    assert state["status"] == "failed" and "EmailAlreadyRegistered" in state["error"]


def backdate(scenario: Scenario, accepted: dict, days: int) -> None:
    """Move a command's intake row and idempotency claim `days` into the past (instead of waiting)."""
    then = utcnow() - timedelta(days=days)
    with scenario.engine().begin() as conn:
        conn.execute(update(intake).where(intake.c.id == accepted["id"]).values(accepted_at=then))
        conn.execute(update(commands).where(commands.c.message_id == accepted["id"]).values(created_at=then))


def test_a_finished_command_whose_key_was_purged_is_expired(api: str, scenario: Scenario, uid: str):
    # Given an order that succeeded, accepted and run 31 days ago
    posted = httpx.post(f"{api}/orders", json={"order_id": f"o-{uid}", "customer_id": "c-1", "items": ITEMS},
                        headers={"Idempotency-Key": f"k-{uid}"})
    location = posted.headers["location"]
    assert wait_state(api, location)["status"] == "succeeded"
    backdate(scenario, posted.json(), days=31)
    # When the keys past the key retention (30d) are purged
    purged = scenario.bus("purge-keys", "--older-than", "30d")
    assert purged.returncode == 0, purged.stderr
    # Then GET /commands/{id} reports the command expired, not pending
    assert httpx.get(api + location).json() == {"id": posted.json()["id"], "task": "orders.place_order",
                                               "status": "expired", "result": None, "error": None}

    # When its intake row passes its own retention (60d) and every table is purged
    backdate(scenario, posted.json(), days=61)
    purged = scenario.bus("purge")
    assert purged.returncode == 0, purged.stderr
    # Then the id is unknown
    assert httpx.get(api + location).status_code == 404


def test_an_unknown_command_id_is_404(api: str):
    assert httpx.get(f"{api}/commands/does-not-exist").status_code == 404


def test_schemathesis_finds_no_server_error(api: str, scenario: Scenario):
    # When schemathesis generates requests from the served OpenAPI schema
    done = subprocess.run([str(Path(sys.executable).with_name("schemathesis")), "run", f"{api}/openapi.json",
                           "--checks", "not_a_server_error", "--max-examples", "25", "--no-color"],
                          capture_output=True, text=True, timeout=240)
    # Then no response is a server error
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
