"""Messages that can never succeed are refused, kept as dead letters, never retried.

The senders here are foreign (clients/foreign_sender.py: Celery and kombu only, none
of our code), since our own API refuses bad input before publishing. After each bad
message the shared worker must still be running and handle a valid command.
"""
from __future__ import annotations

import json

import pytest

from tests.integration.support.helpers import ITEMS_TOTAL, PLACE_ORDER, order
from tests.integration.support.scenarios import RemoteError, Scenario

pytestmark = pytest.mark.integration


def dead_letter(cluster: Scenario, message_id: str):
    """The one dead letter of `message_id` (waits for it: the worker records it asynchronously)."""
    rows = cluster.wait_for(f"a dead letter of {message_id}", lambda: cluster.rows(
        "SELECT reason, error, attempts, task, body, content_type FROM bus_dead_letters WHERE message_id = :m",
        m=message_id))
    assert len(rows) == 1, rows
    return rows[0]


def assert_worker_still_serves(cluster: Scenario, uid: str) -> None:
    assert cluster.worker.process.poll() is None, cluster.worker.log()
    task_id = cluster.client.delay(PLACE_ORDER, **order(f"after-{uid}"))
    assert cluster.client.get(task_id) == {"order_id": f"after-{uid}", "total": ITEMS_TOTAL}


def test_invalid_payload_from_a_foreign_sender_is_dead_lettered_not_run_not_retried(cluster: Scenario, uid: str):
    # Given a foreign service that sends a PlaceOrder without customer_id and with items as a string
    [message_id] = cluster.foreign_send([{"kind": "task", "name": PLACE_ORDER, "queue": PLACE_ORDER,
                                          "kwargs": {"order_id": f"o-{uid}", "items": "none"}}])

    # When the worker receives it
    letter = dead_letter(cluster, message_id)

    # Then it is kept as a dead letter 'invalid' with the field errors and the original body,
    assert letter.reason == "invalid"
    assert "customer_id: Field required" in letter.error
    assert "items:" in letter.error
    assert json.loads(bytes(letter.body))["order_id"] == f"o-{uid}"
    # and the result says so, as InvalidMessage (Celery's own pydantic mode leaves an empty message)
    with pytest.raises(RemoteError) as refused:
        cluster.client.get(message_id)
    assert refused.value.type == "project.errors.InvalidMessage"
    assert "customer_id" in refused.value.message and "dead-lettered" in refused.value.message
    # and the handler did not run, and the worker keeps running
    assert_worker_still_serves(cluster, uid)
    assert cluster.rows("SELECT order_id FROM orders WHERE order_id = :o", o=f"o-{uid}") == []
    assert cluster.rows("SELECT key FROM bus_commands WHERE key = :k", k=f"order_id=o-{uid}") == []
    # and it was not retried: still one attempt, and the worker logged no retry for it
    assert dead_letter(cluster, message_id).attempts == 1
    assert f"{message_id}] retry" not in cluster.worker.logfile.read_text().lower()


@pytest.mark.parametrize("message, reason, error", [
    ({"kind": "pickle", "task": PLACE_ORDER, "queue": PLACE_ORDER, "body": {"order_id": "o-p"}},
     "refused-content-type", "ContentDisallowed"),
    ({"kind": "task", "name": "orders.no_such_command", "queue": PLACE_ORDER, "kwargs": {"order_id": "o-u"}},
     "unknown-task", "orders.no_such_command"),
    ({"kind": "raw", "task": PLACE_ORDER, "queue": PLACE_ORDER, "body": '{"order_id": "o-x", ',
      "content_type": "application/json"},
     "undecodable", "DecodeError"),
], ids=["pickle", "unknown-task", "broken-json"])
def test_unprocessable_message_is_dead_lettered_and_the_worker_keeps_running(
        cluster: Scenario, uid: str, message: dict, reason: str, error: str):
    # Given a foreign sender's message the worker can never run
    [message_id] = cluster.foreign_send([message])

    # When the worker receives it
    letter = dead_letter(cluster, message_id)

    # Then it is kept with the reason and the error, byte for byte as received
    assert letter.reason == reason
    assert error in letter.error
    assert letter.body, "the original body is kept"
    # and the worker keeps serving commands
    assert_worker_still_serves(cluster, uid)
