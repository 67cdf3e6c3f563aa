"""Durable fan-out for kombu's Redis transport.

kombu publishes to a Redis fanout exchange with PUBLISH: a subscriber queue whose
consumer is down at that moment never sees the message. This transport changes that
for the bus's event exchanges only, i.e. for every exchange for which
:func:`is_durable_fanout` is true (declared ``fanout``, ``durable`` and named
``events.*``):

- publishing reads the exchange's bindings from kombu's own binding table in Redis
  (``_kombu.binding.<exchange>``, written by whoever declared and bound the queue, even
  a worker that is stopped now) and LPUSHes one copy into every bound queue in a single
  MULTI/EXEC: all copies or none. That is two round trips (SMEMBERS, then the MULTI).
- each copy has its own delivery tag (a shared tag breaks ack/restore, celery#4091)
  and ``delivery_info['queue']`` naming the queue it was pushed into; ``exchange`` and
  ``routing_key`` stay the publisher's, as on RabbitMQ, so Celery (e.g. ``retry()``)
  acts the same on both brokers;
- a copy that is restored (unacked at shutdown or past ``visibility_timeout``) goes
  back into its own queue only, not through the exchange into every bound queue;
- queues bound to such an exchange are consumed with BRPOP like any list queue,
  not with SUBSCRIBE.

Every consumed message (any exchange) also gets ``delivery_info['consumer_tag']``,
as AMQP's basic.deliver has: it lets the worker tell which queue a message came from.
Every other exchange keeps kombu's behaviour, e.g. Celery's ``*.pidbox`` broadcast
and ``celeryev`` stay PUB/SUB.

kombu keeps exchange declarations per connection, in memory. An ``events.*`` exchange
that the publishing connection has not declared is therefore declared on first publish
as a durable fanout (the bus's naming rule, as in ``project.topology``); kombu would
otherwise route it as a direct exchange, i.e. drop the message unless its routing key
is a bound queue's. Celery's ``Task.retry()`` publishes through such a connection.

Selecting it, keeping the ``redis://`` / ``redis+socket://`` broker URL: call
:func:`install` before the first broker connection (at import of the Celery app
module). It points kombu's ``redis`` and ``rediss`` transport aliases at
:class:`Transport`, for the whole process. Celery's ``broker_transport`` setting is
not enough: kombu honours it for ``redis://host:port/db`` but, for a ``redis+socket://``
URL, takes the part before ``+`` as the transport name and silently drops the setting;
``Connection.switch()`` (failover) re-derives the transport from the URL scheme too.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

from kombu import transport as kombu_transport
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

logger = logging.getLogger(__name__)

EVENT_EXCHANGE_PREFIX = 'events.'
#: ``delivery_info`` key naming the queue a copy was pushed into.
QUEUE_KEY = 'queue'
TRANSPORT = f'{__name__}:Transport'


def is_durable_fanout(exchange: str, declaration: Mapping[str, Any] | None) -> bool:
    """Whether messages to `exchange` are pushed into every bound queue."""
    return bool(
        declaration
        and exchange.startswith(EVENT_EXCHANGE_PREFIX)
        and declaration.get('type') == 'fanout'
        and declaration.get('durable')
    )


class Channel(kombu_redis.Channel):
    """Redis channel with durable fan-out for the exchanges of :func:`is_durable_fanout`."""

    def _is_durable_fanout(self, exchange: str) -> bool:
        return is_durable_fanout(exchange, self.state.exchanges.get(exchange))

    def basic_publish(self, message, exchange, routing_key, **kwargs):
        if (exchange and exchange.startswith(EVENT_EXCHANGE_PREFIX)
                and exchange not in self.state.exchanges):
            self.exchange_declare(exchange, type='fanout', durable=True)
        return super().basic_publish(message, exchange, routing_key, **kwargs)

    def _queue_bind(self, exchange, routing_key, pattern, queue):
        super()._queue_bind(exchange, routing_key, pattern, queue)
        if (self._is_durable_fanout(exchange)
                and self._fanout_queues.get(queue, (None,))[0] == exchange):
            # kombu marked the queue as PUB/SUB fed; ours is a list: consume with BRPOP.
            del self._fanout_queues[queue]

    def _put_fanout(self, exchange, message, routing_key, **kwargs):
        if not self._is_durable_fanout(exchange):
            return super()._put_fanout(exchange, message, routing_key, **kwargs)
        publish_batch = kwargs.pop('_publish_batch', None)
        queues = sorted({queue for _, _, queue in self.get_table(exchange)})
        if not queues:
            # Same as AMQP for an exchange without bindings: nobody subscribed.
            logger.warning('no queue bound to %s: message dropped', exchange)
            return
        priority = self._get_message_priority(message, reverse=False)
        copies = [(self._q_for_pri(queue, priority), dumps(self._copy(message, queue)))
                  for queue in queues]
        if publish_batch is not None:
            for key, payload in copies:
                publish_batch.add('lpush', key, payload)
            return
        with self.conn_or_acquire() as client:
            with client.pipeline(transaction=True) as pipe:
                for key, payload in copies:
                    pipe.lpush(key, payload)
                pipe.execute()

    def _copy(self, message: dict, queue: str) -> dict:
        properties = message['properties']
        return {**message, 'properties': {
            **properties,
            'delivery_tag': self._next_delivery_tag(),
            'delivery_info': {**properties['delivery_info'], QUEUE_KEY: queue},
        }}

    def _do_restore_message(self, payload, exchange, routing_key, pipe, leftmost=False):
        queue = ((payload.get('properties') or {}).get('delivery_info') or {}).get(QUEUE_KEY)
        if queue is not None:
            # Through the exchange the copy would land in every bound queue again.
            exchange, routing_key = '', queue
        return super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)

    def basic_consume(self, queue, no_ack, callback, consumer_tag, **kwargs):
        def deliver(message):
            message.delivery_info.setdefault('consumer_tag', consumer_tag)
            return callback(message)
        return super().basic_consume(queue, no_ack, deliver, consumer_tag, **kwargs)


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel


def install() -> None:
    """Make ``redis://``, ``rediss://`` and ``redis+socket://`` URLs use :class:`Transport`.

    Process-wide and idempotent; must run before the first connection is made.
    """
    for alias in ('redis', 'rediss'):
        kombu_transport.TRANSPORT_ALIASES[alias] = TRANSPORT
        # kombu caches resolved aliases: drop a class resolved before install().
        kombu_transport._transport_cache.pop(alias, None)
