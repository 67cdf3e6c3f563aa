"""How long the bus keeps its records, and the purge that enforces it in small batches.

Retentions (celeryconfig.py, from the environment; `bus purge` can override each):
- idempotency keys and execution logs: BUS_KEY_RETENTION (30d), the window in which a
  duplicate command is absorbed instead of run;
- published outbox rows, and timers cancelled: BUS_OUTBOX_RETENTION (7d) after their publish
  or their cancel; a row still owed (unpublished, not cancelled) is never purged;
- inbox rows: BUS_INBOX_RETENTION (default: the key retention);
- intake rows: BUS_INTAKE_RETENTION (default: twice the key retention).

Rules, checked at start-up (`check`); a setting that breaks one stops it, naming the fix:
- keys (and so inbox rows) outlast the broker's redelivery window (Redis: visibility
  timeout plus restore sweep), or a message redelivered after its purge runs twice;
- inbox >= keys: an event delivered late is absorbed as long as a command would be;
- intake >= keys: GET /commands/{id} reports a purged key as `expired`, never a 404 for
  a command whose outcome is still kept.

Kept whatever their age: an unpublished outbox row (the relay still owes it) and the
inbox rows of its event (the relay may send it again, however late), and an intake
row whose key is still claimed. Rows are deleted by primary key, `batch` per short
transaction, so a purge never holds a table's locks for long and can run beside traffic.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Mapping

from sqlalchemy import ColumnElement, Table, and_, delete, exists, or_, select, tuple_
from sqlalchemy.engine import Engine

from project.durations import parse_duration
from project.errors import ConfigurationError
from project.store.tables import commands, executions, inbox, intake, outbox, utcnow

logger = logging.getLogger(__name__)

#: primary keys per delete: a short lock on each, thousands of rows a second
BATCH = 1000
#: where each retention is set: the Celery setting and its environment variable
SETTINGS = {"keys": "bus_key_retention", "outbox": "bus_outbox_retention",
            "inbox": "bus_inbox_retention", "intake": "bus_intake_retention"}
ENV = {"keys": "BUS_KEY_RETENTION", "outbox": "BUS_OUTBOX_RETENTION",
       "inbox": "BUS_INBOX_RETENTION", "intake": "BUS_INTAKE_RETENTION"}


@dataclass(frozen=True)
class Retention:
    """How long each kind of record is kept."""

    keys: timedelta
    outbox: timedelta
    inbox: timedelta
    intake: timedelta

    @classmethod
    def parse(cls, **durations: str) -> "Retention":
        """From durations as typed (`30d`); ValueError saying the accepted form."""
        return cls(**{name: parse_duration(text) for name, text in durations.items()})


def configured(conf: Mapping[str, Any]) -> Retention:
    """The retentions of a Celery configuration (celeryconfig.py's `bus_*_retention`)."""
    return Retention.parse(**{name: conf[setting] for name, setting in SETTINGS.items()})


def redelivery_window(transport_options: Mapping[str, Any]) -> timedelta:
    """How late a broker may deliver again a message a worker ran: Redis's visibility timeout plus its sweep."""
    return timedelta(seconds=transport_options.get("visibility_timeout", 3600)
                     + transport_options.get("unacked_restore_interval", 0))


def twice(duration: str) -> str:
    """`30d` -> `60d`: the default intake retention, written as an operator would."""
    return written(2 * parse_duration(duration))


def check(retention: Retention, redelivery: timedelta, names: Mapping[str, str] = ENV) -> Retention:
    """`retention` if it keeps every rule; else ConfigurationError naming each broken rule and its fix.

    `names` says what the caller calls each retention (environment variables, or CLI options).
    """
    def said(name: str) -> str:
        return f"{names[name]}={written(getattr(retention, name))}"

    keys, problems = written(retention.keys), []
    if retention.keys <= redelivery:
        window = f"{int(redelivery.total_seconds())}s"
        problems.append(f"{said('keys')} does not outlast the broker's redelivery window of {window} "
                        f"(BUS_VISIBILITY_TIMEOUT + BUS_UNACKED_RESTORE_INTERVAL): a command redelivered after its "
                        f"key is purged runs again; set {names['keys']} above {window}, or lower BUS_VISIBILITY_TIMEOUT")
    if retention.inbox < retention.keys:
        problems.append(f"{said('inbox')} is shorter than {said('keys')}: an event delivered again after its inbox "
                        f"row is purged runs its subscriber again, while a command is protected for {keys}; set "
                        f"{names['inbox']} to {keys} or more, or lower {names['keys']}")
    if retention.intake < retention.keys:
        problems.append(f"{said('intake')} is shorter than {said('keys')}: GET /commands/{{id}} would answer 404 for "
                        f"a command whose outcome is still kept, and never 'expired'; set {names['intake']} to "
                        f"{keys} or more (default: twice {names['keys']})")
    if problems:
        raise ConfigurationError("; ".join(problems))
    return retention


def purge(engine: Engine, retention: Retention, *, now: datetime | None = None, batch: int = BATCH) -> dict[str, int]:
    """Delete every bus record past its retention, `batch` rows per transaction; the number per table."""
    now = now or utcnow()
    owed = exists().where(outbox.c.id == inbox.c.event_id, outbox.c.published_at.is_(None),
                          outbox.c.cancelled_at.is_(None))
    done = or_(outbox.c.published_at < now - retention.outbox, outbox.c.cancelled_at < now - retention.outbox)
    claimed = exists().where(commands.c.task == intake.c.task, commands.c.key == intake.c.key)
    purged = {**purge_keys(engine, now - retention.keys, batch=batch),
              "outbox": _in_batches(engine, outbox, done, batch),
              "inbox": _in_batches(engine, inbox, and_(inbox.c.processed_at < now - retention.inbox, ~owed), batch),
              "intake": _in_batches(engine, intake, and_(intake.c.accepted_at < now - retention.intake, ~claimed),
                                    batch)}
    logger.info("purged past their retention: %s", purged)
    return purged


def purge_keys(engine: Engine, older_than: datetime, *, batch: int = BATCH) -> dict[str, int]:
    """Forget idempotency keys claimed, and execution logs finished, before `older_than`; the number of each."""
    return {"keys": _in_batches(engine, commands, commands.c.created_at < older_than, batch),
            "executions": _in_batches(engine, executions, executions.c.finished_at < older_than, batch)}


def _in_batches(engine: Engine, table: Table, condition: ColumnElement[bool], batch: int) -> int:
    """Delete the rows of `table` matching `condition`, `batch` primary keys per transaction; the number deleted."""
    if batch < 1:
        raise ValueError(f"batch={batch} deletes nothing; use 1 or more rows per transaction")
    key = list(table.primary_key.columns)
    total = 0
    while True:
        with engine.begin() as conn:
            found = conn.execute(select(*key).where(condition).limit(batch)).all()
            if found:
                among = key[0].in_([row[0] for row in found]) if len(key) == 1 else tuple_(*key).in_(found)
                # the condition again: a row that changed since the select (published again, claimed) is kept
                total += conn.execute(delete(table).where(among, condition)).rowcount
        if len(found) < batch:
            return total


def written(duration: timedelta) -> str:
    """A duration in the largest unit that divides it: 60d, 12h, 90s."""
    seconds = int(duration.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"

