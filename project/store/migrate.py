"""Schema management through Alembic (never `create_all` at import).

Two kinds of history, one run: the bus's own (`versions/` under project/store/migrations,
shipped in the package, branch `bus`) and each application's (an Alembic folder holding
`versions/`, named by BUS_MIGRATIONS; unset, the application's `migrations/` in the working
directory, where its celeryconfig.py is).
They are version locations of one Alembic script directory: `upgrade` brings every head to
date in one `alembic upgrade heads`, recorded in one alembic_version table (a row per
branch head). An application's root revision `depends_on` the bus revision it needs, so
Alembic runs that bus revision first.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util import CommandError

from project.errors import ConfigurationError
from project.store.engine import engine_for

#: the bus's Alembic environment (env.py, script.py.mako) and its history (versions/)
BUS_MIGRATIONS = Path(__file__).resolve().parent / "migrations"
FIX = ("set BUS_MIGRATIONS to the application's Alembic folder (the one holding versions/), "
       "several separated by ':'")


def checked(folders: Sequence[Path]) -> list[Path]:
    """`folders` if each is an Alembic folder holding versions/; else a one-line error naming the fix."""
    for path in folders:
        if not path.is_dir():
            raise ConfigurationError(f"BUS_MIGRATIONS names {path}, which is not a folder; {FIX}")
        if not (path / "versions").is_dir():
            raise ConfigurationError(f"BUS_MIGRATIONS names {path}, which holds no versions/ folder; {FIX}")
    return list(folders)


def applications_from(configured: Sequence[Path], config_module: str, cwd: Path) -> list[Path]:
    """BUS_MIGRATIONS's folders, checked. Unset: `migrations/` in the working directory when that is
    the application's (its celeryconfig.py is the config module) and the folder holds versions/; else none."""
    if configured:
        return checked(configured)
    default = cwd / "migrations"
    return [default] if config_module == "celeryconfig" and (default / "versions").is_dir() else []


def current_applications() -> list[Path]:
    """The applications' Alembic folders of the environment as it is now.

    Read afresh, not through `current()`: a process that migrates a database before it sets
    up its environment (the test scenarios, the fault bench) would otherwise keep the
    settings of before for good, e.g. classic queues on a quorum broker.
    """
    from project.settings import config_module, load
    return applications_from(load().migrations, config_module(), Path.cwd())


def alembic_config(database_url: str, applications: Sequence[Path]) -> Config:
    """The bus's environment, with the bus's history and the applications' as version locations."""
    cfg = Config()
    cfg.set_main_option("script_location", str(BUS_MIGRATIONS))
    locations = [BUS_MIGRATIONS / "versions", *(path / "versions" for path in applications)]
    cfg.set_main_option("version_locations", os.pathsep.join(str(p) for p in locations).replace("%", "%%"))
    cfg.set_main_option("path_separator", "os")  # Alembic >= 1.16
    cfg.set_main_option("version_path_separator", "os")  # Alembic 1.13-1.15 (1.16+ reads path_separator first)
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def history(cfg: Config, applications: Sequence[Path]) -> ScriptDirectory:
    """Every revision script loaded; a broken one (syntax, unknown down_revision, cycle) is a one-line error."""
    try:
        with warnings.catch_warnings():
            # Alembic only warns of a revision id present twice or a down_revision it cannot find
            warnings.simplefilter("error", UserWarning)
            script = ScriptDirectory.from_config(cfg)
            list(script.walk_revisions())
            script.get_revisions("heads")
    except Exception as exc:  # whatever fails while loading the scripts, the scripts are to fix
        raise ConfigurationError(
            f"the migrations do not load ({type(exc).__name__}: {one_line(exc)}); fix the revision scripts "
            f"({where(applications)}; each application root has down_revision = None and depends_on a bus "
            f"revision; revision ids are unique across histories)") from None
    return script


def where(applications: Sequence[Path]) -> str:
    return f"BUS_MIGRATIONS={os.pathsep.join(map(str, applications))}" if applications else "BUS_MIGRATIONS unset"


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def check_known(database_url: str, script: ScriptDirectory, applications: Sequence[Path]) -> None:
    """The database's recorded revisions all belong to the histories given (else BUS_MIGRATIONS misses one)."""
    with engine_for(database_url).connect() as conn:
        current = MigrationContext.configure(conn).get_current_heads()
    known = {rev.revision for rev in script.walk_revisions()}
    unknown = sorted(set(current) - known)
    if unknown:
        histories = f"neither the bus's history nor {where(applications)} holds" if applications else \
            "the bus's history does not hold (BUS_MIGRATIONS is unset)"
        raise ConfigurationError(f"the database is at revision {', '.join(unknown)}, which {histories}; {FIX}")


def upgrade(database_url: str, revision: str = "heads", applications: Sequence[Path] | None = None) -> None:
    """Bring the database at `database_url` to `revision`: by default every head, the bus's and the applications'.

    `applications`: the applications' Alembic folders; None reads BUS_MIGRATIONS through the
    settings, `()` runs the bus's history alone.
    """
    applications = current_applications() if applications is None else checked(applications)
    cfg = alembic_config(database_url, applications)
    script = history(cfg, applications)
    if database_url.startswith("sqlite:///"):
        Path(database_url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    check_known(database_url, script, applications)
    try:
        command.upgrade(cfg, revision)
    except (CommandError, RevisionError) as exc:
        raise ConfigurationError(
            f"cannot upgrade to {revision!r}: {one_line(exc)}; name heads (every history), bus@head, "
            f"or <branch>@head of an application") from None
