"""The stored state of process-manager instances, saved with optimistic concurrency.

An instance is one row of `bus_process_instances` (manager, instance id): its state as
JSON, a version, its status and its pending timeouts. Steps of one instance that run
at the same time serialise on the version: `save` writes only if the row still has
the version it was read with (`UPDATE .. WHERE version = :read`), and a first save is an
INSERT that does nothing if the instance exists. Either way a lost race raises
`VersionConflict`: the caller rolls its whole transaction back (the step's inbox claim
and outbox rows with it) and runs again, reading the version that won. No lock is held
between the read and the write, so nothing waits on a step that is still running; on
PostgreSQL the losing UPDATE waits only for the winner's COMMIT, then matches no row.

`load(..., lock=True)` reads with `SELECT .. FOR UPDATE` instead (on SQLite, whose writers
queue on BEGIN IMMEDIATE anyway, it is the same read): its save cannot conflict, for a
caller that must not fail on a race (a timeout: project/process/runtime.py says why).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from project.errors import BusError
from project.store.insert import claim_statement
from project.store.tables import process_instances, utcnow

RUNNING = "running"
COMPLETED = "completed"


class VersionConflict(BusError):
    """Another step saved (or started) this instance after it was read: run the whole step again."""


@dataclass(frozen=True)
class Instance:
    """One instance as read (or about to be saved): `version` 0 is one never stored."""

    manager: str
    instance_id: str
    #: the state as stored (JSON); a manager's reads give its state model
    state: Any
    version: int = 0
    status: str = RUNNING
    #: pending timeouts: {timeout name: timer id}
    timers: dict[str, str] = field(default_factory=dict)
    started_at: datetime | None = None
    updated_at: datetime | None = None
    completed_at: datetime | None = None


def load(session: Session, manager: str, instance_id: str, *, lock: bool = False) -> Instance | None:
    """The instance as stored now, or None; `lock`: hold its row until the transaction ends."""
    query = select(process_instances).where(process_instances.c.manager == manager,
                                            process_instances.c.instance_id == instance_id)
    row = session.execute(query.with_for_update() if lock else query).first()
    if row is None:
        return None
    values = row._mapping
    return Instance(**{name: values[name] for name in Instance.__dataclass_fields__})


def save(session: Session, instance: Instance) -> Instance:
    """Store `instance` (its `version` the one it was read with, 0 if new); the instance as stored.

    Raises VersionConflict if the row changed since (or, for a new one, exists already).
    """
    now = utcnow()
    completed_at = instance.completed_at or (now if instance.status == COMPLETED else None)
    values = {"state": instance.state, "version": instance.version + 1, "status": instance.status,
              "timers": instance.timers, "updated_at": now, "completed_at": completed_at}
    if instance.version == 0:
        row = {"manager": instance.manager, "instance_id": instance.instance_id, "started_at": now, **values}
        stored = session.execute(claim_statement(session.bind.dialect.name, process_instances, "version"), row)
        if stored.first() is None:
            raise VersionConflict(f"{instance.manager} instance {instance.instance_id!r} was started by another "
                                  f"step at the same time; this step runs again and finds it")
        return Instance(**row)
    done = session.execute(update(process_instances).where(
        process_instances.c.manager == instance.manager, process_instances.c.instance_id == instance.instance_id,
        process_instances.c.version == instance.version).values(**values))
    if done.rowcount != 1:
        raise VersionConflict(f"{instance.manager} instance {instance.instance_id!r} changed since this step read "
                              f"version {instance.version}; this step runs again on the version that won")
    return Instance(instance.manager, instance.instance_id, instance.state, instance.version + 1, instance.status,
                    instance.timers, instance.started_at, now, completed_at)
