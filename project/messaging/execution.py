"""Executing one delivery of a command or an event: the bus's semantics without Celery.

The Celery tasks (project/messaging/commands.py, project/messaging/subscribers.py) and the in-process test
harness (project/testing/harness.py) run the same code from here:
- the fields are validated against the contract; an invalid message is dead-lettered,
  never run and never retried (`InvalidMessage`);
- a command claims its idempotency key, runs its handler and stores the result in one
  transaction; a domain refusal rolls the handler back to a savepoint and is stored under
  the claim it keeps; a duplicate gets the stored outcome, a conflicting payload is refused;
- a subscriber claims (event, subscriber) in its inbox in one transaction with its effects;
- what a handler publishes goes to the outbox and is handed to the bus's publisher after commit;
  a redelivery that finds its execution committed hands over what that execution left
  unpublished (project/messaging/redispatch.py);
- a failure the policy retries raises `RetryLater`; one it gives up on is dead-lettered; a first
  attempt's unique-constraint violation (a concurrent transaction took the row) is retried once;
- every attempt's outcome is logged for `bus trace` (project/store/execution_log.py).
"""
from __future__ import annotations

import importlib
import json
import logging
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python

from project.contracts import IDEMPOTENCY_KEY, Command, DomainError, MessageContext
from project.dead_letters import store as deadletters
from project.errors import IdempotencyConflict, InvalidMessage
from project.headers import EVENT_ID
from project.messaging import redispatch
from project.messaging.retry import Backoff, lost_a_write_race
from project.observe import metrics
from project.store import batch as batches
from project.store import execution_log, idempotency, inbox
from project.store.tables import utcnow
from project.store.uow import UnitOfWork

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from project.messaging.outbox import Publisher
    from project.messaging.providers import Providers
    from project.messaging.registry import CommandBinding, SubscriberBinding

logger = logging.getLogger(__name__)
#: seconds before a message whose dead letter could not be stored (database down) runs again
STORE_RETRY_DELAY = 10.0
#: claims of one key per delivery: a key purged after the claim found it is claimed again
CLAIM_ATTEMPTS = 3


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
    """Runs deliveries against the bus's store.

    `engine`, `publisher` and `command_policy` are called at each use: the bus may be
    redirected (the in-process test harness) or given another publisher or policy.
    """

    def __init__(self, engine: Callable[[], "Engine"], publisher: Callable[[], "Publisher"],
                 command_policy: Callable[[], Backoff], providers: "Providers") -> None:
        self.engine, self.publisher, self.command_policy = engine, publisher, command_policy
        self.providers = providers

    # ---- commands ----------------------------------------------------------------
    def command(self, binding: "CommandBinding", fields: dict[str, Any], delivery: Delivery) -> Executed:
        """Run a command's handler once per idempotency key; its result (or the stored one)."""
        fields = dict(fields)
        key = fields.pop(IDEMPOTENCY_KEY, None)
        command = self._validate(binding, fields, {**fields, IDEMPOTENCY_KEY: key}, delivery)
        payload = command.payload()
        key = key or command.natural_key_value() or delivery.message_id
        try:
            executed, committed = self._command_once(binding, command, key, payload, delivery)
        except (DomainError, IdempotencyConflict):
            raise
        except Exception as exc:
            raise self._failure(binding, self.command_policy(), exc, {**payload, IDEMPOTENCY_KEY: key}, delivery)
        self._publish(committed)
        return executed

    def _command_once(self, binding, command: Command, key: str, payload: dict[str, Any],
                      delivery: Delivery) -> tuple[Executed, list[str]]:
        """Run the handler under the claim, or get the stored outcome; and the outbox ids to publish now."""
        name, digest = binding.name, command.payload_hash(received=True)  # validated from the message body
        with self._unit() as uow:
            for _ in range(CLAIM_ATTEMPTS):
                if idempotency.claim(uow.session, name, key, digest, payload, delivery.message_id):
                    return self._run_claimed(binding, command, key, delivery, uow)
                outcome = idempotency.previous(uow.session, name, key)
                if outcome is not None:
                    return self._duplicate(binding, outcome, key, digest, payload, delivery, uow)
                logger.info("%s key %r was purged after its claim found it; claiming it again", name, key)
        raise RuntimeError(
            f"{name} key {key!r} was found claimed and then purged {CLAIM_ATTEMPTS} times in a row: keys are "
            f"purged faster than this command is resent. Keep keys longer (BUS_KEY_RETENTION, "
            f"bus purge-keys --older-than) than clients may resend a command.")

    def _run_claimed(self, binding, command: Command, key: str, delivery: Delivery,
                     uow: UnitOfWork) -> tuple[Executed, list[str]]:
        """Run the handler of a claimed key and store its outcome in the claim's transaction."""
        name, context = binding.name, delivery.context(key)
        sink = self.providers.sink(uow, binding.boundary, f"{name}:{key}", context)
        undo = uow.savepoint()
        try:
            arguments = self.providers.dependencies(binding, uow, sink, context)
            result = to_jsonable_python(binding.handler(command, **arguments))
        except DomainError as exc:
            # The handler's writes are undone, the claim is kept: a duplicate waiting on its
            # row gets this refusal; after a rollback it would claim the key and run again.
            undo()
            uow.write(idempotency.finished(name, key, error_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
                                           error_message=str(exc)),
                      execution_log.refused(uow.dialect, binding, delivery, exc))
            uow.commit()
            raise
        uow.write(idempotency.finished(name, key, result=result), execution_log.succeeded(uow.dialect, binding, delivery))
        uow.commit()
        return Executed(result, ran=True, stored_under=delivery.message_id), sink.written

    def _duplicate(self, binding, outcome: idempotency.Outcome, key: str, digest: str, payload: dict[str, Any],
                   delivery: Delivery, uow: UnitOfWork) -> tuple[Executed, list[str]]:
        """The stored outcome of a key claimed before; and what its execution left unpublished."""
        name, left = binding.name, []
        if outcome.payload_hash == digest:
            idempotency.absorbed(uow.session, name, key)
            metrics.absorbed(name)
            logger.info("%s key %r already handled: duplicate absorbed", name, key)
            if outcome.status == "succeeded":
                left = redispatch.left_unpublished(uow.session, outcome.message_id, name, delivery.started_at)
        uow.commit()
        if left:
            logger.warning("%s key %r: its execution %s left %d outbox row(s) unpublished; publishing them now",
                           name, key, outcome.message_id, len(left))
        value = self._replay(binding, outcome, key, digest, payload, delivery)
        return Executed(value, ran=False, stored_under=outcome.message_id), left

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
        self._publish(published)
        return Executed(None, ran)

    def _subscriber_once(self, binding, event, event_id: str, delivery: Delivery) -> tuple[bool, list[str]]:
        """(True, outbox ids written) if the handler ran; (False, what its earlier run left unpublished) if not."""
        with self._unit() as uow:
            if not inbox.claim(uow.session, event_id, binding.name):
                left = redispatch.left_unpublished(uow.session, delivery.message_id, binding.name, delivery.started_at)
                uow.commit()
                logger.info("%s already handled event %s: duplicate absorbed", binding.name, event_id)
                metrics.absorbed(binding.name)
                if left:
                    logger.warning("%s: its run of event %s left %d outbox row(s) unpublished; publishing them now",
                                   binding.name, event_id, len(left))
                return False, left
            context = delivery.context(f"{binding.name}:{event_id}")
            sink = self.providers.sink(uow, binding.boundary, f"{binding.name}:{event_id}", context)
            binding.handler(event, **self.providers.dependencies(binding, uow, sink, context))
            uow.write(execution_log.succeeded(uow.dialect, binding, delivery, event_id=event_id))
            uow.commit()
            return True, sink.written

    # ---- shared ------------------------------------------------------------------
    def _unit(self) -> UnitOfWork:
        """The delivery's unit of work: a transaction of its own, or its savepoint in the batch running it."""
        batch = batches.current()
        return batch.unit() if batch is not None else UnitOfWork(self.engine())

    def _writes(self) -> Any:
        """Where a failure's log and dead letter are written: the engine, or the running batch's transaction."""
        batch = batches.current()
        return batch.writer() if batch is not None else self.engine()

    def _publish(self, ids: list[str]) -> None:
        """Hand outbox rows to the publisher: now, or once the running batch committed."""
        batch = batches.current()
        if batch is None:
            self.publisher().publish(ids)
        elif ids:
            batch.after_commit(lambda: self.publisher().publish(ids))

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
        """What to raise: RetryLater if the policy retries `exc` (or it lost a write race), else `exc`, dead-lettered."""
        retry = policy.should_retry(exc, delivery.attempt) or (
            lost_a_write_race(exc, delivery.attempt) and not isinstance(exc, policy.give_up_on))
        execution_log.failed(self._writes(), binding, delivery, exc, state="retrying" if retry else "dead-lettered",
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
            self._writes(), reason=reason, message_id=delivery.message_id, task=binding.name,
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
