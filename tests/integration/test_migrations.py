"""The Alembic migrations: the bus's history (in the package) and the shop's (migrations/), on SQLite and PostgreSQL.

- The bus's history alone creates the bus_* tables and nothing else, as they are in
  project/store/tables.py: it is what an installed package runs for an application.
- One `upgrade` runs the bus's history and the application's (BUS_MIGRATIONS; in this
  checkout, migrations/) to every head, and the tables then match the models (what
  `alembic revision --autogenerate` would compare): a model change without its migration
  fails here.
- A database of the single history the repository had before (0001..0007 created the bus's
  tables and the shop's, alembic_version holding 0007) upgrades to both heads with its rows.
- A BUS_MIGRATIONS that is not an application's Alembic folder, or a broken history, stops
  `bus db upgrade` with one line naming the fix.
"""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, func, insert, inspect, select, text

from adapters.orm import audit_log, orders, port_calls, users
from adapters.orm import metadata as shop_metadata
from project.store.engine import dispose, engine_for
from project.store.migrate import alembic_config, upgrade
from project.store.tables import commands, metadata, utcnow
from tests.conftest import REPO
from tests.integration.support.bus_services import require

ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
BUS = str(Path(sys.executable).with_name("bus"))
SHOP = REPO / "migrations"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/migrations.db"
        yield url
        dispose(url)
        return
    require("postgresql")
    name = f"bus_migrations_{uuid.uuid4().hex[:10]}"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    try:
        yield url
    finally:
        dispose(url)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def differences(url: str, *metadatas) -> list:
    with engine_for(url).connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), list(metadatas))


def tables(url: str) -> set[str]:
    return set(inspect(engine_for(url)).get_table_names()) - {"alembic_version"}


def applied(url: str, *applications: Path) -> set[str]:
    """Every revision the database counts as applied: its recorded heads and all they stand on."""
    script = ScriptDirectory.from_config(alembic_config(url, applications))
    with engine_for(url).connect() as conn:
        current = MigrationContext.configure(conn).get_current_heads()
    return {revision.revision for revision in script.iterate_revisions(current, "base")}


def heads(*applications: Path) -> set[str]:
    return set(ScriptDirectory.from_config(alembic_config("sqlite://", applications)).get_heads())


def test_the_bus_history_alone_creates_the_bus_tables_only(database_url: str):
    # Given a fresh database
    # When the bus's history alone runs (no application)
    upgrade(database_url, applications=())
    # Then it holds the bus_* tables, exactly as the bus's models say, and nothing else
    assert tables(database_url) == set(metadata.tables)
    assert all(name.startswith("bus_") for name in tables(database_url))
    assert differences(database_url, metadata) == []
    assert applied(database_url) >= heads()


def test_one_upgrade_runs_the_bus_history_and_the_application_history_to_their_heads(
        database_url: str, monkeypatch: pytest.MonkeyPatch):
    # Given a fresh database, and BUS_MIGRATIONS unset in the shop's folder (the default: its migrations/)
    monkeypatch.chdir(REPO)
    # When `upgrade` runs once
    upgrade(database_url)
    # Then both histories are at their heads, and the tables match the bus's and the shop's models
    assert applied(database_url, SHOP) >= heads(SHOP)
    assert len(heads(SHOP)) == 2
    assert tables(database_url) == set(metadata.tables) | set(shop_metadata.tables)
    assert differences(database_url, metadata, shop_metadata) == []


def test_a_database_of_the_old_single_history_at_0007_upgrades_to_both_heads_keeping_its_rows(database_url: str):
    # Given a database as the single history left it: the bus's tables and the shop's (what
    # today's bus 0001..0007 and shop_0001 create), alembic_version holding 0007 alone; with rows
    upgrade(database_url, "shop_0001", applications=[SHOP])
    with engine_for(database_url).begin() as conn:
        conn.execute(text("DELETE FROM alembic_version"))
        conn.execute(text("INSERT INTO alembic_version (version_num) VALUES ('0007')"))
        conn.execute(insert(orders), [{"order_id": "o-1", "customer_id": "c-1", "lines": [], "total": "1.00"}])
        conn.execute(insert(users), [{"user_id": "u-1", "email": "a@example.com", "name": "A"}])
        conn.execute(insert(audit_log), [{"what": "OrderPlaced", "subject": "o-1"}])
        conn.execute(insert(port_calls), [{"port": "mail", "target": "a@example.com", "payload": {}}])
        conn.execute(insert(commands), [{"task": "orders.place_order", "key": "k-1", "payload_hash": "h",
                                         "payload": {}, "status": "done", "message_id": "m-1", "duplicates": 0,
                                         "created_at": utcnow()}])
    assert applied(database_url, SHOP) == {f"000{n}" for n in range(1, 8)}
    # When both histories are upgraded (the shop's first revision finds its tables there)
    upgrade(database_url, applications=[SHOP])
    # Then both histories are at their heads, the schema is unchanged, and every row is still there
    assert applied(database_url, SHOP) >= heads(SHOP)
    assert differences(database_url, metadata, shop_metadata) == []
    with engine_for(database_url).connect() as conn:
        counts = [conn.execute(select(func.count()).select_from(t)).scalar_one()
                  for t in (orders, users, audit_log, port_calls, commands)]
    assert counts == [1, 1, 1, 1, 1]


BROKEN = {
    "missing": None,
    "no versions folder": {},
    "unknown down_revision": {"versions/bad_0001.py": "revision = 'bad_0001'\ndown_revision = 'nope'\n"
                                                      "branch_labels = None\ndepends_on = None\n"},
    "syntax error": {"versions/bad_0001.py": "revision = 'bad_0001'\ndef upgrade(:\n"},
    "a bus revision id again": {"versions/bad_0003.py": "revision = '0003'\ndown_revision = None\n"
                                                        "branch_labels = ('bad',)\ndepends_on = '0007'\n"},
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_a_bad_bus_migrations_stops_bus_db_upgrade_with_one_line_naming_the_fix(case: str, tmp_path: Path):
    # Given BUS_MIGRATIONS naming something that is not a working application history
    folder = tmp_path / "app-migrations"
    for name, source in (BROKEN[case] or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(source)
    if BROKEN[case] is not None:
        folder.mkdir(exist_ok=True)
    env = {**os.environ, "BUS_HOME": str(tmp_path / "home"), "BUS_MIGRATIONS": str(folder)}
    # When `bus db upgrade` runs
    done = subprocess.run([BUS, "db", "upgrade"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    # Then it stops with exit 2 and one line that names BUS_MIGRATIONS (the fix), no traceback
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "BUS_MIGRATIONS" in lines[0] and "Traceback" not in done.stderr
    # and the database was not touched
    assert not (tmp_path / "home" / "bus.db").exists()
