"""The wheel is the bus alone: `project` and its data, the `bus` script, the pytest plugin.

This repository's application (handlers/, tasks/, adapters/, entrypoints/, celeryconfig.py)
stays out of it: it is imported from the working directory (tests/unit/test_application.py).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import REPO

#: what a build must not see: local state, build leftovers (a stale build/lib would be packed too)
LEFT_OUT = shutil.ignore_patterns(".git", ".venv", ".bus", "build", "dist", "*.egg-info", "__pycache__",
                                  ".pytest_cache", "scratch")


def test_the_wheel_installs_the_package_project_only(tmp_path):
    # Given a copy of the source tree, this repository's application included
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=LEFT_OUT)
    # When pip builds the wheel from it
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--disable-pip-version-check",
                           "-w", str(tmp_path / "dist"), "."], cwd=source, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    [wheel] = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        dist_info = next(Path(n).parent.name for n in names if n.endswith(".dist-info/RECORD"))
        top_level = archive.read(f"{dist_info}/top_level.txt").decode().split()
        record = archive.read(f"{dist_info}/RECORD").decode().splitlines()
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    # Then its one top-level name is `project`, and every file it installs is under it
    assert top_level == ["project"]
    assert {line.split(",")[0].split("/")[0] for line in record} == {"project", dist_info}
    # And the console script is the bus's generic `bus`, the pytest plugin the bus's
    assert "bus = project.cli.main:main" in entry_points
    assert "celery_bus = project.testing.pytest_plugin" in entry_points


def test_the_image_ships_the_shop_where_its_processes_find_it():
    # Given the Dockerfile's final stage (the wheel in it is the bus alone)
    from tests.unit.test_compose import final_stage
    stage = final_stage()
    env = dict(pair.split("=", 1) for k, args in stage if k == "ENV" for pair in args.split())
    copies = {args.split()[0].rstrip("/"): args.split()[-1].rstrip("/") for k, args in stage if k == "COPY"}
    # Then the shop's packages and celeryconfig.py are copied to one folder on PYTHONPATH
    shop = {name: copies.get(name) for name in ("handlers", "tasks", "adapters", "entrypoints")}
    home = env["PYTHONPATH"]
    assert shop == {name: f"{home}/{name}" for name in shop}, copies
    assert copies.get("celeryconfig.py") == home
    # And every process (worker, beat, Flower, `bus db upgrade`, `bus api`) takes that celeryconfig
    assert env["BUS_CONFIG_MODULE"] == "celeryconfig"
