"""Message contracts: the only part of the bus a sending service needs to import.

A `Command` is an intent with exactly one owner; an `Event` is a fact with many
listeners. Each contract names the boundary that owns it, and its broker names derive
from that (see DESIGN.md, naming): `orders.place_order` for the command `PlaceOrder` of
boundary `orders`, `events.order_placed` for the event `OrderPlaced`.

This module depends on pydantic only.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

__all__ = ["Command", "CommandSender", "DomainError", "Event", "EventSink", "Message", "MessageContext",
           "snake_case"]

_BOUNDARY = re.compile(r"^[a-z][a-z0-9_]*$")
#: the kwarg a caller may add to a command's fields; no contract may use it as a field
IDEMPOTENCY_KEY = "idempotency_key"


def snake_case(name: str) -> str:
    """`PlaceOrder` -> `place_order`, `SendSMS` -> `send_sms`."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()


class DomainError(Exception):
    """A business rule refused the message; it is final, never retried.

    The first outcome is stored with the idempotency key, so a duplicate gets the
    same error. Subclasses must accept a single message argument.
    """


class Message(BaseModel):
    """Base of commands and events: immutable, strict about unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    boundary: ClassVar[str]
    natural_key: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, boundary: str | None = None,
                          natural_key: tuple[str, ...] | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__name__ in ("Command", "Event"):
            return
        if boundary is None:
            boundary = getattr(cls, "boundary", None)
        if boundary is None or not _BOUNDARY.match(boundary):
            raise TypeError(
                f"{cls.__name__} must name its owning boundary, e.g. "
                f"`class {cls.__name__}({cls.__mro__[1].__name__}, boundary=\"orders\")`; "
                f"got {boundary!r} (lowercase letters, digits and _ only)"
            )
        cls.boundary = boundary
        if natural_key is not None:
            cls.natural_key = tuple(natural_key)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if IDEMPOTENCY_KEY in cls.model_fields:
            raise TypeError(f"{cls.__name__}: `{IDEMPOTENCY_KEY}` is reserved for the caller's key; rename the field")
        missing = [f for f in cls.natural_key if f not in cls.model_fields]
        if missing:
            raise TypeError(f"{cls.__name__}: natural_key names unknown fields {missing}; "
                            f"use fields of the contract: {sorted(cls.model_fields)}")

    def payload(self) -> dict[str, Any]:
        """The JSON-ready fields, as they travel in the message body."""
        return self.model_dump(mode="json")

    def payload_hash(self) -> str:
        """A stable digest of the values: equal values, equal hash, in every process.

        Decimals are normalised first, so "12.5" and "12.50" are one amount (the JSON
        payload keeps the sender's spelling, which must not make a resend a conflict).
        """
        return payload_hash(_canonical(self.model_dump(mode="python")))


def payload_hash(payload: dict[str, Any]) -> str:
    """Digest of a JSON-ready payload (sorted keys, compact separators)."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _canonical(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value.normalize(), "f")
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


class Command(Message):
    """An intent: exactly one handler, in the boundary that owns the contract.

    Declare `class PlaceOrder(Command, boundary="orders", natural_key=("order_id",))`;
    the natural key (optional) is the idempotency key when the caller gives none.
    """

    @classmethod
    def task_name(cls) -> str:
        """Task name == queue name == `<boundary>.<snake_command>`."""
        return f"{cls.boundary}.{snake_case(cls.__name__)}"

    def natural_key_value(self) -> str | None:
        """The key derived from the fields named in `natural_key`, or None."""
        if not self.natural_key:
            return None
        return "|".join(f"{f}={getattr(self, f)}" for f in self.natural_key)


class Event(Message):
    """A fact: published by its owning boundary, delivered to every subscriber."""

    @classmethod
    def exchange_name(cls) -> str:
        """`events.<snake_event>`: a durable fanout exchange."""
        return f"events.{snake_case(cls.__name__)}"


class EventSink(Protocol):
    """What a handler publishes facts through (the `events` dependency).

    Events are written to the outbox in the handler's transaction and published after
    commit; an event owned by another boundary is refused.
    """

    def publish(self, event: Event) -> None: ...


class CommandSender(Protocol):
    """What a handler sends commands through (the `commands` dependency), also via the outbox."""

    def send(self, command: Command, *, idempotency_key: str | None = None) -> None: ...


@dataclass(frozen=True)
class MessageContext:
    """The `context` dependency: who is handling what, for keys passed to external systems."""

    message_id: str
    handler: str
    idempotency_key: str
    attempt: int
    correlation_id: str | None = None
