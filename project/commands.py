"""Commands as real Celery tasks: validated by the caller, executed once by the worker.

Caller side (`delay`, `apply_async`, signatures, `bus.send`): the fields are validated
against the contract before anything is published; the task id derives from the
idempotency key, so duplicates share one AsyncResult.

Worker side: validate again (foreign senders), then in one transaction claim the key,
run the handler and store its result. A duplicate returns the stored result without
running the handler; an invalid message or a key conflict is dead-lettered, never run
and never retried; infrastructure failures retry with backoff.
"""
from __future__ import annotations

import importlib
import logging
import traceback
import uuid
from typing import TYPE_CHECKING, Any

from celery import Task
from celery.exceptions import Retry
from pydantic import ValidationError
from pydantic_core import to_jsonable_python

from project import deadletters, idempotency
from project.contracts import IDEMPOTENCY_KEY, Command, DomainError, payload_hash
from project.errors import IdempotencyConflict, InvalidMessage, MisroutedCommand
from project.uow import UnitOfWork

if TYPE_CHECKING:
    from project.core import Bus
    from project.registry import CommandBinding

logger = logging.getLogger(__name__)


def prepare(contract: type[Command], fields: dict[str, Any], key: str | None) -> tuple[dict[str, Any], str]:
    """Validate `fields` (raises pydantic's ValidationError) -> (message body, task id)."""
    fields = dict(fields)
    key = key or fields.pop(IDEMPOTENCY_KEY, None)
    fields.pop(IDEMPOTENCY_KEY, None)
    command = contract.model_validate(fields)
    return body_of(command, key)


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


class CommandTask(Task):
    """The Celery task of one command; `bus` and `binding` are set per command."""

    bus: "Bus"
    binding: "CommandBinding"
    typing = False  # the contract validates the fields, not the function signature
    # final outcomes, not crashes: Celery logs them without a traceback
    throws = (DomainError, IdempotencyConflict, InvalidMessage)

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
        contract, name, request = self.binding.contract, self.name, self.request
        key = fields.pop(IDEMPOTENCY_KEY, None)
        try:
            command = contract.model_validate(fields)
        except ValidationError as exc:
            self._dead_letter("invalid", _field_errors(exc), {**fields, IDEMPOTENCY_KEY: key})
            raise InvalidMessage(
                f"{name} message {request.id} does not fit {contract.__name__}: {_field_errors(exc)}. "
                f"It was dead-lettered and not executed; fix the sender and send it again."
            ) from None
        payload = command.payload()
        key = key or command.natural_key_value() or request.id
        try:
            return self._execute_once(command, key, payload)
        except (Retry, DomainError, IdempotencyConflict):
            raise
        except Exception as exc:
            return self._retry_or_dead_letter(exc, {**payload, IDEMPOTENCY_KEY: key})

    def _execute_once(self, command: Command, key: str, payload: dict[str, Any]) -> Any:
        name, engine, digest = self.name, self.bus.engine(), payload_hash(payload)
        with UnitOfWork(engine) as uow:
            if not idempotency.claim(uow.session, name, key, digest, payload, self.request.id):
                outcome = idempotency.previous(uow.session, name, key)
                if outcome.payload_hash == digest:
                    idempotency.absorbed(uow.session, name, key)
                    logger.info("%s key %r already handled: duplicate absorbed", name, key)
                uow.commit()
                return self._replay(outcome, key, digest, payload)
            try:
                result = to_jsonable_python(self.binding.handler(command, **self.bus.dependencies(self.binding, uow)))
            except DomainError as exc:
                uow.rollback()
                self._store_domain_error(command, key, digest, payload, exc)
                raise
            idempotency.finish(uow.session, name, key, result=result)
            uow.commit()
            return result

    def _store_domain_error(self, command, key, digest, payload, exc: DomainError) -> None:
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
            self._dead_letter("conflict", error, {**payload, IDEMPOTENCY_KEY: key})
            raise IdempotencyConflict(error)
        if outcome.status == "failed":
            raise _rebuild_domain_error(outcome.error_type, outcome.error_message)
        return outcome.result

    def _retry_or_dead_letter(self, exc: Exception, body: dict[str, Any]) -> Any:
        policy = self.bus.command_policy
        retries = self.request.retries
        if policy.should_retry(exc, retries):
            logger.warning("%s attempt %d failed (%r); retrying", self.name, retries + 1, exc)
            raise self.retry(exc=exc, countdown=policy.delay(retries), max_retries=policy.max_retries)
        self._dead_letter("retries-exhausted", f"{type(exc).__name__}: {exc}", body,
                          tb="".join(traceback.format_exception(exc)))
        raise exc

    def _dead_letter(self, reason: str, error: str, body: dict[str, Any], tb: str | None = None) -> None:
        request = self.request
        deadletters.record(
            self.bus.engine(), reason=reason, message_id=request.id, task=self.name,
            queue=(request.delivery_info or {}).get("routing_key") or self.name,
            boundary=self.binding.boundary, error=error, traceback=tb,
            headers={"task": self.name, "id": request.id, "retries": request.retries},
            body=to_json_bytes(body), content_type="application/json", content_encoding="utf-8",
            correlation_id=request.correlation_id,
        )


def to_json_bytes(value: Any) -> bytes:
    import json
    return json.dumps(value, default=str, sort_keys=True).encode()


def _field_errors(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or '(message)'}: {e['msg']}" for e in exc.errors())


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
