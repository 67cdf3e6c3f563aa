"""What a command becomes before anything is published, for every sender: its body, task id and route.

`delay`/`apply_async` of a command task, `bus.send`, a handler's `commands.send` (the
outbox) and the HTTP intake all check a command here: its fields against the contract,
its idempotency key against the length the store keeps, its route against the one queue
a command may go to. Nothing here needs Celery.
"""
from __future__ import annotations

import uuid
from typing import Any

from project.contracts import IDEMPOTENCY_KEY, Command
from project.errors import MisroutedCommand
from project.store import idempotency
from project.store.tables import commands as commands_table

#: the longest key the store keeps (column bus_commands.key)
KEY_LIMIT: int = commands_table.c.key.type.length


def prepare(contract: type[Command], fields: dict[str, Any], key: str | None) -> tuple[dict[str, Any], str]:
    """Validate `fields` (pydantic's ValidationError; ValueError for a key too long) -> (body, task id)."""
    fields = dict(fields)
    key = key or fields.pop(IDEMPOTENCY_KEY, None)
    fields.pop(IDEMPOTENCY_KEY, None)
    return body_of(contract.model_validate(fields), key)


def body_of(command: Command, key: str | None) -> tuple[dict[str, Any], str]:
    """The message body of a validated command and its task id (raises ValueError for a key too long)."""
    key = key or command.natural_key_value()
    if key is None:
        return command.payload(), str(uuid.uuid4())
    name = command.task_name()
    check_key(name, key)
    payload, digest = command.payload_and_hash()
    return {**payload, IDEMPOTENCY_KEY: key}, idempotency.task_id_for(name, key, digest)


def shown(body: dict[str, Any]) -> dict[str, str]:
    """Celery's `argsrepr` and `kwargsrepr` options for a bus message: what Flower and the logs show.

    Left to Celery, its saferepr of the body took 8% of a command's `.delay()` (docs/benchmarks.md).
    """
    return {"argsrepr": "()", "kwargsrepr": kwargs_repr(body)}


def kwargs_repr(payload: dict[str, Any], limit: int = 1024) -> str:
    """What Flower shows as a message's kwargs: Celery's saferepr, without its cost per message.

    A payload is JSON (str, numbers, lists, dicts), whose repr saferepr would give as is;
    saferepr walks it in Python, which was a tenth of the relay's time. Cut at `limit`
    characters, as saferepr is.
    """
    text = repr(payload)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_key(name: str, key: str) -> None:
    """Refuse, before anything is published, a key the worker could not claim."""
    # Past the column's length PostgreSQL refuses the claim, and the message would end
    # dead-lettered as retries-exhausted on the worker, long after the caller moved on.
    if len(str(key)) > KEY_LIMIT:
        raise ValueError(
            f"the idempotency key of {name} is {len(str(key))} characters long; the bus stores at most "
            f"{KEY_LIMIT} (column bus_commands.key). Use a shorter key, e.g. a digest of this one: "
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
