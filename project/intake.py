"""Accepting commands at an edge (an HTTP API) and answering "what became of it?".

`accept` records the command under its idempotency key before sending it, so the
same key with another payload is refused at once (409), the same key and payload get
the same id again (and are sent again: harmless, the worker's claim absorbs it, and it
recovers a send that failed after the record), and `state` can tell a pending command
from an unknown id. The state comes from the bus's own records: the idempotency claim
(succeeded or failed, with the result or error), the dead-letter store, else pending.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from project.commands import body_of
from project.contracts import Command
from project.db import commands, dead_letters, intake, utcnow
from project.errors import IdempotencyConflict
from project.idempotency import differing_fields
from project.insert import insert_ignore
from project.uow import UnitOfWork

if TYPE_CHECKING:
    from project.core import Bus


@dataclass(frozen=True)
class Accepted:
    id: str
    task: str
    duplicate: bool


@dataclass(frozen=True)
class CommandState:
    id: str
    task: str
    status: str  # pending | succeeded | failed | dead-lettered
    result: Any = None
    error: str | None = None


def accept(bus: "Bus", command: Command, key: str) -> Accepted:
    """Record and send `command` under `key`; IdempotencyConflict if the key has another payload."""
    body, task_id = body_of(command, key)
    name, digest = command.task_name(), command.payload_hash()
    with UnitOfWork(bus.engine()) as uow:
        fresh = uow.session.execute(insert_ignore(uow.session, intake).values(
            id=task_id, task=name, key=key, payload_hash=digest, payload=command.payload(),
            accepted_at=utcnow()).returning(intake.c.id)).first() is not None
        if not fresh:
            first = uow.session.execute(select(intake).where(intake.c.task == name, intake.c.key == key)).one()
            if first.payload_hash != digest:
                raise IdempotencyConflict(
                    f"Idempotency-Key {key!r} was first used for {name} with another body (fields that differ: "
                    f"{', '.join(differing_fields(first.payload, command.payload()))}); use a new key for a "
                    f"new request")
        uow.commit()
    bus.send(command, idempotency_key=key)
    return Accepted(task_id, name, duplicate=not fresh)


def state(bus: "Bus", command_id: str) -> CommandState | None:
    """What became of an accepted command; None if this intake never accepted `command_id`."""
    with bus.engine().connect() as conn:
        accepted = conn.execute(select(intake).where(intake.c.id == command_id)).first()
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
    return CommandState(command_id, accepted.task, "pending")
