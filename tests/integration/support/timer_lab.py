"""The durable-timer lab's contract and handler, bound by no bus (tests/integration/test_timers.py).

`timerlab.ring` audits each run of its handler (one audit_log row, what="ring", subject
= the ring id): the count of handler runs, in the database. With `then_after` it sends
the ring `<id>-next` that many seconds later, from the handler (a timer its execution
commits). A worker binds it in timer_tasks.py; the in-process harness binds it on a bus
of its own, with the same audit port.
"""
from __future__ import annotations

from datetime import timedelta

from pydantic import Field

from project.contracts import Command, CommandSender


class Ring(Command, boundary="timerlab", natural_key=("ring_id",)):
    """Ring once per id."""

    ring_id: str = Field(min_length=1)
    then_after: float = Field(0, ge=0)  # seconds; 0: no next ring


def ring(cmd: Ring, *, audit, commands: CommandSender) -> dict:
    """Audit the ring, and send the next one `then_after` seconds later."""
    audit.record("ring", cmd.ring_id)
    if cmd.then_after:
        commands.send(Ring(ring_id=f"{cmd.ring_id}-next"), delay=timedelta(seconds=cmd.then_after))
    return {"ring_id": cmd.ring_id}
