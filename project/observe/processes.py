"""Process-manager instances as an operator reads them (`bus process list/show`): from the bus database only.

`instances()` lists the stored instances (project/store/process_state.py), newest first.
`history()` rebuilds one instance's steps from the execution log: every execution of the
manager's tasks (its event subscribers and its timeout command) since the instance
started whose message belongs to it. An execution names its message, not the instance,
so the message is read back from the outbox (an event's row, a timer's row) and its
instance id computed with the manager's own correlation. Hence what it cannot show: a
step whose event did not pass through this database's outbox (published by another
service), and anything whose execution log or outbox row was purged (BUS_KEY_RETENTION,
BUS_OUTBOX_RETENTION). `bus trace <correlation id>` shows a step's whole conversation;
`bus trace <instance id>` shows the instances of that id of every manager.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.engine import Engine

from project.contracts import DomainError
from project.headers import EVENT_ID
from project.store.process_state import Instance
from project.store.tables import as_utc, executions, outbox, process_instances

if TYPE_CHECKING:
    from project.process.declaration import ProcessManager


@dataclass(frozen=True)
class Step:
    """One execution of a manager's task for one instance."""

    task: str
    #: the event's class name, or `timeout <name>`
    message: str
    message_id: str
    state: str
    attempts: int
    started_at: datetime
    finished_at: datetime
    correlation_id: str | None
    error: str | None


def instances(engine: Engine, manager: str | None = None, status: str | None = None,
              limit: int | None = None) -> list[Instance]:
    """Stored instances (of `manager`, with `status`), the most recently changed first; states as stored JSON."""
    query = select(process_instances).order_by(process_instances.c.updated_at.desc(),
                                               process_instances.c.instance_id)
    if manager is not None:
        query = query.where(process_instances.c.manager == manager)
    if status is not None:
        query = query.where(process_instances.c.status == status)
    with engine.connect() as conn:
        rows = conn.execute(query.limit(limit)).all()
    return [Instance(**{name: row._mapping[name] for name in Instance.__dataclass_fields__}) for row in rows]


def timers(engine: Engine, instance: Instance) -> dict[str, dict[str, Any]]:
    """The instance's pending timeouts by name: timer id, due time, and whether the relay published it yet."""
    ids = {timer: name for name, timer in instance.timers.items()}
    with engine.connect() as conn:
        rows = {row.id: row for row in conn.execute(
            select(outbox.c.id, outbox.c.due_at, outbox.c.published_at).where(outbox.c.id.in_(list(ids))))} \
            if ids else {}
    return {name: {"timer_id": timer, "due_at": as_utc(rows[timer].due_at) if timer in rows else None,
                   "published": timer in rows and rows[timer].published_at is not None}
            for timer, name in ids.items()}


def history(engine: Engine, manager: "ProcessManager", instance: Instance) -> list[Step]:
    """The steps applied to (or absorbed by) `instance` that the execution log and the outbox still show."""
    contracts = {f"{manager.boundary}.{step.__name__}": contract for contract, step in manager.steps.items()}
    tasks = [*contracts, manager.timeout_task]
    with engine.connect() as conn:
        runs = conn.execute(select(executions).where(executions.c.task.in_(tasks),
                                                     executions.c.finished_at >= instance.started_at)
                            .order_by(executions.c.started_at)).all()
        ids = {run.event_id or run.message_id for run in runs}
        messages = {row.id: row.payload for row in conn.execute(
            select(outbox.c.id, outbox.c.payload).where(outbox.c.id.in_(ids)))} if ids else {}
    steps = []
    for run in runs:
        payload = messages.get(run.event_id or run.message_id)
        if payload is None:
            continue
        if run.task == manager.timeout_task:
            mine, message = payload.get("instance_id") == instance.instance_id, f"timeout {payload.get('timeout')}"
        else:
            contract = contracts[run.task]
            mine, message = _belongs(manager, contract, payload, instance.instance_id), contract.__name__
        if mine:
            steps.append(Step(run.task, message, run.message_id, run.state, run.attempts, run.started_at,
                              run.finished_at, run.correlation_id, run.error))
    return steps


def _belongs(manager: "ProcessManager", contract: type, payload: dict[str, Any], instance_id: str) -> bool:
    try:
        event = contract.model_validate({k: v for k, v in payload.items() if k != EVENT_ID})
        return manager.instance_id(event) == instance_id
    except (ValidationError, DomainError):
        return False
