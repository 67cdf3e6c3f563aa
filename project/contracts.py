"""Message contracts: the only part of the bus a sending service needs to import.

A `Command` is an intent with exactly one owner; an `Event` is a fact with many
listeners. Each contract names the boundary that owns it, and its broker names derive
from that (docs/design.md, "Naming"): `orders.place_order` for the command `PlaceOrder` of
boundary `orders`, `events.order_placed` for the event `OrderPlaced`.

This module depends on pydantic only.
"""
from __future__ import annotations

import decimal
import functools
import hashlib
import json
import re
import types
import typing
from collections import deque
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from enum import Enum
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

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

    def payload_hash(self, *, received: bool = False) -> str:
        """A stable digest of the values: equal values, equal hash, in every process.

        It is the digest of the message as the worker sees it, rebuilt from its JSON body: the
        caller's task id and the worker's duplicate check must agree, also where JSON changes
        a value (an untyped field's datetime arrives as text, an untyped dict's int keys too).
        Each value is then written one way (`_canonical`): "12.5" and "12.50" are one amount,
        10:00Z and 12:00+02:00 one instant, and a set's order (which follows PYTHONHASHSEED)
        does not count. The JSON payload keeps the sender's spelling. `received=True` says
        this instance was validated from its JSON body already (the worker's): no rebuild.
        """
        if received:
            return payload_hash(self.model_dump(mode="python"))
        return self.payload_and_hash()[1]

    def payload_and_hash(self) -> tuple[dict[str, Any], str]:
        """`payload()` and `payload_hash()` from one dump of the fields (what a sender needs of a message).

        Where the contract's fields are all plain text, numbers, booleans or None, the JSON
        body is what the worker rebuilds, value for value (`_plain_fields`): it is hashed as
        it is. Any other body is rebuilt first, as the worker will.
        """
        payload = self.payload()
        plain = _plain_fields(type(self))
        if plain is not None and len(payload) == len(plain) \
                and all(type(payload.get(name, _MISSING)) in kinds for name, kinds in plain):
            return payload, payload_hash(payload)
        return payload, self._rebuilt_hash(payload)

    def _rebuilt_hash(self, payload: dict[str, Any]) -> str:
        """The hash of the message the worker rebuilds from `payload`, this message's JSON body."""
        try:
            received_model = type(self).model_validate(payload)
        except ValidationError as exc:
            raise TypeError(f"{type(self).__name__} does not validate from its own JSON body, so the worker would "
                            f"refuse it: {exc}\nGive its fields types that JSON carries back (no strict mode for "
                            f"datetimes, sets, Decimals...) and validators that accept what they serialise") from exc
        return payload_hash(received_model.model_dump(mode="python"))


_MISSING = object()
#: a field of one of these types, holding a value of exactly that type, comes back from JSON as that value
_PLAIN_TYPES = (str, int, float, bool)
#: settings that change neither how a plain field validates nor how it is dumped
_PLAIN_CONFIG = frozenset({"frozen", "extra", "title", "json_schema_extra", "use_attribute_docstrings", "strict",
                           "hide_input_in_errors", "protected_namespaces", "defer_build", "validate_assignment"})
#: what a contract could override to change its body or what the worker makes of it
_HOOKS = ("payload", "model_dump", "model_validate", "model_post_init", "__get_pydantic_core_schema__")


@functools.cache
def _plain_fields(contract: type[Message]) -> tuple[tuple[str, tuple[type, ...]], ...] | None:
    """Each field's name and the exact types of its plain values; None unless every field can be plain.

    A value of exactly str, int, float or bool (or None where the field allows it) is dumped to
    JSON as itself, and the worker validates it back to itself: nothing in the contract may
    change it on the way, so no validator or serializer (on the model or the field), no
    constraint, alias, exclusion or setting of the field, no setting of the model that touches
    text or numbers, no hook around validation or dumping. Then the payload is its own rebuild.
    """
    model = contract.__pydantic_decorators__
    if any((model.validators, model.field_validators, model.root_validators, model.field_serializers,
            model.model_serializers, model.model_validators, model.computed_fields)):
        return None
    config = contract.model_config
    if not set(config) <= _PLAIN_CONFIG or config.get("extra") not in (None, "forbid", "ignore"):
        return None  # extra="allow" would dump extra values of any type
    own = contract.__mro__[:contract.__mro__.index(Message)]  # the contract and the classes it adds to Message
    if any(hook in vars(cls) for cls in own for hook in _HOOKS):
        return None
    plain = []
    for name, field in contract.model_fields.items():
        kinds = _plain_kinds(field.annotation)
        if kinds is None or field.metadata or field.exclude or field.discriminator is not None \
                or (field.alias, field.validation_alias, field.serialization_alias) != (None, None, None):
            return None
        plain.append((name, kinds))
    return tuple(plain)


def _plain_kinds(annotation: Any) -> tuple[type, ...] | None:
    """`str` -> (str,); `int | None` -> (int, NoneType); None for any other annotation."""
    if annotation in _PLAIN_TYPES:
        return (annotation,)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if len(args) == 2 and type(None) in args:
            other = args[0] if args[1] is type(None) else args[1]
            if other in _PLAIN_TYPES:
                return (other, type(None))
    return None


def payload_hash(payload: dict[str, Any]) -> str:
    """Digest of a payload: its values in canonical form, as JSON with sorted keys."""
    return hashlib.sha256(_encoded(_canonical(payload)).encode()).hexdigest()


#: json.dumps(value, sort_keys=True, separators=(",", ":")), without building an encoder per call
_encoded = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode


# Decimal.normalize() rounds to the context's precision: 28 digits by default, and a process may set another
_EXACT = decimal.Context(prec=decimal.MAX_PREC, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _canonical(value: Any) -> Any:
    """`value` in JSON types, written one way per value, the same in every process.

    Naive datetimes and times stay wall-clock readings, unlike any instant: the bus cannot know
    the sender's zone, and reading them in the host's zone would make hosts disagree.
    """
    if value is None or type(value) in (str, int, bool):  # most values: checked first, the hash is on every send
        return value
    if isinstance(value, Enum):
        return _canonical(value.value)
    if isinstance(value, float):
        return 0.0 if value == 0 else value  # -0.0 == 0.0; NaN and the infinities are written one way each
    if isinstance(value, Decimal):
        if not value.is_finite():
            return str(value)
        return format(value.normalize(_EXACT), "f") if value else "0"  # -0 is 0
    if isinstance(value, (datetime, time)) and value.utcoffset() is not None:
        return str(_in_utc(value))
    if isinstance(value, dict):
        return _mapping(value)
    if isinstance(value, (set, frozenset)):  # elements may be of mixed types: sort them as JSON text
        return sorted(map(_canonical, value), key=_encoded)
    if isinstance(value, (list, tuple, deque)):
        return [_canonical(v) for v in value]
    if isinstance(value, (str, int)):
        return value
    return str(value)  # date, naive datetime, timedelta, UUID, bytes, IP, path, URL: one str() per value


def _in_utc(value: datetime | time) -> datetime | time | timedelta:
    """An aware datetime in UTC; an aware time of day in UTC around the clock (01:00+02:00 is 23:00Z)."""
    if isinstance(value, time):
        moment = datetime.combine(date(2000, 1, 2), value.replace(tzinfo=None)) - value.utcoffset()
        return moment.time().replace(tzinfo=timezone.utc)
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:  # an instant in the year 0 or 10000 of UTC: its distance from the epoch
        return value - _EPOCH


def _mapping(value: dict) -> dict:
    """Keys all text or all numbers are sorted by JSON as before; mixed or other keys as their JSON text."""
    items = [(_canonical(k), _canonical(v)) for k, v in value.items()]
    keys = [k for k, _ in items]
    if not (all(isinstance(k, str) for k in keys) or all(isinstance(k, (int, float)) for k in keys)):
        items = [(k if isinstance(k, str) else _encoded(k), v) for k, v in items]
    return dict(items)


class Command(Message):
    """An intent: exactly one handler, in the boundary that owns the contract.

    Declare `class PlaceOrder(Command, boundary="orders", natural_key=("order_id",))`;
    the natural key (optional) is the idempotency key when the caller gives none.
    """

    @classmethod
    def task_name(cls) -> str:
        """Task name == queue name == `<boundary>.<snake_command>`."""
        return _task_name(cls)

    def natural_key_value(self) -> str | None:
        """The key derived from the fields named in `natural_key`, or None."""
        if not self.natural_key:
            return None
        return "|".join(f"{f}={getattr(self, f)}" for f in self.natural_key)


@functools.cache
def _task_name(contract: type[Command]) -> str:
    return f"{contract.boundary}.{snake_case(contract.__name__)}"


class Event(Message):
    """A fact: published by its owning boundary, delivered to every subscriber."""

    @classmethod
    def exchange_name(cls) -> str:
        """`events.<snake_event>`: a durable fanout exchange."""
        return f"events.{snake_case(cls.__name__)}"


class EventSink(Protocol):
    """What a handler publishes facts through (the `events` dependency).

    Events are written to the outbox in the handler's transaction and published after
    commit (`delay`: a timedelta or seconds later, a durable timer); an event owned by
    another boundary is refused.
    """

    def publish(self, event: Event, *, delay: timedelta | float | None = None) -> None: ...


class CommandSender(Protocol):
    """What a handler sends commands through (the `commands` dependency), also via the outbox
    (`delay`: a timedelta or seconds later, a durable timer)."""

    def send(self, command: Command, *, idempotency_key: str | None = None,
             delay: timedelta | float | None = None) -> None: ...


@dataclass(frozen=True)
class MessageContext:
    """The `context` dependency: who is handling what, for keys passed to external systems."""

    message_id: str
    handler: str
    idempotency_key: str
    attempt: int
    correlation_id: str | None = None
