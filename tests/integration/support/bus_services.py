"""Are the real services up? Checked by TCP, with the command that starts each one.

When `CI=true` a missing service fails the test run (a green CI run must mean every
backend was exercised); otherwise the tests that need it are skipped with a message
naming the service and how to start it.
"""
from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class Service:
    name: str
    host: str
    port: int
    start: str

    def reachable(self, timeout: float = 1.0) -> bool:
        """True if something accepts TCP connections on host:port."""
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout):
                return True
        except OSError:
            return False


SERVICES = {
    "redis": Service(
        "Redis", "127.0.0.1", 6379,
        'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no '
        "--dir /var/lib/redis --logfile /var/log/redis/ci.log"),
    "amqp": Service("RabbitMQ", "127.0.0.1", 5672, "rabbitmq-server -detached && rabbitmqctl await_startup"),
    "postgresql": Service(
        "PostgreSQL", "127.0.0.1", 5432,
        "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"),
}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def missing(message: str) -> None:
    """Fail under CI, skip elsewhere."""
    if in_ci():
        pytest.fail(f"{message} (CI=true: a missing service fails the run)", pytrace=False)
    pytest.skip(message)


def require(kind: str) -> Service | None:
    """Skip or fail unless the service behind `kind` is up (`embedded`/`sqlite` need none)."""
    kind = "amqp" if kind == "amqp-quorum" else kind
    service = SERVICES.get(kind)
    if service is None:
        return None
    if not service.reachable():
        missing(f"{service.name} is not reachable at {service.host}:{service.port}; start it with: {service.start}")
    if kind == "amqp" and shutil.which("rabbitmqctl") is None:
        missing("rabbitmqctl is not on PATH: the tests create a RabbitMQ vhost per session with it")
    return service
