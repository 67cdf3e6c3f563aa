"""pytest plugin of celery-bus (entry point `celery_bus`), loaded when the package is installed.

Fixtures:
- `bus_harness`: the real bus in process (no broker, no Celery), on a fresh SQLite
  database migrated once per session and copied per test; see project/testing/harness.py.
- `bus_worker`: real `celery -A project worker` subprocesses against the broker and
  database given by the environment (CELERY_BROKER_URL, BUS_DATABASE_URL), for tests
  marked `@pytest.mark.bus_worker(boundaries=["orders"], concurrency=2)`; stopped by PID
  at teardown. The embedded broker, when not running yet, is started by this pytest
  process (it stops when the session ends), so it outlives each test's workers.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "bus_worker(boundaries=(), concurrency=1): start real celery-bus workers for this test")


def _loaded_bus() -> Any:
    from project import app, bus
    from project.errors import ConfigurationError
    from project.settings import import_task_modules
    try:
        import_task_modules(app)
    except ConfigurationError as exc:
        pytest.fail(str(exc), pytrace=False)  # one line naming BUS_TASK_MODULES or the module, not a traceback
    return bus


@pytest.fixture(scope="session")
def bus_harness_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file with the application's migrations applied (once per session)."""
    from project.store.engine import dispose
    from project.store.migrate import upgrade
    path = tmp_path_factory.mktemp("bus-harness") / "template.db"
    upgrade(f"sqlite:///{path}")
    dispose(f"sqlite:///{path}")  # closing the last connection checkpoints the WAL into the file
    return path


@pytest.fixture
def bus_harness(bus_harness_template: Path, tmp_path: Path) -> Iterator[Any]:
    """The in-process harness on a fresh copy of the migrated database."""
    from project.testing.harness import BusHarness
    database = tmp_path / "bus.db"
    shutil.copyfile(bus_harness_template, database)
    with BusHarness(_loaded_bus(), f"sqlite:///{database}") as harness:
        yield harness


@pytest.fixture
def bus_worker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """Real workers for the boundaries named by the test's `bus_worker` marker (the database migrated first)."""
    from project.store.migrate import upgrade
    from project.testing.processes import start_worker
    marker = request.node.get_closest_marker("bus_worker")
    options = dict(marker.kwargs) if marker else {}
    bus = _loaded_bus()
    upgrade(bus.settings.database_url)  # a worker refuses to start on an unmigrated database (owner leases)
    bus.ensure_broker()  # the embedded broker, if used, stops with this pytest process, not with the test's worker
    worker = start_worker(logdir=tmp_path / "workers", boundaries=list(options.get("boundaries", ())),
                          concurrency=int(options.get("concurrency", 1)), name="pytest")
    try:
        worker.wait_ready(bus.app)
        yield worker
    finally:
        worker.stop()
