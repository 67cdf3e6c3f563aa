"""Execution once: claim (command, key, payload hash) inside the handler's transaction.

The claim is a single INSERT .. ON CONFLICT DO NOTHING RETURNING: one round trip when
the key is new. A concurrent duplicate blocks on the row (PostgreSQL) or on the write
lock (SQLite) until the first transaction ends, then finds the stored outcome. A crash
before commit leaves no claim, so the redelivery runs the handler. The claim must be
kept until the outcome is stored in the same transaction: a rollback releases the row,
and a waiting duplicate would claim it and run the handler again.

A purge may delete a key between a duplicate's claim (which found it) and its read of
the outcome (PostgreSQL: ON CONFLICT DO NOTHING does not lock the row it finds);
`previous()` then finds nothing and the caller claims the key again.
"""
from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from project.store.engine import Write
from project.store.insert import claim_statement
from project.store.tables import commands, utcnow

#: namespace of task ids derived from idempotency keys (never change it once released)
TASK_ID_NAMESPACE = uuid.UUID("5b0e7a52-6c4f-4b55-9a3e-2f7c1d0b8e11")
_NAMESPACE_BYTES = TASK_ID_NAMESPACE.bytes


def task_id_for(task: str, key: str, payload_hash: str) -> str:
    """Same command, key and payload: same task id, so duplicates share one AsyncResult.

    The payload hash is part of the id so that a conflicting send (same key, other
    payload) gets its own result, which holds the conflict error, instead of
    overwriting the first caller's result.
    """
    # uuid.uuid5(TASK_ID_NAMESPACE, name) written out: its UUID object cost as much as the digest
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + f"{task}:{key}:{payload_hash}".encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    text = digest.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


@dataclass(frozen=True)
class Outcome:
    """What a previous execution stored for a key."""

    payload_hash: str
    payload: dict[str, Any]
    status: str
    result: Any
    error_type: str | None
    error_message: str | None
    message_id: str  # of the delivery that ran it: the outcome is stored under this id


def claim(session: Session, task: str, key: str, payload_hash: str, payload: dict[str, Any],
          message_id: str) -> bool:
    """Claim the key in the current transaction; False if it was already claimed."""
    row = {"task": task, "key": key, "payload_hash": payload_hash, "payload": payload, "status": "running",
           "message_id": message_id, "duplicates": 0, "created_at": utcnow()}
    return session.execute(claim_statement(session.bind.dialect.name, commands, "key"), row).first() is not None


def previous(session: Session, task: str, key: str) -> Outcome | None:
    """The stored outcome of an earlier claim; None if the key was purged since the claim found it."""
    row = session.execute(select(commands).where(commands.c.task == task, commands.c.key == key)).first()
    if row is None:
        return None
    return Outcome(row.payload_hash, row.payload, row.status, row.result, row.error_type, row.error_message,
                   row.message_id)


def succeeded_under(conn: Connection, message_id: str) -> Any | None:
    """The claim whose handler ran as message `message_id` and succeeded (task, payload, result, finished_at)."""
    return conn.execute(select(commands.c.task, commands.c.payload, commands.c.result, commands.c.finished_at)
                        .where(commands.c.message_id == message_id, commands.c.status == "succeeded")).first()


def absorbed(session: Session, task: str, key: str) -> None:
    """Count a duplicate delivery that got the stored outcome instead of a run."""
    session.execute(update(commands).where(commands.c.task == task, commands.c.key == key)
                    .values(duplicates=commands.c.duplicates + 1))


def finished(task: str, key: str, *, result: Any = None, error_type: str | None = None,
             error_message: str | None = None) -> Write:
    """The write that stores the outcome on the claim (for `UnitOfWork.write`)."""
    return _FINISH, {"finish_task": task, "finish_key": key, "finish_status": "failed" if error_type else "succeeded",
                     "finish_result": result, "finish_error_type": error_type,
                     "finish_error_message": error_message, "finish_at": utcnow()}


#: built once: parameters prefixed, so that it can share a statement with others (UnitOfWork.write)
_FINISH = update(commands).where(
    commands.c.task == bindparam("finish_task"), commands.c.key == bindparam("finish_key"),
).values(status=bindparam("finish_status"), result=bindparam("finish_result"),
         error_type=bindparam("finish_error_type"), error_message=bindparam("finish_error_message"),
         finished_at=bindparam("finish_at"))


def differing_fields(first: dict[str, Any], second: dict[str, Any]) -> list[str]:
    """The fields whose values differ between two payloads."""
    return sorted(k for k in first.keys() | second.keys() if first.get(k) != second.get(k))

