"""What every bus task shares on the worker: validation, retry policy, dead letters.

A message that does not fit its contract is dead-lettered and never run or retried.
A failure is retried when the task's policy says so (its own queue only), and
dead-lettered with the traceback when the policy gives up.
"""
from __future__ import annotations

import json
import logging
import traceback
from typing import TYPE_CHECKING, Any

from celery import Task
from pydantic import BaseModel, ValidationError

from project import deadletters
from project.contracts import MessageContext
from project.errors import InvalidMessage
from project.headers import CORRELATION_HEADER
from project.retry import Backoff

if TYPE_CHECKING:
    from project.core import Bus

logger = logging.getLogger(__name__)


class BusTask(Task):
    """Base of command and subscriber tasks; `bus` and `binding` are set per task."""

    bus: "Bus"
    binding: Any
    typing = False  # the contract validates the fields, not the function signature

    @property
    def policy(self) -> Backoff:
        raise NotImplementedError

    def retry_options(self) -> dict[str, Any]:
        """Where a retry is published (default: where the message came from)."""
        return {}

    def validate(self, fields: dict[str, Any], body: dict[str, Any]) -> BaseModel:
        """The contract instance, or dead-letter `body` and raise InvalidMessage."""
        contract = self.binding.contract
        try:
            return contract.model_validate(fields)
        except ValidationError as exc:
            errors = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(message)'}: {e['msg']}" for e in exc.errors())
            self.dead_letter("invalid", errors, body)
            raise InvalidMessage(
                f"{self.name} message {self.request.id} does not fit {contract.__name__}: {errors}. "
                f"It was dead-lettered and not executed; fix the sender and send it again."
            ) from None

    def context(self, key: str) -> MessageContext:
        """Who handles what: the conversation is the sender's, or starts with this message."""
        request = self.request
        return MessageContext(message_id=request.id, handler=self.name, idempotency_key=key,
                              attempt=request.retries,
                              correlation_id=request.get(CORRELATION_HEADER) or request.id)

    def retry_or_dead_letter(self, exc: Exception, body: dict[str, Any]) -> Any:
        """Retry per the policy (raises Retry), or dead-letter and re-raise `exc`."""
        retries = self.request.retries
        if self.policy.should_retry(exc, retries):
            logger.warning("%s attempt %d failed (%r); retrying", self.name, retries + 1, exc)
            raise self.retry(exc=exc, countdown=self.policy.delay(retries),
                             max_retries=self.policy.max_retries, **self.retry_options())
        self.dead_letter("retries-exhausted", f"{type(exc).__name__}: {exc} (after {retries + 1} attempt(s))",
                         body, tb="".join(traceback.format_exception(exc)))
        raise exc

    def dead_letter(self, reason: str, error: str, body: dict[str, Any], tb: str | None = None) -> None:
        request = self.request
        deadletters.record(
            self.bus.engine(), reason=reason, message_id=request.id, task=self.name,
            queue=self.name, boundary=self.binding.boundary, error=error, traceback=tb,
            headers={"task": self.name, "id": request.id, "retries": request.retries},
            body=json.dumps(body, default=str, sort_keys=True).encode(), content_type="application/json",
            content_encoding="utf-8", correlation_id=request.get(CORRELATION_HEADER) or request.id,
        )
