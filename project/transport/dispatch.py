"""Queue-aware dispatch: a subscriber queue runs its own task, whatever the message says.

Every copy of a fanned-out event carries the same ``task`` header (the event's name,
or the first subscriber's) and the same task ``id``. Celery picks the task from that
header only. The worker consumer built here looks up, for each delivery, the queue it
came from and, when that queue is in the ``queue_tasks`` mapping and the header names
another task:

- sets ``headers['task']`` to the queue's task;
- unless ``copy_ids=False``, sets ``headers['id']`` to :func:`copy_task_id` (event id,
  queue): otherwise all subscribers share one task id (one result, one ``revoke``, one
  entry in the worker's request table). It is deterministic, so a redelivered copy
  keeps its id; the event's id stays available as ``request.root_id`` (Celery sets
  ``root_id`` to the task id of a top-level publish).

Every message whose queue is known also gets ``delivery_info['queue']`` (set already by
:mod:`project.transport.redis_transport` on Redis copies), for consumer-level code such as
dead-lettering: ``routing_key`` is the publisher's, not the queue, on a fanout.

The queue is found from ``delivery_info['consumer_tag']`` and the task consumer's own
queue -> tag table: RabbitMQ (py-amqp) reports the tag of every delivery, and
:mod:`project.transport.redis_transport` adds it on Redis. Messages of queues not in the mapping,
and messages without a consumer tag, pass unchanged.

Wiring: ``install(app, {'billing.charge_payment': 'billing.charge_payment', ...})`` in
the app module sets the ``worker_consumer`` setting to a subclass of the consumer
configured there (Celery's by default). Call it after the app's configuration is set.

Retries: ``Task.retry()`` re-publishes with the delivery's exchange and routing key:
a fanned-out copy's retry reaches every subscriber again (or, if the event was
published with an empty routing key, ends in the default queue ``celery``). A retried
message came through the default exchange, and Celery's default for that is
``queue=<routing key>``, i.e. that queue's own exchange: the fanout again. So every
bus task passes ``**own_queue(queue)`` to its ``retry()`` (``BusTask.retry_options``;
a command on quorum queues needs it too, see :func:`own_queue`).
"""
from __future__ import annotations

import logging
import uuid
from typing import Any, Mapping

from celery.worker.consumer import Consumer
from kombu.utils.imports import symbol_by_name
from vine import promise

logger = logging.getLogger(__name__)

#: namespace of the task ids of subscriber copies (never change it once released)
COPY_ID_NAMESPACE = uuid.UUID('0f6c2f4e-3b8a-4d55-8f57-6d1d2a9c7e31')


def copy_task_id(task_id: str, queue: str) -> str:
    """The task id of the copy of task `task_id` delivered to `queue`."""
    return str(uuid.uuid5(COPY_ID_NAMESPACE, f'{task_id}/{queue}'))


def own_queue(queue: str) -> dict[str, str]:
    """Publishing options that reach `queue` only, through the default exchange.

    Neither half is enough alone: ``queue=`` alone publishes to the queue's own
    exchange (the fanout); ``exchange=''`` alone is turned by Celery's
    ``send_task_message`` into a message for the default queue ``celery``, unless a
    router supplies ``queue`` (the bus's ``route_by_name`` does).
    """
    return {'queue': queue, 'exchange': '', 'routing_key': queue}


def queue_dispatch_consumer(queue_tasks: Mapping[str, str], base: type[Consumer] = Consumer,
                            copy_ids: bool = True) -> type[Consumer]:
    """A `base` subclass that runs, for a message of queue Q, the task ``queue_tasks[Q]``."""
    routes = dict(queue_tasks)

    class QueueDispatchConsumer(base):
        queue_tasks = routes

        def create_task_handler(self, promise=promise):
            handle = super().create_task_handler(promise)
            tag_queues: dict[str, str] = {}

            def queue_of(message: Any) -> str | None:
                tag = (message.delivery_info or {}).get('consumer_tag')
                if tag is None:
                    return None
                # kombu's queue -> tag table; tags change on reconnect and add_consumer,
                # so the reverse table is checked against it and rebuilt on a miss.
                active = self.task_consumer._active_tags
                queue = tag_queues.get(tag)
                if queue is None or active.get(queue) != tag:
                    tag_queues.clear()
                    tag_queues.update((t, q) for q, t in active.items())
                    queue = tag_queues.get(tag)
                return queue

            def on_task_received(message: Any) -> Any:
                queue = queue_of(message)
                if queue is None:
                    return handle(message)
                message.delivery_info.setdefault('queue', queue)
                headers, task = message.headers, routes.get(queue)
                if task is not None and headers and headers.get('task', task) != task:
                    logger.debug('message %s of %s in %s: running %s',
                                 headers.get('id'), headers['task'], queue, task)
                    headers['task'] = task
                    if copy_ids and headers.get('id'):
                        headers['id'] = copy_task_id(headers['id'], queue)
                return handle(message)

            return on_task_received

    QueueDispatchConsumer.__qualname__ = QueueDispatchConsumer.__name__ = (
        f'QueueDispatch{base.__name__}')
    return QueueDispatchConsumer


def install(app: Any, queue_tasks: Mapping[str, str], copy_ids: bool = True) -> type[Consumer]:
    """Make `app`'s workers dispatch by queue, on top of its ``worker_consumer``."""
    base = symbol_by_name(app.conf.worker_consumer or Consumer)
    consumer = queue_dispatch_consumer(queue_tasks, base, copy_ids)
    app.conf.worker_consumer = consumer
    return consumer
