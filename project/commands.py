"""Commands as real Celery tasks: validated by the caller, executed once by the worker.

Caller side (`delay`, `apply_async`, signatures, `bus.send`): the fields are validated
against the contract before anything is published; the task id derives from the
idempotency key, so duplicates share one AsyncResult.

Worker side: validate again (foreign senders), then in one transaction claim the key,
run the handler, store its result and its outbox rows. A duplicate returns the stored
result without running the handler; an invalid message or a key conflict is
dead-lettered, never run and never retried; infrastructure failures retry with backoff.
"""
from __future__ import annotations

import importlib
import logging
import uuid
from typing import Any

from celery.exceptions import Retry
from pydantic_core import to_jsonable_python

from project import idempotency
from project.contracts import IDEMPOTENCY_KEY, Command, DomainError, payload_hash
from project.errors import IdempotencyConflict, InvalidMessage, MisroutedCommand
from project.retry import Backoff
from project.runtime import BusTask
from project.uow import UnitOfWork

logger = logging.getLogger(__name__)


def prepare(contract: type[Command], fields: dict[str, Any], key: str | None) -> tuple[dict[str, Any], str]:
    """Validate `fields` (raises pydantic's ValidationError) -> (message body, task id)."""
    fields = dict(fields)
    key = key or fields.pop(IDEMPOTENCY_KEY, None)
    fields.pop(IDEMPOTENCY_KEY, None)
    return body_of(contract.model_validate(fields), key)


def body_of(command: Command, key: str | None) -> tuple[dict[str, Any], str]:
    """The message body of a validated command and its task id."""
    payload = command.payload()
    key = key or command.natural_key_value()
    if key is None:
        return payload, str(uuid.uuid4())
    task_id = idempotency.task_id_for(command.task_name(), key, payload_hash(payload))
    return {**payload, IDEMPOTENCY_KEY: key}, task_id


def check_route(name: str, options: dict[str, Any]) -> None:
    """A command goes to its own queue only: never another queue, never a fanout exchange."""
    queue = options.get("queue")
    queue_name = getattr(queue, "name", queue)
    exchange = options.get("exchange")
    exchange_name = getattr(exchange, "name", exchange)
    if queue_name not in (None, name) or exchange_name not in (None, "", name) \
            or getattr(exchange, "type", "direct") == "fanout":
        raise MisroutedCommand(
            f"{name} is a command: it goes to its own queue {name!r} and nowhere else "
            f"(got queue={queue_name!r}, exchange={exchange_name!r}). Drop the queue/exchange option; "
            f"to tell many listeners, publish an event from the handler instead."
        )


class CommandTask(BusTask):
    """The Celery task of one command."""

    # final outcomes, not crashes: Celery logs them without a traceback
    throws = (DomainError, IdempotencyConflict, InvalidMessage)

    @property
    def policy(self) -> Backoff:
        return self.bus.command_policy

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

    # ---- worker side -------------------------------------------------------------
    def execute(self, fields: dict[str, Any]) -> Any:
        """Run the handler once per idempotency key, in one transaction."""
        key = fields.pop(IDEMPOTENCY_KEY, None)
        command = self.validate(fields, {**fields, IDEMPOTENCY_KEY: key})
        payload = command.payload()
        key = key or command.natural_key_value() or self.request.id
        try:
            result, published = self._execute_once(command, key, payload)
        except (Retry, DomainError, IdempotencyConflict):
            raise
        except Exception as exc:
            return self.retry_or_dead_letter(exc, {**payload, IDEMPOTENCY_KEY: key})
        self.bus.publish_after_commit(published)
        return result

    def _execute_once(self, command: Command, key: str, payload: dict[str, Any]) -> tuple[Any, list[str]]:
        name, digest = self.name, payload_hash(payload)
        with UnitOfWork(self.bus.engine()) as uow:
            if not idempotency.claim(uow.session, name, key, digest, payload, self.request.id):
                outcome = idempotency.previous(uow.session, name, key)
                if outcome.payload_hash == digest:
                    idempotency.absorbed(uow.session, name, key)
                    logger.info("%s key %r already handled: duplicate absorbed", name, key)
                uow.commit()
                return self._replay(outcome, key, digest, payload), []
            context = self.context(key)
            sink = self.bus.sink(uow, self.binding.boundary, f"{name}:{key}", context)
            try:
                result = to_jsonable_python(self.binding.handler(
                    command, **self.bus.dependencies(self.binding, uow, sink, context)))
            except DomainError as exc:
                uow.rollback()
                self._store_domain_error(key, digest, payload, exc)
                raise
            idempotency.finish(uow.session, name, key, result=result)
            uow.commit()
            return result, sink.written

    def _store_domain_error(self, key: str, digest: str, payload: dict[str, Any], exc: DomainError) -> None:
        """Keep a refused command's error with its key, so duplicates get the same error."""
        with UnitOfWork(self.bus.engine()) as uow:
            if idempotency.claim(uow.session, self.name, key, digest, payload, self.request.id):
                idempotency.finish(uow.session, self.name, key,
                                   error_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
                                   error_message=str(exc))
            uow.commit()

    def _replay(self, outcome: idempotency.Outcome, key: str, digest: str, payload: dict[str, Any]) -> Any:
        if outcome.payload_hash != digest:
            fields = idempotency.differing_fields(outcome.payload, payload)
            error = (f"idempotency key {key!r} of {self.name} was first used with a different payload "
                     f"(fields that differ: {', '.join(fields)}); the handler did not run. Use a new key "
                     f"for a new request, or resend the original payload to get the first result.")
            self.dead_letter("conflict", error, {**payload, IDEMPOTENCY_KEY: key})
            raise IdempotencyConflict(error)
        if outcome.status == "failed":
            raise _rebuild_domain_error(outcome.error_type, outcome.error_message)
        return outcome.result


def _rebuild_domain_error(error_type: str | None, message: str | None) -> DomainError:
    """The stored domain error as its own class when importable, else a DomainError."""
    module, _, qualname = (error_type or "").rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), qualname)
        if isinstance(cls, type) and issubclass(cls, DomainError):
            return cls(message)
    except (ImportError, AttributeError, ValueError):
        pass
    return DomainError(f"{error_type}: {message}")


def run_command(task: CommandTask, **fields: Any) -> Any:
    """The body of every command task."""
    return task.execute(fields)
