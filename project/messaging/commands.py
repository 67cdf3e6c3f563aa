"""Commands as real Celery tasks: validated by the caller, executed once by the worker.

Caller side (`delay`, `apply_async`, signatures, `bus.send`, a handler's `commands.send`):
the fields are validated against the contract, and the idempotency key against the
length the store keeps, before anything is published; the task id derives from the
idempotency key, so duplicates share one AsyncResult.

Worker side: project/messaging/execution.py (validate again for foreign senders, claim the key,
run the handler and store its result in one transaction).
"""
from __future__ import annotations

import logging
import uuid
from typing import Any

from project.contracts import IDEMPOTENCY_KEY, Command, DomainError
from project.errors import IdempotencyConflict, InvalidMessage, MisroutedCommand
from project.messaging.retry import Backoff
from project.messaging.runtime import BusTask
from project.store import idempotency, results
from project.store.tables import commands as commands_table

logger = logging.getLogger(__name__)


def prepare(contract: type[Command], fields: dict[str, Any], key: str | None) -> tuple[dict[str, Any], str]:
    """Validate `fields` (pydantic's ValidationError; ValueError for a key too long) -> (body, task id)."""
    fields = dict(fields)
    key = key or fields.pop(IDEMPOTENCY_KEY, None)
    fields.pop(IDEMPOTENCY_KEY, None)
    return body_of(contract.model_validate(fields), key)


def body_of(command: Command, key: str | None) -> tuple[dict[str, Any], str]:
    """The message body of a validated command and its task id (raises ValueError for a key too long)."""
    payload = command.payload()
    key = key or command.natural_key_value()
    if key is None:
        return payload, str(uuid.uuid4())
    check_key(command.task_name(), key)
    task_id = idempotency.task_id_for(command.task_name(), key, command.payload_hash())
    return {**payload, IDEMPOTENCY_KEY: key}, task_id


def check_key(name: str, key: str) -> None:
    """Refuse, before anything is published, a key the worker could not claim."""
    # Past the column's length PostgreSQL refuses the claim, and the message would end
    # dead-lettered as retries-exhausted on the worker, long after the caller moved on.
    limit = commands_table.c.key.type.length
    if len(str(key)) > limit:
        raise ValueError(
            f"the idempotency key of {name} is {len(str(key))} characters long; the bus stores at most "
            f"{limit} (column bus_commands.key). Use a shorter key, e.g. a digest of this one: "
            f"hashlib.sha256(key.encode()).hexdigest()"
        )


def check_route(name: str, options: dict[str, Any]) -> None:
    """A command goes to its own queue only: never another queue, never a fanout exchange.

    Accepted: no routing options, or the command's own queue named by `queue`, by its own
    exchange, or by the default exchange ('') with its name as routing key (a retry's route).
    """
    queue = options.get("queue")
    queue_name = getattr(queue, "name", queue)
    exchange = options.get("exchange")
    exchange_name = getattr(exchange, "name", exchange)
    routing_key = options.get("routing_key")
    if queue_name not in (None, name) or exchange_name not in (None, "", name) \
            or routing_key not in (None, name) or getattr(exchange, "type", "direct") == "fanout":
        raise MisroutedCommand(
            f"{name} is a command: it goes to its own queue {name!r} and nowhere else "
            f"(got queue={queue_name!r}, exchange={exchange_name!r}, routing_key={routing_key!r}). "
            f"Drop the queue/exchange/routing_key options; to tell many listeners, publish an event "
            f"from the handler instead."
        )


class CommandTask(BusTask):
    """The Celery task of one command."""

    # final outcomes, not crashes: Celery logs them without a traceback
    throws = (DomainError, IdempotencyConflict, InvalidMessage)

    @classmethod
    def retry_policy(cls) -> Backoff:
        """The bus's one policy for commands."""
        return cls.bus.command_policy

    # ---- caller side -------------------------------------------------------------
    def apply_async(self, args=None, kwargs=None, task_id=None, **options):  # noqa: D102
        if args:
            raise TypeError(
                f"{self.name} takes the fields of {self.binding.contract.__name__} as keywords, "
                f"not positional args {tuple(args)!r}; in a chain use an immutable signature: .si(**fields)"
            )
        check_route(self.name, options)
        body, derived_id = prepare(self.binding.contract, kwargs or {}, options.pop(IDEMPOTENCY_KEY, None))
        self.bus.ensure_broker()
        return super().apply_async((), body, task_id=task_id or derived_id, **options)



def run_command(task: CommandTask, **fields: Any) -> Any:
    """The body of every command task."""
    executed = task.run_execution(task.bus.execution.command, fields)
    results.mark(task.request, executed.stored_under)  # Celery's backend need not store it again
    return executed.value
