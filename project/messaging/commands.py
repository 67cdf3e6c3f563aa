"""Commands as real Celery tasks: validated by the caller, executed once by the worker.

Caller side (`delay`, `apply_async`, signatures, `bus.send`, a handler's `commands.send`):
the fields are validated against the contract, and the idempotency key against the
length the store keeps, before anything is published (project/messaging/sending.py); the
task id derives from the idempotency key, so duplicates share one AsyncResult. A delay
(countdown, eta) longer than BUS_TIMER_THRESHOLD makes it a durable timer in the outbox
instead of a message a worker would hold (project/messaging/timers.py), under that id.

Worker side: project/messaging/execution.py (validate again for foreign senders, claim the key,
run the handler and store its result in one transaction).
"""
from __future__ import annotations

from typing import Any

from project.contracts import IDEMPOTENCY_KEY, DomainError
from project.errors import IdempotencyConflict, InvalidMessage
from project.messaging import timers
from project.messaging.retry import Backoff
from project.messaging.runtime import BusTask
from project.messaging.sending import check_route, prepare, shown
from project.store import results


class CommandTask(BusTask):
    """The Celery task of one command."""

    # final outcomes, not crashes: Celery logs them without a traceback
    throws = (DomainError, IdempotencyConflict, InvalidMessage)

    @classmethod
    def retry_policy(cls) -> Backoff:
        """The bus's one policy for commands."""
        return cls.execution.command_policy()

    # ---- caller side -------------------------------------------------------------
    def apply_async(self, args=None, kwargs=None, task_id=None, **options):  # noqa: D102
        if args:
            raise TypeError(
                f"{self.name} takes the fields of {self.binding.contract.__name__} as keywords, "
                f"not positional args {tuple(args)!r}; in a chain use an immutable signature: .si(**fields)"
            )
        check_route(self.name, options)
        body, derived_id = prepare(self.binding.contract, kwargs or {}, options.pop(IDEMPOTENCY_KEY, None))
        task_id = task_id or derived_id
        if timers.defer(self.app.conf, self.execution.engine, self.name, body, task_id, options):
            return self.AsyncResult(task_id)
        self.ensure_broker()
        return super().apply_async((), body, task_id=task_id, **{**shown(body), **options})



def run_command(task: CommandTask, **fields: Any) -> Any:
    """The body of every command task."""
    executed = task.run_execution(task.execution.command, fields)
    results.mark(task.request, executed.stored_under)  # Celery's backend need not store it again
    return executed.value
