"""Workers relay what a crash left in the outbox: no beat process is needed.

Every worker's main process runs a thread (bootstep `OutboxRelay`) that ticks every
BUS_RELAY_INTERVAL seconds. A tick takes or renews the lease `relay` in the bus
database (project/store/lease.py; key and holder are the worker's node name, so one worker
holds it at a time), and the holder publishes the outbox rows older than
BUS_RELAY_GRACE seconds; younger rows are left to the worker that wrote them, which
publishes them right after its commit. It also publishes the durable timers due within
BUS_TIMER_THRESHOLD (project/messaging/timers.py), which a publish after commit leaves
to it: an interval longer than the threshold would make them late. A holder that stops
releases the lease; one that dies keeps it for LEASE_TICKS intervals, then the next
worker to tick takes over.
Rows are claimed as they are published (project/messaging/outbox.py), so beat's relay task or
`bus relay` running as well cannot publish a row twice. An idle tick costs the
lease's statement and two indexed queries (leftovers, due timers). BUS_RELAY_INTERVAL=0
turns it off, for deployments that run beat or `bus relay`.

A thread, not a timer of the worker's event loop: publishing a backlog of thousands of
rows takes seconds, during which the event loop would not hand out messages.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

from celery import Celery, bootsteps
from sqlalchemy.engine import Engine

from project.store import lease

logger = logging.getLogger(__name__)
LEASE = "relay"
#: a holder that stopped ticking keeps the lease this many intervals
LEASE_TICKS = 3
#: seconds a stopping worker waits for a tick in progress (its batch's publish) to end
STOP_TIMEOUT = 10.0
_installed: dict[int, tuple[Callable[[], Engine], Callable[[timedelta], int]]] = {}


def install(app: Celery, engine: Callable[[], Engine], relay_rows: Callable[[timedelta], int]) -> None:
    """Give `app`'s workers the relay thread; `relay_rows(grace)` publishes rows older than `grace`."""
    _installed[id(app)] = (engine, relay_rows)
    app.steps["worker"].add(OutboxRelay)


@dataclass
class Relayer:
    """One worker's part in the relay: hold the lease, and as its holder publish what waits."""

    engine: Callable[[], Engine]
    relay_rows: Callable[[timedelta], int]
    holder: str
    interval: float
    grace: timedelta
    holding: bool | None = None  # unknown until the first tick, which logs what it found

    def tick(self) -> int:
        """Take or renew the lease; as its holder, relay the rows older than the grace; the number relayed."""
        ttl = timedelta(seconds=self.interval * LEASE_TICKS)
        won, held = lease.acquire(self.engine(), LEASE, self.holder, self.holder, ttl)
        if won != self.holding:
            self.holding = won
            if won:
                logger.info("outbox relay: %s holds the relay lease; it publishes rows older than %ss every %ss",
                            self.holder, self.grace.total_seconds(), self.interval)
            else:
                logger.info("outbox relay: %s holds the relay lease; this worker stands by", held.holder)
        if not won:
            return 0
        count = self.relay_rows(self.grace)
        if count:
            logger.info("outbox relay: published %d row(s) left in the outbox", count)
        return count

    def release(self) -> None:
        """Give the lease up (if this worker still holds it), so another worker takes over at its next tick."""
        if self.holding:
            self.holding = False
            lease.release(self.engine(), LEASE, key=self.holder)


class RelayThread(threading.Thread):
    """Ticks a `Relayer` every interval until stopped, then releases its lease."""

    def __init__(self, relayer: Relayer) -> None:
        super().__init__(name="bus-outbox-relay", daemon=True)
        self.relayer = relayer
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.relayer.tick()
            except Exception:  # database or broker away: the rows wait, the next tick tries again
                logger.warning("outbox relay: tick failed; next try in %ss", self.relayer.interval, exc_info=True)
            self._stopping.wait(self.relayer.interval)
        try:
            self.relayer.release()
        except Exception:  # it expires after LEASE_TICKS intervals instead
            logger.warning("outbox relay: could not release the relay lease", exc_info=True)

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join(STOP_TIMEOUT)


class OutboxRelay(bootsteps.StartStopStep):
    """The relay thread in the worker's main process, started once the pool has forked its processes."""

    label = "bus-outbox-relay"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **options: Any) -> None:
        self.enabled = _interval(worker.app) > 0
        super().__init__(worker, **options)

    def create(self, worker: Any) -> RelayThread:
        engine, relay_rows = _installed[id(worker.app)]
        # Created here, in the main thread: pool processes fork while the relay thread runs,
        # and a fork must not catch it inside the engine registry's lock for a whole creation.
        engine()
        grace = timedelta(seconds=worker.app.conf.get("bus_relay_grace", 5))
        return RelayThread(Relayer(engine, relay_rows, worker.hostname, _interval(worker.app), grace))


def _interval(app: Celery) -> float:
    return float(app.conf.get("bus_relay_interval", 10))
