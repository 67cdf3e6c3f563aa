"""Which Alembic histories `bus db upgrade` runs: the bus's own, then the applications' (BUS_MIGRATIONS).

The runs themselves, on SQLite and PostgreSQL, are in tests/integration/test_migrations.py.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from project.errors import ConfigurationError
from project.settings import load
from project.store.migrate import BUS_MIGRATIONS, applications_from
from tests.conftest import REPO


def application(root: Path) -> Path:
    (root / "migrations" / "versions").mkdir(parents=True)
    return root / "migrations"


def test_bus_migrations_lists_folders_separated_like_path(tmp_path):
    # Given BUS_MIGRATIONS naming two folders, one relative, with blanks around
    env = {"BUS_HOME": str(tmp_path), "BUS_MIGRATIONS": f" {tmp_path / 'a'} {os.pathsep}b{os.pathsep}"}
    # Then the settings hold both, absolute, in order
    assert load(env).migrations == (tmp_path / "a", Path("b").resolve())
    # and unset, none
    assert load({"BUS_HOME": str(tmp_path)}).migrations == ()


def test_the_folders_named_are_the_applications_histories(tmp_path):
    # Given two application folders holding versions/
    first, second = application(tmp_path / "one"), application(tmp_path / "two")
    # Then they are run, in that order, wherever the working directory is
    assert applications_from((first, second), "project.config", tmp_path) == [first, second]


def test_unset_the_working_directorys_migrations_run_when_it_is_the_application(tmp_path):
    # Given a working directory with an application's migrations/versions
    folder = application(tmp_path)
    # Then they run when its celeryconfig.py is the config module, and not otherwise
    assert applications_from((), "celeryconfig", tmp_path) == [folder]
    assert applications_from((), "project.config", tmp_path) == []
    # and a working directory without migrations/versions has none
    assert applications_from((), "celeryconfig", tmp_path / "elsewhere") == []


def test_this_repository_runs_the_shop_history_by_default():
    # Given this repository's root as the working directory (its celeryconfig.py, its migrations/)
    # Then the shop's history runs after the bus's, which ships inside the package
    assert applications_from((), "celeryconfig", REPO) == [REPO / "migrations"]
    assert (BUS_MIGRATIONS / "env.py").is_file() and (BUS_MIGRATIONS / "versions").is_dir()


@pytest.mark.parametrize("make, says", [
    (lambda root: root / "missing", "which is not a folder"),
    (lambda root: root, "which holds no versions/ folder"),
], ids=["missing", "no versions folder"])
def test_a_folder_that_is_not_an_alembic_folder_is_one_line_naming_the_fix(tmp_path, make, says):
    # Given BUS_MIGRATIONS naming a folder that is missing, or holds no versions/
    named = make(tmp_path)
    # Then choosing the histories stops with one line naming the variable and what it must name
    with pytest.raises(ConfigurationError) as refused:
        applications_from((named,), "celeryconfig", tmp_path)
    message = str(refused.value)
    assert "\n" not in message and says in message
    assert f"BUS_MIGRATIONS names {named}" in message and "the one holding versions/" in message
