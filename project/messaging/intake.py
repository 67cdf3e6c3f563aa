"""Accepting commands at an edge (an HTTP API) and answering "what became of it?".

`accept` records the command under its idempotency key before sending it, so the
same key with another payload is refused at once (409), the same key and payload get
the same id again (and are sent again: harmless, the worker's claim absorbs it, and it
recovers a send that failed after the record), and `state` can tell a pending command
from an unknown id. The state comes from the bus's own records: the idempotency claim
(succeeded or failed, with the result or error), the dead-letter store, else pending,
or `expired` once the command was last accepted longer ago than the key retention: its
key is purged (project/store/retention.py), and what became of it is no longer known. The
intake row outlives the key (BUS_INTAKE_RETENTION >= BUS_KEY_RETENTION); once it is
purged too, the id is unknown.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

from sqlalchemy import exists, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from project.contracts import Command
from project.errors import IdempotencyConflict
from project.messaging.sending import body_of
from project.store.idempotency import differing_fields
from project.store.insert import insert_ignore
from project.store.tables import commands, dead_letters, intake, utcnow
from project.store.uow import UnitOfWork

#: records of one acceptance: an intake row purged while a send was being accepted is recorded again
RECORD_ATTEMPTS = 3


@dataclass(frozen=True)
class Accepted:
    id: str
    task: str
    duplicate: bool


@dataclass(frozen=True)
class CommandState:
    id: str
    task: str
    status: str  # pending | succeeded | failed | dead-lettered | expired
    result: Any = None
    error: str | None = None


def accept(engine: Engine, send: Callable[..., Any], command: Command, key: str) -> Accepted:
    """Record `command` under `key` in `engine`'s database, then `send(command, idempotency_key=key)`
    (the bus's send); IdempotencyConflict if the key has another payload."""
    _, task_id = body_of(command, key)
    row = {"id": task_id, "task": command.task_name(), "key": key, "payload_hash": command.payload_hash(),
           "payload": command.payload(), "accepted_at": utcnow()}
    with UnitOfWork(engine) as uow:
        fresh = _record(uow.session, row)
        uow.commit()
    send(command, idempotency_key=key)
    return Accepted(task_id, row["task"], duplicate=not fresh)


def _record(session: Session, row: dict[str, Any]) -> bool:
    """Record an acceptance; False if the key was accepted before with this payload (its time renewed
    when no claim holds the key, so that this send, which runs the command again, reads pending)."""
    for _ in range(RECORD_ATTEMPTS):
        if session.execute(insert_ignore(session, intake).values(**row).returning(intake.c.id)).first() is not None:
            return True
        first = session.execute(select(intake.c.payload_hash, intake.c.payload)
                                .where(intake.c.task == row["task"], intake.c.key == row["key"])).first()
        if first is None:  # purged between the two statements (PostgreSQL): record it afresh
            continue
        if first.payload_hash != row["payload_hash"]:
            raise IdempotencyConflict(
                f"Idempotency-Key {row['key']!r} was first used for {row['task']} with another body (fields that "
                f"differ: {', '.join(differing_fields(first.payload, row['payload']))}); use a new key for a "
                f"new request")
        # this send runs the command again if its key was purged: pending again, not expired;
        # while a claim holds the key the send is absorbed, and the first acceptance's age stands
        claimed = exists().where(commands.c.task == row["task"], commands.c.key == row["key"])
        session.execute(update(intake).where(intake.c.id == row["id"], ~claimed).values(accepted_at=row["accepted_at"]))
        return False
    raise RuntimeError(f"{row['task']} key {row['key']!r}: its intake record was purged {RECORD_ATTEMPTS} times while "
                       f"it was being accepted; keep BUS_INTAKE_RETENTION longer than clients may resend")


def state(engine: Engine, command_id: str, *, expire_after: timedelta) -> CommandState | None:
    """What became of an accepted command; None if this intake never accepted `command_id`.

    `expire_after` is the key retention: a command last accepted longer ago, with no
    outcome and no dead letter, had its key purged (or never ran within it): expired.
    """
    with engine.connect() as conn:
        stale = (intake.c.accepted_at < utcnow() - expire_after).label("stale")
        accepted = conn.execute(select(intake, stale).where(intake.c.id == command_id)).first()
        if accepted is None:
            return None
        claim = conn.execute(select(commands).where(commands.c.task == accepted.task,
                                                    commands.c.key == accepted.key)).first()
        if claim is not None and claim.status in ("succeeded", "failed"):
            error = f"{claim.error_type}: {claim.error_message}" if claim.error_type else None
            return CommandState(command_id, accepted.task, claim.status, claim.result, error)
        dead = conn.execute(select(dead_letters).where(dead_letters.c.message_id == command_id)
                            .order_by(dead_letters.c.id.desc())).first()
    if dead is not None:
        return CommandState(command_id, accepted.task, "dead-lettered", error=f"{dead.reason}: {dead.error}")
    if claim is None and accepted.stale:
        return CommandState(command_id, accepted.task, "expired")
    return CommandState(command_id, accepted.task, "pending")

