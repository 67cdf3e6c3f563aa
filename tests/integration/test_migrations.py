"""The Alembic migrations and the SQLAlchemy models agree, on SQLite and PostgreSQL.

Given a fresh database brought to head by the migrations, When Alembic compares it with
the models' metadata (what `alembic revision --autogenerate` would do), Then there is
no difference: a model change without its migration fails here.
"""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, text

import adapters.orm  # noqa: F401  (the domain tables join the shared metadata)
from project.store.engine import dispose, engine_for
from project.store.migrate import upgrade
from project.store.tables import metadata
from tests.integration.support.bus_services import require

ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/migrations.db"
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


def test_migrations_at_head_match_the_models(database_url: str):
    # Given a database migrated to head
    upgrade(database_url)
    # When Alembic compares it with the models
    with engine_for(database_url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    # Then nothing differs
    assert diff == []
