"""The bus's errors. Each message says what went wrong and how to fix it.

Every error takes a single message argument so that Celery's result backend can
rebuild it in the caller (`AsyncResult.get()` raises the same class).
"""
from __future__ import annotations


class BusError(Exception):
    """Base of the bus's errors."""


class DuplicateCommandHandler(BusError):
    """A second handler was registered for a command: a command has exactly one."""


class WrongBoundary(BusError):
    """A handler was bound, or an event published, outside the contract's boundary."""


class NotACommand(BusError):
    """Something that is not a command contract was sent as a command."""


class MisroutedCommand(BusError):
    """A command was aimed at another queue or at an exchange (never a fanout)."""


class IdempotencyConflict(BusError):
    """The same idempotency key arrived with a different payload."""


class InvalidMessage(BusError):
    """A message does not fit its contract; it was dead-lettered, not executed."""


class OwnerConflict(BusError):
    """Two running workers serve one command queue with different handlers."""


class MissingDependency(BusError):
    """A handler asks for a keyword-only dependency nobody provides."""


class ConfigurationError(BusError):
    """A setting is missing or malformed."""
