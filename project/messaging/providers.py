"""The keyword-only arguments of handlers: the bus's builtins and what the application provides.

    bus.provide("orders", lambda uow: SqlOrderRepository(uow.session))

`events` and `commands` are the execution's outbox sink, `context` its MessageContext;
every other name is built, per execution, by the factory provided under that name.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from project.contracts import MessageContext
from project.errors import MissingDependency
from project.messaging.outbox import OutboxSink
from project.messaging.registry import CommandBinding, SubscriberBinding
from project.store.uow import UnitOfWork

Provider = Callable[[UnitOfWork], Any]
#: dependencies every handler may ask for, built by the bus per execution
BUILTINS = ("events", "commands", "context")


class Providers:
    """The dependency factories of one bus, by name."""

    def __init__(self) -> None:
        self._factories: dict[str, Provider] = {}

    def provide(self, name: str, factory: Provider) -> None:
        """Provide the handler dependency `name`, built per execution from the unit of work."""
        self._factories[name] = factory

    def provider(self, name: str) -> Provider:
        """The factory of dependency `name` (KeyError if nothing provides it)."""
        return self._factories[name]

    def sink(self, uow: UnitOfWork, boundary: str, origin: str, context: MessageContext) -> OutboxSink:
        """The `events`/`commands` dependency of one execution (writes to the outbox).

        What it publishes belongs to the same conversation and was caused by this message.
        """
        return OutboxSink(uow.session, boundary, origin, correlation_id=context.correlation_id,
                          causation_id=context.message_id)

    def dependencies(self, binding: CommandBinding | SubscriberBinding, uow: UnitOfWork,
                     sink: OutboxSink, context: MessageContext) -> dict[str, Any]:
        """The keyword-only arguments of `binding`'s handler, built for this execution."""
        builtins = {"events": sink, "commands": sink, "context": context}
        return {name: builtins[name] if name in builtins else self._factories[name](uow)
                for name in self.check(binding)}

    def check(self, binding: CommandBinding | SubscriberBinding) -> list[str]:
        """The handler's dependency names; raise if one has no provider."""
        names = [p.name for p in inspect.signature(binding.handler).parameters.values()
                 if p.kind is inspect.Parameter.KEYWORD_ONLY]
        missing = [n for n in names if n not in self._factories and n not in BUILTINS]
        if missing:
            raise MissingDependency(
                f"{binding.handler_name} needs {', '.join(missing)} but nothing provides "
                f"{'it' if len(missing) == 1 else 'them'}; add bus.provide({missing[0]!r}, lambda uow: ...) "
                f"in the tasks module that binds it (provided: {sorted(self._factories) or 'none'})"
            )
        return names
