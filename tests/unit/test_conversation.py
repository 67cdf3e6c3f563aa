"""The conversation headers a message gets when it is published (before_task_publish)."""
from __future__ import annotations

from celery import Celery

from project.headers import CAUSATION_HEADER, CORRELATION_HEADER
from project.transport.conversation import stamp


def test_a_message_sent_from_outside_a_task_starts_its_own_conversation():
    # Given the headers of a message sent by an application (no current task)
    headers = {"id": "m-1", "task": "orders.place_order"}
    # When it is published
    stamp(headers=headers)
    # Then its own id is the conversation, and nothing caused it
    assert headers[CORRELATION_HEADER] == "m-1" and headers[CAUSATION_HEADER] is None


def test_a_message_sent_from_inside_a_task_joins_the_conversation():
    # Given a task running in conversation c-1, and a message it sends
    app = Celery("conversation-test", set_as_current=False)
    seen = {}

    @app.task(bind=True, shared=False)
    def parent(self):
        headers = {"id": "m-2"}
        stamp(headers=headers)
        seen.update(headers)

    # When the task runs (in this process, with the conversation header on its request)
    parent.apply(headers={CORRELATION_HEADER: "c-1"}, task_id="t-1")
    # Then the message belongs to c-1 and was caused by the task's message
    assert seen[CORRELATION_HEADER] == "c-1" and seen[CAUSATION_HEADER] == "t-1"


def test_headers_set_by_the_outbox_are_kept():
    headers = {"id": "e-1", CORRELATION_HEADER: "c-9", CAUSATION_HEADER: "t-9"}
    stamp(headers=headers)
    assert headers[CORRELATION_HEADER] == "c-9" and headers[CAUSATION_HEADER] == "t-9"
