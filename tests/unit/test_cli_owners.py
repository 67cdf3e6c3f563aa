"""`bus owners` and `bus owners release` against a real SQLite database (no broker needed).

Listing as a table and as JSON; releasing a lease; every refusal of bad input (status 2,
nothing changed) and a release with nothing to release (status 1).
"""
from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from project.cli.main import cli
from project.errors import ConfigurationError
from project.store import lease
from project.store.engine import dispose, engine_for
from project.store.migrate import upgrade

PLACE, REGISTER = "orders.place_order", "accounts.register_user"
REAL = "handlers.orders.place_order"


@pytest.fixture
def leased(tmp_path: Path):
    """A migrated database where a@h holds orders.place_order and accounts.register_user's lease expired."""
    url = f"sqlite:///{tmp_path}/bus.db"
    upgrade(url)
    engine = engine_for(url)
    lease.acquire(engine, f"owner:{PLACE}", REAL, "a@h", timedelta(seconds=60))
    lease.acquire(engine, f"owner:{REGISTER}", "handlers.accounts.register_user", "b@h", timedelta(seconds=-1))
    lease.acquire(engine, "relay:outbox", "k", "a@h", timedelta(seconds=60))  # not an owner lease
    yield engine, {"BUS_DATABASE_URL": url, "BUS_HOME": str(tmp_path), "COLUMNS": "300"}
    dispose(url)


def owners(env: dict, *args: str):
    return CliRunner().invoke(cli, ["owners", *args], env=env)


def test_owners_lists_every_owner_lease_as_json(leased):
    _, env = leased
    done = owners(env, "--json")
    assert done.exit_code == 0, done.output
    rows = json.loads(done.output)
    assert [(r["queue"], r["handler"], r["holder"], r["state"]) for r in rows] == [
        (REGISTER, "handlers.accounts.register_user", "b@h", "expired"), (PLACE, REAL, "a@h", "live")]
    assert set(rows[0]) == {"queue", "handler", "holder", "acquired_at", "renewed_at", "expires_at", "state"}


def test_owners_table_keeps_whole_names_on_one_line(leased):
    _, env = leased
    done = owners(env)
    assert done.exit_code == 0, done.output
    assert "2 owner lease(s)" in done.output
    [line] = [line for line in done.output.splitlines() if PLACE in line]
    assert REAL in line and "a@h" in line and "live" in line


def test_release_deletes_the_lease_of_that_queue_only(leased):
    engine, env = leased
    done = owners(env, "release", PLACE)
    assert done.exit_code == 0, done.output
    assert f"released the owner lease of {PLACE}: it was {REAL} (last renewed by a@h" in done.output
    assert "it was live; if a@h or a replica still runs" in " ".join(done.output.split())
    assert [h.name for h in lease.listing(engine)] == [f"owner:{REGISTER}", "relay:outbox"]


def test_release_of_an_unknown_queue_is_refused_listing_the_known_ones(leased):
    engine, env = leased
    done = owners(env, "release", "orders.place_ordr")
    assert done.exit_code == 2, done.output
    said = " ".join(done.output.split())
    assert "'orders.place_ordr' is not a command queue of this bus nor leased; known:" in said
    assert PLACE in said and REGISTER in said
    assert len(lease.listing(engine)) == 3


def test_release_of_a_queue_without_a_lease_exits_1(leased):
    engine, env = leased
    owners(env, "release", PLACE)
    done = owners(env, "release", PLACE)
    assert done.exit_code == 1, done.output
    assert f"{PLACE} has no owner lease; nothing to release" in " ".join(done.output.split())


def test_owners_on_a_database_without_the_leases_table_says_to_migrate(tmp_path):
    done = owners({"BUS_DATABASE_URL": f"sqlite:///{tmp_path}/empty.db", "COLUMNS": "300"}, "--json")
    assert isinstance(done.exception, ConfigurationError)  # `bus` prints it and exits 2 (project/cli/main.py run)
    assert "run `bus db upgrade` first" in str(done.exception)
    dispose(f"sqlite:///{tmp_path}/empty.db")
