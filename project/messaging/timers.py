"""Durable timers: a command delayed longer than BUS_TIMER_THRESHOLD waits in the database, not in a worker.

Celery keeps a message sent with `countdown`/`eta` unacknowledged in a worker until it is
due. On Redis, past the visibility timeout the broker hands it to another worker as well
(it runs twice), and every waiting message takes worker memory. So a command sent from
outside a handler (`apply_async`/`delay` of its task, `bus.send`) with a delay longer than
the threshold is written to the outbox as a timer (project/store/timers.py) instead: a
row with a due time, in its own short transaction, whose id is the task id the send
would have had (derived from the idempotency key), so the AsyncResult is the same and
the same key sent twice is one timer. Shorter delays keep Celery's own ETA.

The outbox publishes a timer no earlier than `lookahead` before it is due, with Celery's
eta set to its due time (project/messaging/outbox.py): a worker then holds it at most
that long. The lookahead is the threshold itself: Celery never holds a bus message longer
than a direct short delay may make it, and the threshold is kept below the visibility
timeout when the configuration loads: unset, it is 60 s or half the visibility timeout,
whichever is less (`default_threshold`), and a value set is checked (`check_threshold`).
With the relay ticking every 10 s and the threshold at 60 s, a timer is handed over
several ticks before it is due and runs on time, through a failed tick or a change of
relay lease holder; a relay interval longer than the threshold makes timers late by the
difference.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Mapping

from sqlalchemy.engine import Engine

from project.errors import ConfigurationError
from project.headers import CAUSATION_HEADER, CORRELATION_HEADER
from project.store import timers
from project.store.tables import utcnow
from project.transport.conversation import stamp

#: BUS_TIMER_THRESHOLD's default, in seconds (with a visibility timeout of 120 s or more)
THRESHOLD = 60
#: options a timer may be sent with: the delay, the command's own route (check_route checked it), what
#: the bus sets itself, and the publish retry (nothing is published now). Any other would be lost.
KEPT_OPTIONS = frozenset({"countdown", "eta", "queue", "exchange", "routing_key", "argsrepr", "kwargsrepr",
                          "retry", "retry_policy"})


def threshold(conf: Mapping[str, Any]) -> float:
    """Seconds of delay past which a command waits in the outbox (BUS_TIMER_THRESHOLD)."""
    return float(conf.get("bus_timer_threshold", THRESHOLD))


def lookahead(conf: Mapping[str, Any]) -> timedelta:
    """How long before its due time a command timer is handed to the broker (with eta): the threshold."""
    return timedelta(seconds=threshold(conf))


def seconds_of(delay: timedelta | float) -> float:
    """A delay given as a timedelta or seconds, in seconds (0 or more)."""
    if isinstance(delay, bool) or not isinstance(delay, (timedelta, int, float)):
        raise TypeError(f"a delay is a timedelta or seconds, got {delay!r}: e.g. timedelta(minutes=5) or 300")
    seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
    if seconds < 0:
        raise ValueError(f"a delay of {delay!r} is negative; give 0 or more (0: at once)")
    return seconds


def default_threshold(visibility_timeout: int) -> int:
    """BUS_TIMER_THRESHOLD unset: 60 s, or half the visibility timeout if that is less (room for the handler's run)."""
    return min(THRESHOLD, visibility_timeout // 2)


def check_threshold(threshold_seconds: int, visibility_timeout: int) -> None:
    """Refuse a threshold that lets a worker hold a delayed message past the broker's visibility timeout."""
    if threshold_seconds >= visibility_timeout:
        raise ConfigurationError(
            f"BUS_TIMER_THRESHOLD={threshold_seconds} must be below BUS_VISIBILITY_TIMEOUT={visibility_timeout}: "
            f"a delay up to the threshold waits in a worker unacknowledged, and past the visibility timeout Redis "
            f"hands it to another worker (it runs twice). Lower BUS_TIMER_THRESHOLD below {visibility_timeout} "
            f"(or unset it: {default_threshold(visibility_timeout)} s here), or raise BUS_VISIBILITY_TIMEOUT above "
            f"{threshold_seconds}")


def defer(conf: Mapping[str, Any], engine: Callable[[], Engine], name: str, body: dict[str, Any], task_id: str,
          options: Mapping[str, Any]) -> bool:
    """Write the command `name` as a timer if `options` delay it past the threshold: True; else False (send it).

    A retry (Celery's `retries` option) is never a timer: it re-publishes the message a worker
    holds, and its wait is checked below the visibility timeout when the worker starts.
    """
    if "retries" in options:
        return False
    now = utcnow()
    due_at = _due_at(options, now)
    if due_at is None or (due_at - now).total_seconds() <= threshold(conf):
        return False
    lost = sorted(set(options) - KEPT_OPTIONS)
    if lost:
        raise ValueError(
            f"{name} is delayed {(due_at - now).total_seconds():g} s, past BUS_TIMER_THRESHOLD "
            f"({threshold(conf):g} s): it waits in the outbox as a durable timer, which keeps its fields and "
            f"route only, so {', '.join(lost)} would be lost. Send it without {', '.join(lost)}, or with a delay "
            f"of at most {threshold(conf):g} s")
    conversation = {"id": task_id}
    stamp(headers=conversation)  # the conversation the message would have joined if sent now
    timers.write(engine(), task_id, name, body, due_at, conversation[CORRELATION_HEADER],
                 conversation[CAUSATION_HEADER])
    return True


def _due_at(options: Mapping[str, Any], now: datetime) -> datetime | None:
    """When a send with these options is due, as Celery reads them (a countdown wins over an eta); None: now."""
    countdown, eta = options.get("countdown"), options.get("eta")
    if countdown:
        return now + timedelta(seconds=float(countdown))
    if isinstance(eta, str):
        eta = datetime.fromisoformat(eta)
    if isinstance(eta, datetime):
        return eta.astimezone(timezone.utc) if eta.tzinfo else eta.replace(tzinfo=timezone.utc)
    return None
