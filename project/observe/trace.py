"""Conversation tracing from the bus's own records (`bus trace CORRELATION_ID`).

`conversation()` joins the execution log (project/store/execution_log.py) with the
outbox (what each execution published or sent, with its causation), the idempotency
claims, the inbox and the dead-letter store into a tree:
command -> events and commands it produced -> subscriber runs -> what they produced.
Subscribers that have not run yet are listed from the topology, as pending.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Iterable

from sqlalchemy import or_, select
from sqlalchemy.engine import Connection, Engine

from project.store.tables import (
    commands,
    dead_letters,
    executions,
    inbox,
    intake,
    outbox,
)

if TYPE_CHECKING:
    from project.messaging.topology import Topology

logger = logging.getLogger(__name__)


# ---- read side -----------------------------------------------------------------------
@dataclass
class Step:
    """One node of a conversation: a command, an event, or a subscriber's run of an event."""

    kind: str  # command | event | run
    name: str  # command task, event exchange, or subscriber task
    message_id: str | None
    state: str  # succeeded | refused | retrying | dead-lettered | running | pending | published | unpublished
    attempts: int | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duplicates: int = 0
    error: str | None = None
    result: Any = None
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    children: list["Step"] = field(default_factory=list)

    @property
    def duration_ms(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds() * 1000

    def walk(self) -> Iterable["Step"]:
        yield self
        for child in self.children:
            yield from child.walk()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["children"] = [child.to_dict() for child in self.children]
        data["duration_ms"] = None if self.duration_ms is None else round(self.duration_ms, 3)
        for key in ("started_at", "finished_at"):
            data[key] = data[key].isoformat() if data[key] else None
        return data


@dataclass
class Conversation:
    correlation_id: str
    root: Step
    #: records of the conversation whose cause is not in the tree (e.g. purged), kept visible
    unattached: list[Step] = field(default_factory=list)

    def steps(self) -> Iterable[Step]:
        for top in (self.root, *self.unattached):
            yield from top.walk()

    def to_dict(self) -> dict[str, Any]:
        return {"correlation_id": self.correlation_id, "root": self.root.to_dict(),
                "unattached": [s.to_dict() for s in self.unattached]}


def conversation(engine: Engine, topology: "Topology", correlation_id: str) -> Conversation | None:
    """The conversation `correlation_id` as a tree; None if the bus has no record of it."""
    with engine.connect() as conn:
        records = _Records.load(conn, correlation_id)
        if records.empty():
            return None
        return records.tree(topology)


class _Records:
    """Every row of one conversation, indexed for building the tree."""

    def __init__(self, correlation_id: str) -> None:
        self.correlation_id = correlation_id
        self.outbox: list[Any] = []
        self.runs: dict[tuple[str, str], Any] = {}  # (message id, task) -> bus_executions row
        self.claims: dict[str, Any] = {}  # message id -> bus_commands row
        self.inbox: dict[tuple[str, str], Any] = {}  # (event id, subscriber) -> bus_inbox row
        self.dead: list[Any] = []
        self.accepted: Any = None
        self.produced: dict[str | None, list[Any]] = {}  # causation id -> outbox rows
        self.topology: "Topology | None" = None
        self._placed: set[int] = set()  # dead letters shown under their step

    @classmethod
    def load(cls, conn: Connection, correlation_id: str) -> "_Records":
        self = cls(correlation_id)
        self.outbox = list(conn.execute(select(outbox).where(outbox.c.correlation_id == correlation_id)
                                        .order_by(outbox.c.created_at, outbox.c.id)))
        self.runs = {(r.message_id, r.task): r for r in conn.execute(
            select(executions).where(executions.c.correlation_id == correlation_id))}
        command_ids = [correlation_id] + [r.id for r in self.outbox if r.kind == "command"]
        self.claims = {r.message_id: r for r in conn.execute(
            select(commands).where(commands.c.message_id.in_(command_ids)))}
        event_ids = [r.id for r in self.outbox if r.kind == "event"]
        if event_ids:
            self.inbox = {(r.event_id, r.subscriber): r for r in conn.execute(
                select(inbox).where(inbox.c.event_id.in_(event_ids)))}
        from project.transport.dispatch import (
            copy_task_id,  # read side only: the write side stays free of Celery
        )
        known = set(command_ids) | {m for m, _ in self.runs} | {
            copy_task_id(event_id, subscriber) for event_id, subscriber in self.inbox}
        self.dead = list(conn.execute(select(dead_letters).where(or_(
            dead_letters.c.correlation_id == correlation_id, dead_letters.c.message_id.in_(known)))
            .order_by(dead_letters.c.id)))
        self.accepted = conn.execute(select(intake).where(intake.c.id == correlation_id)).first()
        return self

    def empty(self) -> bool:
        return not (self.outbox or self.runs or self.claims or self.dead or self.accepted)

    # ---- the tree ------------------------------------------------------------------
    def tree(self, topology: "Topology") -> Conversation:
        self.topology = topology
        for row in self.outbox:
            self.produced.setdefault(row.causation_id, []).append(row)
        root = self._command(self._root_task(), self.correlation_id)
        unattached: list[Step] = []
        placed = {(s.message_id, s.name) for s in root.walk()}
        for row in self.outbox:  # oldest first: a loose row's own products nest under it
            if (row.id, row.name) not in placed:
                unattached.append(self._from_outbox(row))
                placed |= {(s.message_id, s.name) for s in unattached[-1].walk()}
        for (message_id, task), run in self.runs.items():
            if (message_id, task) not in placed:
                unattached.append(Step(run.kind if run.kind == "command" else "run", task, message_id, run.state))
                self._apply(unattached[-1], run)
        unattached += [self._dead_step(d) for d in self.dead if id(d) not in self._placed]
        return Conversation(self.correlation_id, root, unattached)

    def _root_task(self) -> str:
        claim = self.claims.get(self.correlation_id)
        run = next((task for (m, task) in self.runs if m == self.correlation_id), None)
        dead = next((d.task for d in self.dead if d.message_id == self.correlation_id and d.task), None)
        accepted = self.accepted.task if self.accepted is not None else None
        return run or (claim.task if claim else None) or accepted or dead or "(unknown message)"

    def _command(self, task: str, message_id: str) -> Step:
        step = Step("command", task, message_id, "pending")
        run, claim = self.runs.get((message_id, task)), self.claims.get(message_id)
        if claim is not None:
            step.state = {"failed": "refused"}.get(claim.status, claim.status)
            step.started_at, step.finished_at = claim.created_at, claim.finished_at
            step.duplicates, step.result = claim.duplicates, claim.result
            if claim.error_type:
                step.error = f"{claim.error_type.rsplit('.', 1)[-1]}: {claim.error_message}"
        if run is not None:
            self._apply(step, run)
        self._attach_dead(step, message_id, task)
        step.children = self._produced_by(message_id)
        return step

    def _produced_by(self, message_id: str) -> list[Step]:
        return [self._from_outbox(row) for row in self.produced.get(message_id, [])]

    def _from_outbox(self, row: Any) -> Step:
        if row.kind == "command":
            return self._command(row.name, row.id)
        event = Step("event", row.name, row.id, "published" if row.published_at else "unpublished",
                     started_at=row.created_at, finished_at=row.published_at)
        subscribers = [q.name for q in self.topology.subscriber_queues(row.name)]
        ran = {task for (_, task), run in self.runs.items() if run.event_id == row.id}
        subscribers += sorted((ran | {s for (e, s) in self.inbox if e == row.id}) - set(subscribers))
        event.children = [self._subscriber_run(row, name) for name in subscribers]
        return event

    def _subscriber_run(self, event_row: Any, subscriber: str) -> Step:
        run = next((r for (_, task), r in self.runs.items() if task == subscriber and r.event_id == event_row.id),
                   None)
        from project.transport.dispatch import copy_task_id
        message_id = run.message_id if run is not None else copy_task_id(event_row.id, subscriber)
        step = Step("run", subscriber, message_id, "pending" if event_row.published_at else "unpublished")
        seen = self.inbox.get((event_row.id, subscriber))
        if seen is not None:
            step.state, step.started_at, step.duplicates = "succeeded", seen.processed_at, seen.duplicates
        if run is not None:
            self._apply(step, run)
        self._attach_dead(step, message_id, subscriber)
        step.children = self._produced_by(message_id)
        return step

    @staticmethod
    def _apply(step: Step, run: Any) -> None:
        step.state, step.attempts, step.error = run.state, run.attempts, run.error or step.error
        step.started_at, step.finished_at = run.started_at, run.finished_at

    def _attach_dead(self, step: Step, message_id: str, task: str) -> None:
        for d in self.dead:
            if d.message_id == message_id and d.task in (task, None):
                self._placed.add(id(d))
                step.dead_letters.append(_dead_letter(d))
                if step.state in ("pending", "retrying", "unpublished"):
                    step.state = "dead-lettered"

    def _dead_step(self, row: Any) -> Step:
        kind = "command" if row.task in self.topology.registry.commands else "run"
        step = Step(kind, row.task or row.queue or "?", row.message_id, "dead-lettered",
                    finished_at=row.last_failed_at)
        step.dead_letters.append(_dead_letter(row))
        return step


def _dead_letter(row: Any) -> dict[str, Any]:
    return {"id": row.id, "reason": row.reason, "error": row.error, "attempts": row.attempts,
            "replayed": row.replayed_at is not None, "task": row.task, "message_id": row.message_id}


# ---- rendering -----------------------------------------------------------------------
def render(conv: Conversation) -> Any:
    """A rich Tree of the conversation."""
    from rich.tree import Tree

    origin = min((s.started_at for s in conv.steps() if s.started_at), default=None)
    tree = Tree(f"[bold]conversation {conv.correlation_id}[/bold]")
    _add(tree, conv.root, origin)
    if conv.unattached:
        loose = tree.add("[dim]records whose cause is not in this tree[/dim]")
        for step in conv.unattached:
            _add(loose, step, origin)
    return tree


STATE_STYLE = {"succeeded": "green", "published": "green", "refused": "yellow", "retrying": "yellow",
               "pending": "cyan", "unpublished": "cyan", "running": "cyan", "dead-lettered": "red"}


def label(step: Step, origin: datetime | None = None) -> str:
    """One line: kind, name, short id, state, attempts, duration, offset, duplicates, error."""
    kind = {"command": "command", "event": "event", "run": "subscriber"}[step.kind]
    parts = [f"[{STATE_STYLE.get(step.state, 'white')}]{step.state}[/]"]
    if step.attempts is not None:
        parts.append(f"{step.attempts} attempt{'s' if step.attempts != 1 else ''}")
    if step.duration_ms is not None:
        parts.append(f"{'published after' if step.kind == 'event' else 'took'} {step.duration_ms:.0f} ms")
    if origin is not None and step.started_at is not None:
        parts.append(f"at +{(step.started_at - origin).total_seconds() * 1000:.0f} ms")
    if step.duplicates:
        parts.append(f"{step.duplicates} duplicate(s) absorbed")
    text = f"{kind} [bold]{step.name}[/bold] [dim]{(step.message_id or '?')[:8]}[/dim]  " + " · ".join(parts)
    if step.error:
        text += f"\n[dim]last error: {step.error[:200]}[/dim]"
    return text


def _add(parent: Any, step: Step, origin: datetime | None) -> None:
    branch = parent.add(label(step, origin))
    for dead in step.dead_letters:
        branch.add(f"[red]dead letter #{dead['id']}[/red] {dead['reason']}: {str(dead['error'])[:160]}"
                   + (" [dim](replayed)[/dim]" if dead["replayed"] else ""))
    if step.kind == "event" and not step.children:
        branch.add("[dim]no subscribers[/dim]")
    for child in step.children:
        _add(branch, child, origin)
