"""What every part of `bus bench` shares: the options of a run, its error, and the arithmetic of its figures.

project/bench/run.py (the command and its report), project/bench/phases.py (the
measurements) and project/bench/peers.py (dramatiq and FastStream) import this; it
imports none of them.
"""
from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BROKERS = ("embedded", "redis", "amqp")
PHASES = ("commands", "latency", "fanout", "relay", "timers", "process")
#: a run without --phases: timers and process (the bus only, two more workers, 3 x n messages) are asked for
DEFAULT_PHASES = PHASES[:4]
DATABASES = ("sqlite", "postgresql")
#: where the bus's side keeps Celery results: the bus's default for the broker, or its database
RESULTS = ("default", "database", "redis")


class BenchError(RuntimeError):
    """The bench could not measure something; the message says what and where the logs are."""


@dataclass
class Options:
    """One run: what `bus bench` was asked to measure, and on what."""

    broker: str = "redis"
    db: str = "sqlite"
    n: int = 2000
    subscribers: list[int] = field(default_factory=lambda: [4])
    repeat: int = 1
    latency_n: int = 1000
    rate: float = 200.0
    concurrency: int = 2
    pool: str = "prefork"
    loglevel: str = "info"
    stall: float = 20.0
    phases: tuple[str, ...] = DEFAULT_PHASES
    redis_url: str = "redis://127.0.0.1:6379"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672"
    postgres_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    workdir: Path | None = None
    peers: bool = False  # also dramatiq and FastStream (project/bench/peers.py)
    # "database": CELERY_RESULT_BACKEND=db+<the run's database>; "redis": a Redis database of the run's (what batched
    # execution needs on RabbitMQ); on any broker
    results: str = "default"
    bare_results: bool = False  # the baseline stores results too (project/bench/bare.py)


# ---- figures -------------------------------------------------------------------------
def median(runs: list[dict[str, Any]], key: str) -> float:
    """The median of `key` over the runs that measured it; NaN if none did."""
    values = [r[key] for r in runs if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
    return statistics.median(values) if values else math.nan


def ratio(bus: float, bare: float) -> float:
    """bus ÷ bare; NaN if either is unknown or bare is zero."""
    return bus / bare if bare and not math.isnan(bare) and not math.isnan(bus) else math.nan


def fmt(value: Any, digits: int = 0) -> str:
    """A figure for a table: thousands separated, "-" when unknown."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def load_average() -> str:
    """The machine's load averages (1, 5, 15 min), recorded before and after each side."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"
