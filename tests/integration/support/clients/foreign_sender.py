"""A sender from another service: it has Celery and kombu, and nothing of ours.

    python foreign_sender.py <broker url>  < messages.json   ->  ids.json

Each message is one of:
- {"kind": "task", "name": ..., "kwargs": {...}, "queue": ...}: a bare `Celery()` app's
  `send_task` (no contracts, no bus, only the broker URL);
- {"kind": "pickle", "task": ..., "queue": ..., "body": {...}}: a task message
  serialized with pickle, as an old or hostile sender would send it;
- {"kind": "raw", "task": ..., "queue": ..., "body": "<text>", "content_type": ...}:
  bytes that claim a content type (e.g. broken JSON).
It prints the message ids (the `id` header: what the worker and the dead letters know).
"""
from __future__ import annotations

import json
import os
import sys
import uuid

from celery import Celery
from kombu import Connection


def main() -> None:
    broker_url = sys.argv[1]
    messages = json.load(sys.stdin)
    app = Celery("foreign-service", broker=broker_url)
    # On quorum queues a plain sender leaves the declaring to the bus (docs/deployment.md):
    # its own declaration would lack the queues' arguments and RabbitMQ would refuse it.
    options = {"declare": []} if os.environ.get("BUS_RABBITMQ_QUEUE_TYPE") == "quorum" else {}
    ids = []
    with Connection(broker_url) as conn:
        producer = conn.Producer()
        for message in messages:
            if message["kind"] == "task":
                ids.append(app.send_task(message["name"], kwargs=message["kwargs"], queue=message["queue"],
                                         **options).id)
                continue
            message_id = str(uuid.uuid4())
            headers = {"task": message["task"], "id": message_id, "lang": "py", "root_id": message_id}
            if message["kind"] == "pickle":
                producer.publish(message["body"], serializer="pickle", exchange="",
                                 routing_key=message["queue"], headers=headers)
            else:
                producer.publish(message["body"].encode(), content_type=message["content_type"],
                                 content_encoding="utf-8", exchange="", routing_key=message["queue"],
                                 headers=headers)
            ids.append(message_id)
    app.close()
    assert not any(name == "project" or name.startswith(("project.", "handlers", "tasks.")) for name in sys.modules), \
        "the foreign sender must not import the bus"
    json.dump(ids, sys.stdout)


if __name__ == "__main__":
    main()
