"""Fresh databases at the migrations' head, for tests that talk to the database alone (no broker).

`migrated_database("sqlite" | "postgresql", tmp_path)` yields the URL of a SQLite file
under `tmp_path`, or of a PostgreSQL database of its own (skipped, or failed under CI,
when PostgreSQL is down); both are disposed of, the PostgreSQL one dropped, at the end.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from project.store.engine import dispose
from project.store.migrate import upgrade
from project.testing import isolation
from tests.integration.support.bus_services import require
from tests.integration.support.scenarios import PG_ADMIN_URL


@contextmanager
def migrated_database(kind: str, tmp_path: Path, prefix: str = "bus_test") -> Iterator[str]:
    """The URL of a fresh `kind` database at the migrations' head; gone when the block ends."""
    cleanups: list = []
    try:
        if kind == "postgresql":
            require("postgresql")
            url = isolation.postgres_database(cleanups, PG_ADMIN_URL, prefix=prefix)  # its drop disposes of it
        else:
            url = f"sqlite:///{tmp_path}/bus.db"
            cleanups.append(lambda: dispose(url))
        upgrade(url)
        yield url
    finally:
        for step in reversed(cleanups):
            step()
