"""Every message carries its conversation: `bus_correlation_id` and `bus_causation_id` headers.

Celery overwrites a header named `correlation_id` and does not pass custom headers on to
messages sent from inside a task, so a `before_task_publish` handler fills ours in:
sent from inside a bus task, a message joins that task's conversation and names it as
its cause; sent from outside, it starts a conversation of its own (its id). Messages
published by the outbox carry the headers already and are left as they are.
"""
from __future__ import annotations

from typing import Any

from celery import current_task

from project.headers import CAUSATION_HEADER, CORRELATION_HEADER, header


def stamp(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """`before_task_publish` receiver: add the conversation headers when they are missing."""
    if headers is None or headers.get(CORRELATION_HEADER):
        return
    parent = current_task.request if current_task else None
    if parent is not None and parent.id:
        headers[CORRELATION_HEADER] = header(parent, CORRELATION_HEADER) or parent.id
        headers[CAUSATION_HEADER] = parent.id
    else:
        headers[CORRELATION_HEADER] = headers.get("id")
        headers[CAUSATION_HEADER] = None
