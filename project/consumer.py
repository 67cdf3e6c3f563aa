"""The worker's consumer: messages Celery would log and drop are dead-lettered first.

Undecodable bodies, refused content types (pickle), unknown task names and malformed
task messages are stored with the original headers and body, then acked; the worker
keeps running.
"""
from __future__ import annotations

import logging
import traceback
from typing import Any

from celery.worker.consumer import Consumer
from kombu.exceptions import ContentDisallowed

from project import deadletters
from project.db import engine_for
from project.settings import load

logger = logging.getLogger(__name__)


class BusConsumer(Consumer):
    """Celery's consumer, with a dead-letter record before every drop."""

    def _keep(self, message: Any, reason: str, exc: BaseException | None) -> None:
        headers = dict(message.headers or {})
        try:
            deadletters.record(
                engine_for(load().database_url), reason=reason,
                message_id=headers.get("id") or message.properties.get("correlation_id"),
                task=headers.get("task"), queue=_queue_of(message),
                error=f"{type(exc).__name__}: {exc}" if exc else "message is not a Celery task message",
                traceback="".join(traceback.format_exception(exc)) if exc else None,
                headers=headers, body=message.body, content_type=message.content_type,
                content_encoding=message.content_encoding,
            )
        except Exception:  # the record failed: leave the message to Celery's default handling
            logger.exception("could not dead-letter message %r", headers.get("id"))
            raise

    def on_decode_error(self, message, exc):
        self._keep(message, _reason(exc), exc)
        super().on_decode_error(message, exc)

    def on_unknown_message(self, body, message):
        self._keep(message, "undecodable", None)
        super().on_unknown_message(body, message)

    def on_unknown_task(self, body, message, exc):
        self._keep(message, "unknown-task", exc)
        super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body, message, exc):
        self._keep(message, _reason(exc), exc)
        super().on_invalid_task(body, message, exc)


def _reason(exc: BaseException) -> str:
    """A refused serializer (pickle) is told apart from a body that cannot be decoded."""
    return "refused-content-type" if isinstance(exc, ContentDisallowed) else "undecodable"


def _queue_of(message: Any) -> str | None:
    """The queue a message came from (the routing key of a fanout copy names the event)."""
    info = message.delivery_info or {}
    return info.get("queue") or info.get("routing_key")
