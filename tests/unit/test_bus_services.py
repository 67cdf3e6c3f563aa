"""The service check of the integration tests: skip with the start command, or fail under CI."""
from __future__ import annotations

import socket

import pytest

from tests.integration.support import bus_services
from tests.integration.support.bus_services import Service, require


@pytest.fixture
def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def redis_down(monkeypatch, closed_port) -> Service:
    down = Service("Redis", "127.0.0.1", closed_port, "redis-server --daemonize yes")
    monkeypatch.setitem(bus_services.SERVICES, "redis", down)
    return down


def test_a_missing_service_skips_with_the_command_that_starts_it(monkeypatch, redis_down):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        require("redis")
    assert str(skipped.value) == (f"Redis is not reachable at 127.0.0.1:{redis_down.port}; "
                                  "start it with: redis-server --daemonize yes")


def test_under_ci_a_missing_service_fails_the_run(monkeypatch, redis_down):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception) as failed:
        require("redis")
    assert "Redis is not reachable" in str(failed.value)
    assert "CI=true: a missing service fails the run" in str(failed.value)


def test_a_listening_service_is_reachable(closed_port):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert Service("x", "127.0.0.1", server.getsockname()[1], "").reachable()
    assert not Service("x", "127.0.0.1", closed_port, "").reachable()


@pytest.mark.parametrize("kind", ["embedded", "sqlite"])
def test_embedded_parts_need_no_service(kind):
    assert require(kind) is None
