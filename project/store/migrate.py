"""Schema management through Alembic (never `create_all` at import)."""
from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config

from project.errors import ConfigurationError


def migrations_dir() -> Path:
    """`$BUS_MIGRATIONS`, or the application's `migrations/` beside the `project` package."""
    path = Path(os.environ.get("BUS_MIGRATIONS") or Path(__file__).resolve().parents[2] / "migrations")
    if not (path / "env.py").exists():
        raise ConfigurationError(f"no Alembic environment at {path}; set BUS_MIGRATIONS to the folder holding env.py")
    return path


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the database at `database_url` to `revision`."""
    if database_url.startswith("sqlite:///"):
        Path(database_url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(database_url), revision)
