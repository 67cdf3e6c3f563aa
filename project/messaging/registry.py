"""Who owns which command and who subscribes to which event.

The registry is the single source of truth the topology, the worker, the CLI and the
docs read from. It enforces at import time that a command has exactly one handler, in
the boundary that owns the contract.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from project.contracts import Command, Event, snake_case
from project.errors import DuplicateCommandHandler, NotACommand, WrongBoundary
from project.messaging.retry import DEFAULT_SUBSCRIBER_POLICY


def describe(func: Callable[..., Any]) -> str:
    """`handlers.orders.place_order (handlers/orders.py:12)`, for error messages."""
    name = f"{func.__module__}.{func.__qualname__}"
    try:
        where = f"{inspect.getsourcefile(func)}:{inspect.getsourcelines(func)[1]}"
    except (OSError, TypeError):
        where = "unknown file"
    return f"{name} ({where})"


def handler_name(func: Callable[..., Any]) -> str:
    return f"{func.__module__}.{func.__qualname__}"


@dataclass(frozen=True)
class CommandBinding:
    """A command contract and its one handler."""

    contract: type[Command]
    handler: Callable[..., Any]

    @property
    def name(self) -> str:
        """Task name == queue name."""
        return self.contract.task_name()

    @property
    def boundary(self) -> str:
        return self.contract.boundary

    @property
    def handler_name(self) -> str:
        return handler_name(self.handler)


@dataclass(frozen=True)
class SubscriberBinding:
    """An event contract and one of its subscribers, in the subscriber's boundary."""

    contract: type[Event]
    handler: Callable[..., Any]
    boundary: str
    retry: Any = None  # its Backoff policy (the registry fills in the default)

    @property
    def name(self) -> str:
        """Task name == queue name == `<boundary>.<handler>`."""
        return f"{self.boundary}.{snake_case(self.handler.__name__)}"

    @property
    def handler_name(self) -> str:
        return handler_name(self.handler)


@dataclass
class Registry:
    """Commands (one handler each) and event subscribers (many each)."""

    commands: dict[str, CommandBinding] = field(default_factory=dict)
    subscribers: dict[str, SubscriberBinding] = field(default_factory=dict)
    events: dict[str, type[Event]] = field(default_factory=dict)

    def add_command(self, contract: Any, handler: Callable[..., Any],
                    boundary: str | None = None) -> CommandBinding:
        """Register the one handler of `contract`; raise if it already has one."""
        if not (isinstance(contract, type) and issubclass(contract, Command)):
            raise NotACommand(
                f"bus.command() takes a Command contract class, got {contract!r}; "
                f"declare `class X(Command, boundary=...)`"
                + ("; events take subscribers: use bus.subscriber()" if _is_event(contract) else "")
            )
        if boundary is not None and boundary != contract.boundary:
            raise WrongBoundary(
                f"{contract.__name__} belongs to boundary {contract.boundary!r}; it cannot be handled "
                f"in {boundary!r}. Move the handler to the {contract.boundary!r} boundary, or send the "
                f"command from {boundary!r} instead of handling it there."
            )
        binding = CommandBinding(contract, handler)
        existing = self.commands.get(binding.name)
        if existing is not None and existing.handler is not handler:
            raise DuplicateCommandHandler(
                f"{contract.__name__} is already handled by {describe(existing.handler)}; "
                f"{describe(handler)} cannot handle it too. A command has exactly one handler: "
                f"remove one binding, or publish an event if several parts must react."
            )
        self.commands[binding.name] = binding
        return binding

    def add_subscriber(self, contract: Any, handler: Callable[..., Any], boundary: str,
                       retry: Any = None) -> SubscriberBinding:
        """Register one subscriber of `contract` in `boundary`."""
        if not _is_event(contract):
            raise TypeError(
                f"bus.subscriber() takes an Event contract class, got {contract!r}"
                + ("; a command has one handler: use bus.command()" if _is_command(contract) else "")
            )
        binding = SubscriberBinding(contract, handler, boundary, retry or DEFAULT_SUBSCRIBER_POLICY)
        existing = self.subscribers.get(binding.name)
        if existing is not None and existing.handler is not handler:
            raise DuplicateCommandHandler(
                f"queue {binding.name} already belongs to {describe(existing.handler)}; "
                f"{describe(handler)} needs another name or boundary"
            )
        self.subscribers[binding.name] = binding
        self.events[contract.exchange_name()] = contract
        return binding

    def command_for(self, contract: type[Command]) -> CommandBinding | None:
        return self.commands.get(contract.task_name())

    def boundaries(self) -> set[str]:
        return {b.boundary for b in self.commands.values()} | {s.boundary for s in self.subscribers.values()}


def _is_event(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, Event)


def _is_command(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, Command)
