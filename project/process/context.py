"""`process`, the third argument of a process manager's handler: its instance and what a step may do.

    def on_paid(state, event, process):
        state.paid = True
        process.cancel_timeout("payment")
        if state.reserved:
            process.commands.send(ShipOrder(order_id=process.instance_id))
            process.complete()

`commands` and `events` are the step's outbox sink: what it sends commits with the state
or not at all. `request_timeout` writes a durable timer (the outbox's `schedule`) that
delivers the manager's timeout task to this instance when it is due; the instance keeps
its pending timeouts by name, so a timeout requested again, cancelled, or outlived by
`complete()` finds itself superseded when it fires and does nothing. Timer ids derive from
the step's outbox origin: a step that runs again writes the same ids.
"""
from __future__ import annotations

import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Collection

from project.errors import ConfigurationError
from project.messaging.timers import seconds_of
from project.store.tables import utcnow

if TYPE_CHECKING:
    from project.contracts import CommandSender, EventSink
    from project.messaging.outbox import OutboxSink

#: namespace of timer ids (never change it once released)
TIMER_NAMESPACE = uuid.UUID("5b7f3f0e-8c1d-4d8e-9a51-3c0f2d6e7b14")


class Process:
    """One instance of a process manager, as one step sees it."""

    def __init__(self, manager: str, instance_id: str, sink: "OutboxSink", timers: dict[str, str],
                 timeout_task: str, timeouts: Collection[str]) -> None:
        self.manager, self.instance_id = manager, instance_id
        self.commands: CommandSender = sink
        self.events: EventSink = sink
        #: pending timeouts after this step: {name: timer id}
        self.timers = dict(timers)
        self.completed = False
        self._sink, self._timeout_task, self._timeouts = sink, timeout_task, timeouts
        self._requested = 0

    def request_timeout(self, name: str, after: timedelta | float, data: dict[str, Any] | None = None) -> str:
        """Have the timeout `name` delivered to this instance `after` (a timedelta or seconds) from now,
        replacing a pending one of that name; its timer id."""
        if name not in self._timeouts:
            raise ConfigurationError(
                f"{self.manager} has no timeout {name!r}: declare it with "
                f"{self.manager}.on_timeout({name!r}, handler) (declared: {', '.join(sorted(self._timeouts)) or 'none'})")
        due_at = utcnow() + timedelta(seconds=seconds_of(after))
        timer_id = str(uuid.uuid5(TIMER_NAMESPACE, f"{self._sink.origin}:timeout:{self._requested}"))
        self._requested += 1
        payload = {"instance_id": self.instance_id, "timeout": name, "data": dict(data or {}), "timer_id": timer_id}
        self._sink.schedule(self._timeout_task, payload, due_at, row_id=timer_id)
        self.timers[name] = timer_id
        return timer_id

    def cancel_timeout(self, name: str) -> None:
        """Forget the pending timeout `name` (if any): when it fires, it does nothing."""
        self.timers.pop(name, None)

    def complete(self) -> None:
        """End this instance once the step commits: later events and its pending timeouts do nothing."""
        self.completed = True
