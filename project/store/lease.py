"""Leases in the bus database: a named right held by one key at a time, until it expires.

`acquire` is one statement (INSERT .. ON CONFLICT DO UPDATE .. WHERE .. RETURNING), so
two processes that ask at the same instant cannot both win: on PostgreSQL the row's
primary key makes the second wait for the first and then see its row; on SQLite the
write lock does the same. Holders that present the same key share a lease (replicas of
one command handler); a lease nobody renews expires after its ttl, and the next asker
takes it over. Times are the askers' clocks (UTC): keep hosts in sync to well within
the ttl.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import cache
from typing import Any, Mapping

from sqlalchemy import case, delete, or_, select
from sqlalchemy.engine import Connection, Engine

from project.store.insert import dialect_module
from project.store.tables import leases, utcnow


@dataclass(frozen=True)
class Lease:
    """A lease as stored: who holds `name`, since when, until when."""

    name: str
    key: str
    holder: str
    acquired_at: datetime
    renewed_at: datetime
    expires_at: datetime

    def expired(self, now: datetime | None = None) -> bool:
        """True once nobody renewed it within its ttl."""
        return _aware(self.expires_at) <= (now or utcnow())

    def remaining(self, now: datetime | None = None) -> timedelta:
        """Time left until it expires (negative once it has)."""
        return _aware(self.expires_at) - (now or utcnow())


def acquire(engine: Engine, name: str, key: str, holder: str, ttl: timedelta) -> tuple[bool, Lease]:
    """Take, join or renew `name` for `key` -> (won, the lease as it stands now).

    Won when nobody held it, when its holders had the same `key`, or when it had expired.
    """
    with engine.begin() as conn:
        return _acquire(conn, name, key, holder, utcnow(), ttl)


def acquire_all(engine: Engine, keys: Mapping[str, str], holder: str,
                ttl: timedelta) -> tuple[bool, dict[str, Lease]]:
    """Take, join or renew every lease of `keys` ({name: key}) in one transaction: all or none.

    -> (True, every lease as it stands now), or (False, those held by another key) and
    nothing changed. Names are taken in sorted order, so two callers never wait on each other in a cycle.
    """
    now, found, refused = utcnow(), {}, {}
    with engine.connect() as conn, conn.begin() as transaction:
        for name in sorted(keys):
            won, found[name] = _acquire(conn, name, keys[name], holder, now, ttl)
            if not won:
                refused[name] = found[name]
        if refused:
            transaction.rollback()
            return False, refused
    return True, found


def _acquire(conn: Connection, name: str, key: str, holder: str, now: datetime,
             ttl: timedelta) -> tuple[bool, Lease]:
    row = {"name": name, "key": key, "holder": holder, "acquired_at": now, "renewed_at": now,
           "expires_at": now + ttl}
    won = conn.execute(_acquire_statement(conn.dialect.name), row).first() is not None
    current = conn.execute(select(leases).where(leases.c.name == name)).one()
    return won, Lease(**current._mapping)


def release(engine: Engine, name: str, key: str | None = None) -> bool:
    """Give `name` up (only if held with `key`, when given); False if there was nothing to release."""
    statement = delete(leases).where(leases.c.name == name)
    if key is not None:
        statement = statement.where(leases.c.key == key)
    with engine.begin() as conn:
        return conn.execute(statement).rowcount > 0


def listing(engine: Engine, prefix: str = "") -> list[Lease]:
    """Every lease whose name starts with `prefix`, by name."""
    with engine.connect() as conn:
        rows = conn.execute(select(leases).where(leases.c.name.startswith(prefix, autoescape=True))
                            .order_by(leases.c.name)).all()
    return [Lease(**row._mapping) for row in rows]


@cache
def _acquire_statement(dialect_name: str) -> Any:
    insert = dialect_module(dialect_name).insert(leases)
    new = insert.excluded
    return insert.on_conflict_do_update(
        index_elements=[leases.c.name],
        set_={"key": new.key, "holder": new.holder, "renewed_at": new.renewed_at, "expires_at": new.expires_at,
              # joining or renewing keeps the lease's age; a takeover starts a new one
              "acquired_at": case((leases.c.key == new.key, leases.c.acquired_at), else_=new.acquired_at)},
        where=or_(leases.c.key == new.key, leases.c.expires_at <= new.renewed_at),
    ).returning(leases.c.name)


def _aware(moment: datetime) -> datetime:
    """In UTC: SQLite gives datetimes back without their zone (stored as UTC), PostgreSQL in the session's zone."""
    return moment.astimezone(timezone.utc) if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
