"""What the bus's parts use of one bus, without the bus: its Celery app, topology, database and broker.

Publishing outbox rows, replaying dead letters, the cluster survey and the worker's
start-up take a `Wiring` (project/compose.py builds the bus, which holds its own).
`engine` and `ensure_broker` are called at each use: the in-process test harness
redirects the bus to a database of its own (Bus.redirected), and the embedded broker
starts on first use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy.engine import Engine

    from project.messaging.registry import Registry
    from project.messaging.topology import Topology


@dataclass(frozen=True)
class Wiring:
    app: Celery
    topology: Topology
    #: this process's engine of the bus database (as redirected now)
    engine: Callable[[], Engine]
    #: start the embedded broker on first use in this process (no-op on real brokers)
    ensure_broker: Callable[[], None]

    @property
    def registry(self) -> Registry:
        return self.topology.registry
