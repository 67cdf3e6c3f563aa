"""The composition root (project/compose.py): one bus per app, wired once; the rooms never see the Bus.

Composing runs in a process of its own: it connects Celery signals for the whole process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grimp

from tests.conftest import REPO

#: the rooms that take parts of the bus (its wiring, providers, engine, settings), never the bus itself
ROOMS = ("project.messaging", "project.store", "project.dead_letters", "project.transport", "project.observe")

PROBE = """
import json
from datetime import timedelta
from celery import Celery
from project.compose import compose

shop, other = Celery("shop", set_as_current=False), Celery("other", set_as_current=False)
bus = compose(shop)
again = compose(shop)
second = compose(other)
bus.purge_keys = lambda age: "shop's bus"
second.purge_keys = lambda age: "other's bus"
print(json.dumps({
    "same": again is bus, "distinct": second is not bus,
    "boundary_options": sum("--boundary" in option.opts for option in shop.user_options["worker"]),
    "metrics_options": sum("--metrics-port" in option.opts for option in shop.user_options["worker"]),
    "tasks": sorted(name for name in shop.tasks if name.startswith("bus.")),
    "purged_by": [app.tasks["bus.purge_keys"].run("1d") for app in (shop, other)],
}))
"""


def composed(tmp_path: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "BUS_HOME": str(tmp_path), "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_composing_an_app_twice_returns_its_bus_and_wires_it_once(tmp_path: Path):
    # Given an app composed, When it is composed again
    found = composed(tmp_path)
    # Then it is the same bus, and the worker options were added once (click refuses an option twice)
    assert found["same"]
    assert (found["boundary_options"], found["metrics_options"]) == (1, 1)
    # And the maintenance tasks are the app's, under the names beat's schedule uses
    assert found["tasks"] == ["bus.purge", "bus.purge_keys", "bus.relay_outbox"]


def test_each_app_gets_its_own_bus_and_its_maintenance_tasks_run_on_it(tmp_path: Path):
    # Given two apps composed in one process
    found = composed(tmp_path)
    # Then each has a bus of its own, and each app's bus.purge_keys purges through that bus
    assert found["distinct"]
    assert found["purged_by"] == ["shop's bus", "other's bus"]


def test_no_room_of_the_bus_imports_the_bus():
    # Given the import graph of project/, TYPE_CHECKING and function-local imports included
    graph = grimp.build_graph("project", cache_dir=None)
    # When the modules that reach project.core are listed
    reaching = graph.find_downstream_modules("project.core")
    # Then none is in a room: they get what they use as arguments (compose.py passes it)
    assert sorted(m for m in reaching if m.startswith(ROOMS)) == []
