"""The worker's consumer: messages Celery would log and drop are dead-lettered first.

Undecodable bodies, refused content types (pickle), unknown task names, malformed task
messages and bodies over `bus_max_message_bytes` are stored with the original headers
and body, then acked (not rejected: on RabbitMQ a reject would dead-letter the message
a second time through the queue's dead-letter exchange); the worker keeps running.
"""
from __future__ import annotations

import logging
import traceback
from typing import Any

from celery.worker.consumer import Consumer
from kombu.exceptions import ContentDisallowed
from vine import promise

from project.dead_letters import store as deadletters
from project.errors import ConfigurationError
from project.settings import load
from project.store.engine import engine_for
from project.transport.redis_transport import NOT_A_MESSAGE

logger = logging.getLogger(__name__)
#: seconds before a failed dead-letter record is tried again (doubling up to the cap)
RECORD_RETRY_FIRST, RECORD_RETRY_CAP = 1.0, 60.0


class BusConsumer(Consumer):
    """Celery's consumer, with a dead-letter record before every drop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cap = int(self.app.conf.get("bus_batch_max") or 0)
        if cap > 1:  # batched execution
            self.on_task_request = self._batcher(cap)

    def _batcher(self, cap: int) -> Any:
        """The Batcher in front of `on_task_request`; where this worker cannot batch, the default falls back."""
        from project.transport.batching import Batcher
        try:
            return Batcher(self, cap)
        except ConfigurationError as exc:
            if not self.app.conf.get("bus_batch_default"):
                raise  # BUS_BATCH_MAX was set: the operator asked for batches this worker cannot run
            logger.info("batched execution off (BUS_BATCH_MAX unset): %s", exc)
            self._unbatched_prefetch()
            return self.on_task_request

    def _unbatched_prefetch(self) -> None:
        """Reserve what an unbatched worker reserves (BUS_PREFETCH), not two batches per process."""
        conf = self.app.conf
        base = int(conf.get("bus_prefetch") or 1)
        if self.prefetch_multiplier != conf.worker_prefetch_multiplier:
            return  # set on the command line (--prefetch-multiplier): the operator's, kept
        if self.initial_prefetch_count:
            self.initial_prefetch_count = self.initial_prefetch_count // self.prefetch_multiplier * base
        self.prefetch_multiplier = conf.worker_prefetch_multiplier = base

    def on_close(self) -> None:
        batcher = self.on_task_request if hasattr(self.on_task_request, "drop_waiting") else None
        if batcher is not None:
            batcher.drop_waiting()  # its requests of the closed channel
        super().on_close()  # flushes the pool, which discards the jobs no process accepted
        cache = getattr(getattr(self.pool, "_pool", None), "_cache", None)
        if batcher is not None and cache is not None:
            batcher.forget_discarded(cache)

    def create_task_handler(self, promise=promise):
        handle = super().create_task_handler(promise)
        limit = int(self.app.conf.get("bus_max_message_bytes") or 0)

        def on_task_received(message: Any) -> Any:
            size = len(message.body or b"")
            if limit and size > limit:
                self._keep(message, "too-large", None,
                           error=f"body of {size} bytes is over bus_max_message_bytes={limit}")
                logger.error("message %r of %d bytes is over the %d-byte limit: dead-lettered",
                             (message.headers or {}).get("id"), size, limit)
                return None
            return handle(message)

        return on_task_received

    def _keep(self, message: Any, reason: str, exc: BaseException | None, error: str | None = None) -> Any:
        """Record `message` as a dead letter and ack it; a stand-in on which Celery's ack/reject are no-ops.

        If the store cannot be written (database down), the message stays unacked and the
        record is tried again with backoff on the worker's timer: the worker keeps running
        and the message is never acked without its record (a lost connection redelivers it).
        """
        try:
            self._record(message, reason, exc, error)
        except Exception:
            logger.exception("could not dead-letter message %r; it stays unacked, retrying in %ss",
                             (message.headers or {}).get("id"), RECORD_RETRY_FIRST)
            self._keep_later(message, reason, exc, error, RECORD_RETRY_FIRST)
        else:
            message.ack()
        return _Settled(message)

    def _keep_later(self, message: Any, reason: str, exc: BaseException | None, error: str | None,
                    delay: float) -> None:
        def attempt() -> None:
            try:
                self._record(message, reason, exc, error)
            except Exception as failure:  # noqa: BLE001 - still down: later again
                logger.warning("could not dead-letter message %r (%r); retrying in %ss",
                               (message.headers or {}).get("id"), failure, min(delay * 2, RECORD_RETRY_CAP))
                self._keep_later(message, reason, exc, error, min(delay * 2, RECORD_RETRY_CAP))
                return
            try:
                message.ack()
            except Exception:  # noqa: BLE001 - the channel changed: redelivered, recorded as another attempt
                logger.warning("dead-lettered message %r but could not ack it; it will be redelivered",
                               (message.headers or {}).get("id"), exc_info=True)

        self.timer.call_after(delay, attempt)

    def _record(self, message: Any, reason: str, exc: BaseException | None, error: str | None) -> None:
        headers = dict(message.headers or {})
        deadletters.record(
            engine_for(load().database_url), reason=reason,
            message_id=headers.get("id") or message.properties.get("correlation_id"),
            task=headers.get("task"), queue=_queue_of(message, self),
            error=error or (f"{type(exc).__name__}: {exc}" if exc else "message is not a Celery task message"),
            traceback="".join(traceback.format_exception(exc)) if exc else None,
            headers=headers, body=message.body, content_type=message.content_type,
            content_encoding=message.content_encoding,
        )

    def on_decode_error(self, message, exc):
        if message.content_type == NOT_A_MESSAGE:
            kept = self._keep(message, "undecodable", None,
                              error="the Redis list item is not a kombu message (not JSON with kombu's "
                                    "properties); its bytes are the body")
        else:
            kept = self._keep(message, _reason(exc), exc)
        super().on_decode_error(kept, exc)

    def on_unknown_message(self, body, message):
        super().on_unknown_message(body, self._keep(message, "undecodable", None))

    def on_unknown_task(self, body, message, exc):
        super().on_unknown_task(body, self._keep(message, "unknown-task", exc), exc)

    def on_invalid_task(self, body, message, exc):
        super().on_invalid_task(body, self._keep(message, _reason(exc), exc), exc)


class _Settled:
    """A message already recorded and acked: Celery's own ack/reject after logging do nothing."""

    def __init__(self, message: Any) -> None:
        self._message = message

    def __getattr__(self, name: str) -> Any:
        return getattr(self._message, name)

    def ack(self, *args: Any, **kwargs: Any) -> None:
        pass

    reject = ack_log_error = reject_log_error = requeue = ack


def _reason(exc: BaseException) -> str:
    """A refused serializer (pickle) is told apart from a body that cannot be decoded."""
    return "refused-content-type" if isinstance(exc, ContentDisallowed) else "undecodable"


def _queue_of(message: Any, consumer: Any = None) -> str | None:
    """The queue a message came from (the routing key of a fanout copy names the event).

    Messages refused before the queue dispatch saw them have no `queue` yet: the
    consumer tag of the delivery names it (AMQP reports it; project.transport.redis_transport adds it).
    """
    info = message.delivery_info or {}
    tag = info.get("consumer_tag")
    active = getattr(getattr(consumer, "task_consumer", None), "_active_tags", None) or {}
    by_tag = next((queue for queue, t in active.items() if t == tag), None) if tag is not None else None
    return info.get("queue") or by_tag or info.get("routing_key")
