"""The harness itself: a closed scenario gives back everything it took.

Without this, a teardown that silently skips its cleanups leaks an embedded
redis-server, a Redis database, a RabbitMQ vhost or a PostgreSQL database per run.
"""
from __future__ import annotations

import subprocess
from urllib.parse import urlparse

import pytest
import redis
from sqlalchemy import create_engine, text

from project.testing.isolation import REDIS_MARK
from project.transport import embedded
from tests.integration.conftest import opened
from tests.integration.support.scenarios import PG_ADMIN_URL

pytestmark = pytest.mark.integration


def database_exists(name: str) -> bool:
    admin = create_engine(PG_ADMIN_URL)
    try:
        with admin.connect() as conn:
            return conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first() is not None
    finally:
        admin.dispose()


def vhosts() -> set[str]:
    done = subprocess.run(["rabbitmqctl", "-q", "list_vhosts", "name"], capture_output=True, text=True, timeout=60)
    return set(done.stdout.split())


@pytest.mark.parametrize("broker, database", [("embedded", "postgresql"), ("redis", "sqlite"), ("amqp", "sqlite")])
def test_closing_a_scenario_releases_its_broker_namespace_and_database(tmp_path_factory, broker, database):
    # Given an open scenario, used by a worker
    with opened(broker, database, tmp_path_factory, "release") as scenario:
        scenario.start_worker(name="release", concurrency=1)
        home, url, db_url = scenario.home, urlparse(scenario.broker_url), urlparse(scenario.database_url)
        if broker == "embedded":
            assert embedded.pid(home) is not None
        elif broker == "redis":
            assert redis.Redis(db=int(url.path.strip("/"))).get(REDIS_MARK) is not None
        else:
            assert url.path.strip("/") in vhosts()
        if database == "postgresql":
            assert database_exists(db_url.path.strip("/"))
    # When it is closed (the `with` block ended)
    # Then its worker is gone, and so are its broker namespace and its database
    assert all(w.process.poll() is not None for w in [scenario.worker] if w) and not scenario._workers
    if broker == "embedded":
        assert embedded.pid(home) is None
    elif broker == "redis":
        assert redis.Redis(db=int(url.path.strip("/"))).dbsize() == 0
    else:
        assert url.path.strip("/") not in vhosts()
    if database == "postgresql":
        assert not database_exists(db_url.path.strip("/"))
