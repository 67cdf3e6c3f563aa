"""Exactly one handler per command queue across processes: owner leases in the bus database.

Before it consumes anything, a worker takes the lease `owner:<queue>` of every command
queue it consumes, keyed by the queue's handler (project/store/lease.py), all in one
transaction: two workers with different handlers that start at the same instant cannot
both win, on any broker, and a worker refused for one queue leaves no lease behind.
Replicas of one handler share the lease. The worker renews its leases every ttl/3
(`Heartbeat`, a thread of its main process); a lease nobody renews expires
BUS_OWNER_LEASE_TTL seconds (default 60) after its last renewal and the next asker
takes it over. A worker that stops does not give its leases up (its replicas may still
run): a renamed handler starts once they expire, or at once after `bus owners release`.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable, Iterable, Mapping

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from project.errors import ConfigurationError, OwnerConflict
from project.settings import env_int
from project.store import lease
from project.store.lease import Lease
from project.store.tables import utcnow

logger = logging.getLogger(__name__)
PREFIX = "owner:"
#: shortest ttl: renewals every ttl/3 must not come faster than once a second
MIN_TTL = 3


def lease_name(queue: str) -> str:
    return PREFIX + queue


def queue_of(held: Lease) -> str:
    return held.name[len(PREFIX):]


def lease_ttl(env: Mapping[str, str] | None = None) -> timedelta:
    """BUS_OWNER_LEASE_TTL: seconds an owner lease outlives its last renewal (default 60)."""
    return timedelta(seconds=env_int("BUS_OWNER_LEASE_TTL", 60, minimum=MIN_TTL, env=env))


def state(held: Lease, now: datetime | None = None) -> str:
    """`live` or `expired`."""
    return "expired" if held.expired(now) else "live"


def describe(held: Lease, now: datetime | None = None) -> str:
    """`handlers.x.y (last renewed by w@host, expires 2025-01-01 12:00:00 UTC, in 42 s)`."""
    now = now or utcnow()
    left = held.remaining(now).total_seconds()
    when = f"in {left:.0f} s" if left > 0 else f"{-left:.0f} s ago"
    return (f"{held.key} (last renewed by {held.holder}, "
            f"{'expires' if left > 0 else 'expired'} {held.expires_at:%Y-%m-%d %H:%M:%S} UTC, {when})")


@dataclass(frozen=True)
class Claimed:
    """What start-up found for one command queue, and what it did."""

    queue: str
    handler: str
    outcome: str  # took | took over | joined | renewed
    before: Lease | None

    def line(self) -> str:
        """The start-up log line for this queue."""
        text = f"owner lease of {self.queue}: {self.outcome} ({self.handler}"
        if self.outcome == "took over":
            text += f"; it was held by {describe(self.before)}"
        elif self.outcome == "joined" and self.before is not None:
            text += f"; shared with {self.before.holder}"
        return text + ")"


def claim(engine: Engine, owned: Mapping[str, str], holder: str, ttl: timedelta) -> list[Claimed]:
    """Take, join or renew the owner lease of every queue of `owned` ({queue: handler}) at once.

    Raises OwnerConflict, having changed nothing, if another handler holds one that has not expired.
    """
    try:
        before = {held.name: held for held in lease.listing(engine, PREFIX)}
        won, found = lease.acquire_all(engine, {lease_name(q): h for q, h in owned.items()}, holder, ttl)
    except SQLAlchemyError as exc:
        raise unreadable(engine, exc) from exc
    if not won:
        raise OwnerConflict(conflict_message(found.values(), owned, holder))
    return [_claimed(queue_of(held), held, before.get(held.name), holder) for held in found.values()]


def _claimed(queue: str, held: Lease, before: Lease | None, holder: str) -> Claimed:
    # all of one claim's rows carry one timestamp: equal times mean this claim started the lease
    if held.acquired_at == held.renewed_at:
        outcome = "took over" if before is not None else "took"
    else:
        outcome = "renewed" if before is not None and before.holder == holder else "joined"
    return Claimed(queue, held.key, outcome, before)


def conflict_message(refused: Iterable[Lease], owned: Mapping[str, str], holder: str) -> str:
    """The OwnerConflict of a worker whose claim was refused: who holds what, until when, and the fixes."""
    now = utcnow()
    found = [f"{queue_of(held)} is owned by {describe(held, now)}, but {holder} would serve it with "
             f"{owned[queue_of(held)]}" for held in refused]
    releases = " and ".join(f"`bus owners release {queue_of(held)}`" for held in refused)
    return ("refusing to start: a command has exactly one owner. " + "; ".join(found)
            + f". Either stop that worker (and its replicas), or wait for the lease to expire (BUS_OWNER_LEASE_TTL "
              f"seconds after its last renewal), or, to deploy a renamed handler once the old workers are "
              f"stopped: {releases}")


def unreadable(engine: Engine, exc: Exception) -> ConfigurationError:
    """The error for a bus database where the owner leases cannot be read or written."""
    return ConfigurationError(
        f"cannot use the owner leases in the bus database {engine.url.render_as_string(hide_password=True)}: "
        f"{_first_line(exc)}. Is BUS_DATABASE_URL right and the database up? If the table bus_leases is missing, "
        f"run `bus db upgrade` first")


def _first_line(exc: Exception) -> str:
    """The first line of a database error (SQLAlchemy appends the statement and a link)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_leases(engine: Engine) -> list[Lease]:
    """Every owner lease, by queue (ConfigurationError naming the fix if the database cannot be read)."""
    try:
        return lease.listing(engine, PREFIX)
    except SQLAlchemyError as exc:
        raise unreadable(engine, exc) from exc


def examine(bound: Mapping[str, str], held: list[Lease], now: datetime | None = None) -> tuple[list[str], list[str]]:
    """(conflicts, expired) of the owner leases against `bound` ({command queue: handler} of this registry)."""
    now = now or utcnow()
    conflicts, expired = [], []
    for current in held:
        queue = queue_of(current)
        if current.expired(now):
            expired.append(f"owner lease of {queue}: {describe(current, now)}; no worker renews it: the next worker "
                           f"to start for {queue} takes it over, or `bus owners release {queue}` removes it"
                           + ("" if queue in bound else f" ({queue} is not in this registry: release it)"))
        elif queue in bound and current.key != bound[queue]:
            conflicts.append(f"{queue}: the owner lease names {describe(current, now)}, but this registry binds "
                             f"{bound[queue]}; stop those workers, or `bus owners release {queue}` once they are")
    return conflicts, expired


Renew = Callable[[str, str], tuple[bool, Lease]]


class Heartbeat:
    """Renews a worker's owner leases every `interval` s; hands a queue another handler took to `on_lost`."""

    def __init__(self, renew: Renew, owned: Mapping[str, str], interval: float,
                 on_lost: Callable[[str], None]) -> None:
        self.owned = dict(owned)
        self.interval = interval
        self._renew = renew
        self._on_lost = on_lost
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def tick(self) -> None:
        """Renew every lease still owned once."""
        for queue, handler in list(self.owned.items()):
            try:
                won, current = self._renew(queue, handler)
            except SQLAlchemyError as exc:
                self._failing = True
                # the database is needed by every message anyway; keep consuming, ask again next tick
                logger.warning("owner leases not renewed, the bus database did not answer (%s); trying again "
                               "in %.0f s", _first_line(exc), self.interval)
                return
            if not won:
                del self.owned[queue]
                logger.error("owner lease of %s is held by %s: this worker (%s) stops consuming %s. It expired "
                             "without a renewal (was the database unreachable?) and a worker with another handler "
                             "took it; a command has exactly one owner. Restart this worker once that is sorted "
                             "out (`bus owners` lists the leases)", queue, describe(current), handler, queue)
                self._on_lost(queue)
        if self._failing:
            self._failing = False
            logger.info("owner leases renewed again: %s", ", ".join(sorted(self.owned)) or "none left")

    def start(self) -> None:
        """Renew from a daemon thread until `stop` (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="bus-owner-leases", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)  # a daemon: a renewal stuck on the database does not hold the exit

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the thread must outlive a surprise; say what it was
                logger.exception("owner leases: renewal failed; trying again in %.0f s", self.interval)
