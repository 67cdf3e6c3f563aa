"""Executing one delivery of a command or an event: the bus's semantics without Celery.

The Celery tasks (project/commands.py, project/subscribers.py) and the in-process test
harness (project/testing.py) run the same code from here:
- the fields are validated against the contract; an invalid message is dead-lettered,
  never run and never retried (`InvalidMessage`);
- a command claims its idempotency key, runs its handler and stores the result in one
  transaction; a duplicate gets the stored outcome, a conflicting payload is refused;
- a subscriber claims (event, subscriber) in its inbox in one transaction with its effects;
- what a handler publishes goes to the outbox and is handed to `bus.publisher` after commit;
- a failure the policy retries raises `RetryLater`; one it gives up on is dead-lettered;
- every attempt's outcome is logged for `bus trace` (project/trace.py).
"""
from __future__ import annotations

import importlib
import json
import logging
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python

from project import deadletters, idempotency, inbox, metrics, trace
from project.contracts import IDEMPOTENCY_KEY, Command, DomainError, MessageContext
from project.db import utcnow
from project.errors import IdempotencyConflict, InvalidMessage
from project.headers import EVENT_ID
from project.retry import Backoff
from project.uow import UnitOfWork

if TYPE_CHECKING:
    from project.core import Bus
    from project.registry import CommandBinding, SubscriberBinding

logger = logging.getLogger(__name__)
#: seconds before a message whose dead letter could not be stored (database down) runs again
STORE_RETRY_DELAY = 10.0


@dataclass(frozen=True)
class Delivery:
    """One message as its execution sees it."""

    name: str  # the task, which is also the queue
    message_id: str
    attempt: int = 0
    correlation_id: str | None = None
    root_id: str | None = None
    started_at: datetime = field(default_factory=utcnow, compare=False)  # of this attempt

    def context(self, key: str) -> MessageContext:
        return MessageContext(message_id=self.message_id, handler=self.name, idempotency_key=key,
                              attempt=self.attempt, correlation_id=self.correlation_id or self.message_id)


@dataclass(frozen=True)
class Executed:
    """The outcome of a delivery: the handler's (or the stored) result, and whether it ran now."""

    value: Any
    ran: bool
    #: a command's: the message id its claim stores the outcome under (this one's if it ran now)
    stored_under: str | None = None


class RetryLater(Exception):
    """The policy retries this failure after `delay` seconds (on the message's own queue)."""

    def __init__(self, delay: float, cause: BaseException) -> None:
        super().__init__(f"retry in {delay:.2f}s after {cause!r}")
        self.delay, self.cause = delay, cause


class Execution:
    """Runs deliveries against the bus's store."""

    def __init__(self, bus: "Bus") -> None:
        self.bus = bus

    # ---- commands ----------------------------------------------------------------
    def command(self, binding: "CommandBinding", fields: dict[str, Any], delivery: Delivery) -> Executed:
        """Run a command's handler once per idempotency key; its result (or the stored one)."""
        fields = dict(fields)
        key = fields.pop(IDEMPOTENCY_KEY, None)
        command = self._validate(binding, fields, {**fields, IDEMPOTENCY_KEY: key}, delivery)
        payload = command.payload()
        key = key or command.natural_key_value() or delivery.message_id
        try:
            result, published, stored_under = self._command_once(binding, command, key, payload, delivery)
        except (DomainError, IdempotencyConflict):
            raise
        except Exception as exc:
            raise self._failure(binding, self.bus.command_policy, exc, {**payload, IDEMPOTENCY_KEY: key}, delivery)
        self.bus.publisher.publish(published or [])
        return Executed(result, ran=published is not None, stored_under=stored_under)

    def _command_once(self, binding, command: Command, key: str, payload: dict[str, Any],
                      delivery: Delivery) -> tuple[Any, list[str] | None, str]:
        """(result, outbox ids written, this message id) if the handler ran, else (stored result, None, its id)."""
        name, digest = binding.name, command.payload_hash()
        with UnitOfWork(self.bus.engine()) as uow:
            if not idempotency.claim(uow.session, name, key, digest, payload, delivery.message_id):
                outcome = idempotency.previous(uow.session, name, key)
                if outcome.payload_hash == digest:
                    idempotency.absorbed(uow.session, name, key)
                    metrics.absorbed(name)
                    logger.info("%s key %r already handled: duplicate absorbed", name, key)
                uow.commit()
                return self._replay(binding, outcome, key, digest, payload, delivery), None, outcome.message_id
            context = delivery.context(key)
            sink = self.bus.sink(uow, binding.boundary, f"{name}:{key}", context)
            try:
                result = to_jsonable_python(binding.handler(
                    command, **self.bus.dependencies(binding, uow, sink, context)))
            except DomainError as exc:
                uow.rollback()
                self._store_domain_error(name, key, digest, payload, delivery, exc)
                trace.failed(self.bus.engine(), binding, delivery, exc, state="refused")
                raise
            uow.write(idempotency.finished(name, key, result=result), trace.succeeded(uow.dialect, binding, delivery))
            uow.commit()
            return result, sink.written, delivery.message_id

    def _store_domain_error(self, name: str, key: str, digest: str, payload: dict[str, Any],
                            delivery: Delivery, exc: DomainError) -> None:
        """Keep a refused command's error with its key, so duplicates get the same error."""
        with UnitOfWork(self.bus.engine()) as uow:
            if idempotency.claim(uow.session, name, key, digest, payload, delivery.message_id):
                idempotency.finish(uow.session, name, key,
                                   error_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
                                   error_message=str(exc))
            uow.commit()

    def _replay(self, binding, outcome: idempotency.Outcome, key: str, digest: str,
                payload: dict[str, Any], delivery: Delivery) -> Any:
        if outcome.payload_hash != digest:
            fields = idempotency.differing_fields(outcome.payload, payload)
            error = (f"idempotency key {key!r} of {binding.name} was first used with a different payload "
                     f"(fields that differ: {', '.join(fields)}); the handler did not run. Use a new key "
                     f"for a new request, or resend the original payload to get the first result.")
            self._dead_letter(binding, "conflict", error, {**payload, IDEMPOTENCY_KEY: key}, delivery)
            raise IdempotencyConflict(error)
        if outcome.status == "failed":
            raise _rebuild_domain_error(outcome.error_type, outcome.error_message)
        return outcome.result

    # ---- subscribers -------------------------------------------------------------
    def subscriber(self, binding: "SubscriberBinding", fields: dict[str, Any], delivery: Delivery) -> Executed:
        """Run a subscriber once per event (`ran` is False if it had already handled it)."""
        fields = dict(fields)
        event_id = fields.pop(EVENT_ID, None) or delivery.root_id or delivery.message_id
        body = {**fields, EVENT_ID: event_id}
        event = self._validate(binding, fields, body, delivery)
        try:
            ran, published = self._subscriber_once(binding, event, event_id, delivery)
        except Exception as exc:
            raise self._failure(binding, binding.retry, exc, body, delivery)
        self.bus.publisher.publish(published)
        return Executed(None, ran)

    def _subscriber_once(self, binding, event, event_id: str, delivery: Delivery) -> tuple[bool, list[str]]:
        with UnitOfWork(self.bus.engine()) as uow:
            if not inbox.claim(uow.session, event_id, binding.name):
                uow.commit()
                logger.info("%s already handled event %s: duplicate absorbed", binding.name, event_id)
                metrics.absorbed(binding.name)
                return False, []
            context = delivery.context(f"{binding.name}:{event_id}")
            sink = self.bus.sink(uow, binding.boundary, f"{binding.name}:{event_id}", context)
            binding.handler(event, **self.bus.dependencies(binding, uow, sink, context))
            uow.write(trace.succeeded(uow.dialect, binding, delivery, event_id=event_id))
            uow.commit()
            return True, sink.written

    # ---- shared ------------------------------------------------------------------
    def _validate(self, binding, fields: dict[str, Any], body: dict[str, Any], delivery: Delivery) -> BaseModel:
        try:
            return binding.contract.model_validate(fields)
        except ValidationError as exc:
            errors = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(message)'}: {e['msg']}" for e in exc.errors())
            self._dead_letter(binding, "invalid", errors, body, delivery)
            raise InvalidMessage(
                f"{binding.name} message {delivery.message_id} does not fit {binding.contract.__name__}: "
                f"{errors}. It was dead-lettered and not executed; fix the sender and send it again."
            ) from None

    def _failure(self, binding, policy: Backoff, exc: Exception, body: dict[str, Any],
                 delivery: Delivery) -> Exception:
        """What to raise: RetryLater if the policy retries `exc`, else `exc`, dead-lettered."""
        retry = policy.should_retry(exc, delivery.attempt)
        trace.failed(self.bus.engine(), binding, delivery, exc, state="retrying" if retry else "dead-lettered",
                     event_id=body.get(EVENT_ID))
        if retry:
            logger.warning("%s attempt %d failed (%r); retrying", binding.name, delivery.attempt + 1, exc)
            return RetryLater(policy.delay(delivery.attempt), exc)
        self._dead_letter(binding, "retries-exhausted",
                          f"{type(exc).__name__}: {exc} (after {delivery.attempt + 1} attempt(s))", body, delivery,
                          tb="".join(traceback.format_exception(exc)))
        return exc

    def _dead_letter(self, binding, reason: str, error: str, body: dict[str, Any], delivery: Delivery,
                     tb: str | None = None) -> None:
        try:
            self._record(binding, reason, error, body, delivery, tb)
        except Exception as exc:  # the store is down: never ack a message without its record
            logger.warning("%s: could not dead-letter %s (%r); retrying the message in %ss",
                           binding.name, delivery.message_id, exc, STORE_RETRY_DELAY)
            raise RetryLater(STORE_RETRY_DELAY, exc) from exc

    def _record(self, binding, reason: str, error: str, body: dict[str, Any], delivery: Delivery,
                tb: str | None) -> None:
        deadletters.record(
            self.bus.engine(), reason=reason, message_id=delivery.message_id, task=binding.name,
            queue=binding.name, boundary=binding.boundary, error=error, traceback=tb,
            headers={"task": binding.name, "id": delivery.message_id, "retries": delivery.attempt},
            body=json.dumps(body, default=str, sort_keys=True).encode(), content_type="application/json",
            content_encoding="utf-8", correlation_id=delivery.correlation_id or delivery.message_id,
        )


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
