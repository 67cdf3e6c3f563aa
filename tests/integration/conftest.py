"""Fixtures of the integration tests: real brokers, databases and `celery worker` processes.

Cost drives the shape: a worker needs 3-5 s to start, so each (broker, database) pair
gets ONE worker (2 processes) and one sending driver for the whole session, in the
session-scoped `cluster` fixture. pytest groups the tests by its parameter and tears a
pair down before it sets up the next, so at most one shared pair runs at a time.
Tests on a shared pair isolate themselves with unique ids and idempotency keys.
Tests that need workers of their own (queue selection, ownership) open a scenario of
their own with `opened(...)`; every process is stopped in teardown, also when a test
fails.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from tests.integration.support.bus_services import require
from tests.integration.support.scenarios import Scenario, open_scenario

BROKERS = ("embedded", "redis", "amqp")
DATABASES = ("sqlite", "postgresql")
# Every broker with every database, but: quorum queues with the production database only, and the
# embedded broker (a Redis server of the bus's own, the laptop default) with the laptop database only: on
# PostgreSQL it runs the Redis transport redis-postgresql already runs (test_scenarios.py opens that pair).
MATRIX = [pytest.param((broker, database), id=f"{broker}-{database}")
          for broker in (*BROKERS, "amqp-quorum") for database in DATABASES
          if (broker, database) not in (("amqp-quorum", "sqlite"), ("embedded", "postgresql"))]


@contextmanager
def opened(broker: str, database: str, tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Scenario]:
    """A fresh isolated scenario (after checking its services), closed on exit."""
    require(broker)
    require(database)
    # short paths: the embedded broker's unix socket path must stay under 108 bytes
    scenario = open_scenario(broker, database, tmp_path_factory.mktemp(f"{name}-{broker}-{database}"))
    try:
        yield scenario
    finally:
        scenario.close()


@pytest.fixture(scope="session", params=MATRIX)
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    """A running bus on one (broker, database) pair: a worker with 2 processes and a driver.

    The worker consumes every queue of the registry (no --boundary). Its outbox relay is
    off (BUS_RELAY_INTERVAL=0): tests here leave rows in the outbox on purpose and relay
    them themselves; the worker's relay has tests of its own (test_relay.py).
    """
    broker, database = request.param
    with opened(broker, database, tmp_path_factory, "shared") as scenario:
        scenario.worker = scenario.start_worker(concurrency=2, name="shared", env={"BUS_RELAY_INTERVAL": "0"})
        scenario.client = scenario.driver()
        yield scenario


@pytest.fixture
def uid() -> str:
    """A unique suffix for this test's ids and keys (tests share a cluster)."""
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def topology(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`bus topology --json` of the default configuration (every tasks module); needs no server."""
    home = tmp_path_factory.mktemp("topology")
    env = {**os.environ, "BUS_HOME": str(home), "BUS_DATABASE_URL": f"sqlite:///{home}/bus.db"}
    done = subprocess.run([str(Path(sys.executable).with_name("bus")), "topology", "--json"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)
