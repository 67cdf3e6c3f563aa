"""Fixtures of the unit tests: a real SQLite file, no broker."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy.engine import Engine

from project.store.engine import dispose, engine_for
from project.store.migrate import upgrade


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    """A fresh SQLite database at the migrations' head."""
    url = f"sqlite:///{tmp_path}/bus.db"
    upgrade(url)
    yield engine_for(url)
    dispose(url)
