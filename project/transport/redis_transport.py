"""Durable fan-out for kombu's Redis transport.

kombu publishes to a Redis fanout exchange with PUBLISH: a subscriber queue whose
consumer is down at that moment never sees the message. This transport changes that
for the bus's event exchanges only, i.e. for every exchange for which
:func:`is_durable_fanout` is true (declared ``fanout``, ``durable`` and named
``events.*``):

- publishing reads the exchange's bindings from kombu's own binding table in Redis
  (``_kombu.binding.<exchange>``, written by whoever declared and bound the queue, even
  a worker that is stopped now) and LPUSHes one copy into every bound queue, in one
  Lua script: one round trip, atomic (all copies or none, against one binding table);
- each copy has its own delivery tag (a shared tag breaks ack/restore, celery#4091)
  and ``delivery_info['queue']`` naming the queue it was pushed into; ``exchange`` and
  ``routing_key`` stay the publisher's, as on RabbitMQ, so Celery (e.g. ``retry()``)
  acts the same on both brokers;
- a copy that is restored (unacked at shutdown or past ``visibility_timeout``) goes
  back into its own queue only, not through the exchange into every bound queue;
- queues bound to such an exchange are consumed with BRPOP like any list queue,
  not with SUBSCRIBE.

A list item that is not a kombu message at all (not JSON, or JSON without kombu's
``properties``, e.g. pushed by hand) would make kombu raise in the worker's event loop
and end the worker; the item would be gone. It is delivered instead as a message with
content type :data:`NOT_A_MESSAGE` and the item's bytes as body, which the worker's
consumer refuses and dead-letters like any undecodable message.

A publisher of many events (the outbox relay) can hold the scripts back and send them
in one pipelined round trip (plus redis-py's SCRIPT EXISTS check): inside
``with channel.fanout_batch():`` a durable fan-out publish only queues its script, and
leaving the block sends them all, in order (an error raises there, before the caller
marks anything published). ``flush_fanout()`` sends what is queued so far, e.g. before
a plain publish that must come after them.

Every consumed message (any exchange) also gets ``delivery_info['consumer_tag']``,
as AMQP's basic.deliver has: it lets the worker tell which queue a message came from.
Every other exchange keeps kombu's behaviour, e.g. Celery's ``*.pidbox`` broadcast
and ``celeryev`` stay PUB/SUB.

Batched fetch and acks (:mod:`project.transport.redis_fetch`): after BRPOP returned an
item, the channel takes up to ``fetch_max - 1`` more from the same list (the transport
option ``fetch_max``, BUS_FETCH_MAX, default 16; 1 turns it off), within the consumer's
prefetch window, with one script that also records them as unacked: kombu's per-message
MULTI is skipped for them. They are delivered in list order, each through the path a
BRPOP item takes (a foreign item among them too). A delivery that raises gives the items
not delivered yet back to the head of their list, in order. On a transport registered
with an event loop (Celery's worker), acks are sent once per loop tick, all in one MULTI;
elsewhere at once. A crash of the main process loses, as with kombu, an item BRPOP took
and the process had not recorded yet; items the script took are recorded in the same
step, none is lost; an ack kept and not yet sent leaves its message unacked, so it comes
back after the visibility timeout and the bus's claims absorb it (idempotency key,
inbox). Fetching by list drains up to ``fetch_max`` items of one queue at a time (kombu's
round robin between queues goes on per BRPOP).

kombu keeps exchange declarations per connection, in memory. An ``events.*`` exchange
that the publishing connection has not declared is therefore declared on first publish
as a durable fanout (the bus's naming rule, as in ``project.messaging.topology``); kombu would
otherwise route it as a direct exchange, i.e. drop the message unless its routing key
is a bound queue's. Celery's ``Task.retry()`` publishes through such a connection.

Selecting it, keeping the ``redis://`` / ``redis+socket://`` / ``sentinel://`` broker
URL: call :func:`install` before the first broker connection (at import of the Celery
app module). It points kombu's ``redis`` and ``rediss`` transport aliases at
:class:`Transport`, and ``sentinel`` at :class:`SentinelTransport` (the same channel on
kombu's Sentinel connection logic: the master is asked of the sentinels, again after a
failover), for the whole process. Celery's ``broker_transport`` setting is
not enough: kombu honours it for ``redis://host:port/db`` but, for a ``redis+socket://``
URL, takes the part before ``+`` as the transport name and silently drops the setting;
``Connection.switch()`` (failover) re-derives the transport from the URL scheme too.
"""
from __future__ import annotations

import base64
import logging
from contextlib import contextmanager
from time import time
from typing import Any, Iterator, Mapping
from uuid import uuid4

from kombu import transport as kombu_transport
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from kombu.utils.objects import cached_property

from project.transport import redis_fetch

logger = logging.getLogger(__name__)

EVENT_EXCHANGE_PREFIX = 'events.'
#: ``delivery_info`` key naming the queue a copy was pushed into.
QUEUE_KEY = 'queue'
TRANSPORT = f'{__name__}:Transport'
SENTINEL_TRANSPORT = f'{__name__}:SentinelTransport'
#: content type of a list item that was not a kombu message (its bytes are the body)
NOT_A_MESSAGE = 'application/x-bus-not-a-kombu-message'

# KEYS[1]: the exchange's binding table. ARGV: the message as JSON with two
# placeholder strings, for its delivery tag and for its queue; both placeholders; a
# fresh tag base; kombu's global key prefix; the queue key's priority suffix; kombu's
# binding separator. Pushes one copy per bound queue, returns the number of copies.
PUSH_COPIES = '''
local template, tag_token, queue_token = ARGV[1], ARGV[2], ARGV[3]
local tag_base, prefix, suffix, sep = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local function put(s, token, value)
  local i, j = string.find(s, token, 1, true)
  return string.sub(s, 1, i - 1) .. value .. string.sub(s, j + 1)
end
local pushed = {}
local n = 0
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  -- member: routing_key .. sep .. pattern .. sep .. queue
  local a = string.find(member, sep, 1, true)
  local b = string.find(member, sep, a + #sep, true)
  local queue = string.sub(member, b + #sep)
  if not pushed[queue] then
    pushed[queue] = true
    n = n + 1
    local payload = put(template, tag_token, cjson.encode(tag_base .. '.' .. n))
    payload = put(payload, queue_token, cjson.encode(queue))
    redis.call('LPUSH', prefix .. queue .. suffix, payload)
  end
end
return n
'''


def is_durable_fanout(exchange: str, declaration: Mapping[str, Any] | None) -> bool:
    """Whether messages to `exchange` are pushed into every bound queue."""
    return bool(
        declaration
        and exchange.startswith(EVENT_EXCHANGE_PREFIX)
        and declaration.get('type') == 'fanout'
        and declaration.get('durable')
    )


class Channel(kombu_redis.Channel):
    """Redis channel with durable fan-out for the exchanges of :func:`is_durable_fanout`, batched fetch and acks."""

    QoS = redis_fetch.QoS
    #: items taken per round trip after a BRPOP (transport option, BUS_FETCH_MAX)
    fetch_max = redis_fetch.FETCH_MAX
    from_transport_options = kombu_redis.Channel.from_transport_options + redis_fetch.TRANSPORT_OPTIONS

    def __init__(self, *args, **kwargs):
        #: queues consumed without acks: what is fetched for them is not recorded as unacked
        self._no_ack_queues: set[str] = set()
        super().__init__(*args, **kwargs)

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
        # The copies are made in Redis, from this template: the script puts each copy's
        # tag and queue in place of the two placeholder strings (JSON-encoded, unique).
        tag_token, queue_token = uuid4().hex, uuid4().hex
        properties = message['properties']
        template = dumps({**message, 'properties': {
            **properties, 'delivery_tag': tag_token,
            'delivery_info': {**properties['delivery_info'], QUEUE_KEY: queue_token}}})
        priority = self._get_message_priority(message, reverse=False)
        args = [template, f'"{tag_token}"', f'"{queue_token}"', self._next_delivery_tag(),
                self.global_keyprefix, self._q_for_pri('', priority), self.sep]
        key = self.keyprefix_queue % (exchange,)
        if self._fanout_batch is not None:
            self._fanout_batch.append((exchange, key, args))
        else:
            self._push_now(exchange, key, args)

    def _push_now(self, exchange: str, key: str, args: list[Any]) -> None:
        with self.conn_or_acquire() as client:
            _warn_if_unbound(exchange, self._push_copies(keys=[key], args=args, client=client))

    _fanout_batch: list[tuple[str, str, list[Any]]] | None = None

    @contextmanager
    def fanout_batch(self) -> Iterator[None]:
        """Queue the durable fan-out publishes made inside; send them in one round trip when it ends."""
        self._fanout_batch = []
        try:
            yield
            self.flush_fanout()
        finally:
            self._fanout_batch = None

    def flush_fanout(self) -> None:
        """Send the queued fan-out scripts now, pipelined, in the order they were published."""
        if not self._fanout_batch:
            return
        batch, self._fanout_batch = self._fanout_batch, []
        if len(batch) == 1:  # a pipeline with a script costs a SCRIPT EXISTS round trip first
            self._push_now(*batch[0])
            return
        with self.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=False)
            for _, key, args in batch:
                self._push_copies(keys=[key], args=args, client=pipe)
            for (exchange, _, _), copies in zip(batch, pipe.execute()):
                _warn_if_unbound(exchange, copies)

    @cached_property
    def _push_copies(self):
        return self._create_client().register_script(PUSH_COPIES)

    def _do_restore_message(self, payload, exchange, routing_key, pipe, leftmost=False):
        queue = ((payload.get('properties') or {}).get('delivery_info') or {}).get(QUEUE_KEY)
        if queue is not None:
            # Through the exchange the copy would land in every bound queue again.
            exchange, routing_key = '', queue
        return super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)

    def _brpop_read(self, **options):
        # kombu's own, but for the item's parsing (see _parse): a foreign item must not
        # raise in the worker's event loop; and the items fetched after it (_fetch_more).
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, 'BRPOP', **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise kombu_redis.Empty()
            key, item = dest__item
            key = bytes_to_str(key)
            dest = key.rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            self.connection._deliver(_parse(item, dest), dest)
            self._fetch_more(key, dest)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    @cached_property
    def _fetch(self):
        return self._create_client().register_script(redis_fetch.FETCH_MORE)

    def _fetch_more(self, key: str, queue: str) -> None:
        """Take and deliver up to ``fetch_max - 1`` more items of list `key`, recorded as unacked in one script."""
        n = 0 if self._closing else redis_fetch.more_to_fetch(self.qos, self.fetch_max)
        if not n:
            return
        record = self.ack_emulation and queue not in self._no_ack_queues
        prefix = self.global_keyprefix
        with self.conn_or_acquire() as client:
            reply = self._fetch(keys=[key, prefix + self.unacked_index_key, prefix + self.unacked_key],
                                args=[n, int(record), time()], client=client)
        taken = [(item, tag and bytes_to_str(tag)) for item, tag in zip(reply[::2], reply[1::2])]
        delivered = 0
        try:
            for item, tag in taken:
                if tag:
                    self.qos.recorded.add(tag)  # its append (in _deliver) writes nothing
                self.connection._deliver(_parse(item, queue, tag), queue)
                delivered += 1
        except BaseException:
            self._give_back(key, taken[delivered:])
            raise
        finally:
            if record:
                self.qos.recorded.clear()

    def _give_back(self, key: str, items: list[tuple[bytes, str | None]]) -> None:
        """Put `items` (taken, not delivered) back at the head of list `key`, in order, without their records."""
        tags = [tag for _, tag in items if tag]
        with self.conn_or_acquire() as client:
            pipe = client.pipeline()
            if tags:
                pipe.zrem(self.unacked_index_key, *tags).hdel(self.unacked_key, *tags)
            pipe.rpush(key, *[item for item, _ in reversed(items)]).execute()

    def _get(self, queue):
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                item = client.rpop(self._q_for_pri(queue, pri))
                if item:
                    self._maybe_update_queues_expire(client, queue)
                    return _parse(item, queue)
            self._maybe_update_queues_expire(client, queue)
            raise kombu_redis.Empty()

    def basic_consume(self, queue, no_ack, callback, consumer_tag, **kwargs):
        (self._no_ack_queues.add if no_ack else self._no_ack_queues.discard)(queue)

        def deliver(message):
            message.delivery_info.setdefault('consumer_tag', consumer_tag)
            return callback(message)
        return super().basic_consume(queue, no_ack, deliver, consumer_tag, **kwargs)

    def close(self):
        if isinstance(self._qos, redis_fetch.QoS):  # (not without ack emulation)
            self._qos.send_acks_or_log()  # while the channel's pools are still there
        super().close()


def _warn_if_unbound(exchange: str, copies: int) -> None:
    if not copies:  # as on AMQP for an exchange without bindings: nobody subscribed
        logger.warning('no queue bound to %s: message dropped', exchange)


def _parse(item: bytes, queue: str, tag: str | None = None) -> dict[str, Any]:
    """kombu's message dict of a list item; a foreign item becomes a NOT_A_MESSAGE message.

    `tag`: the delivery tag the fetch script recorded the item under, kept for a foreign
    item (the script's JSON reading accepts some that Python's refuses, e.g. a hexadecimal
    number), so that its ack removes that record.
    """
    try:
        payload = loads(bytes_to_str(item))
        if isinstance(payload, dict) and 'delivery_tag' in (payload.get('properties') or {}):
            return payload
    except (ValueError, TypeError):
        pass
    raw = item if isinstance(item, bytes) else str(item).encode()
    return {'body': base64.b64encode(raw).decode('ascii'), 'content-encoding': 'binary',
            'content-type': NOT_A_MESSAGE, 'headers': {},
            'properties': {'body_encoding': 'base64', 'delivery_tag': tag or str(uuid4()), 'priority': 0,
                           'delivery_mode': 2,
                           'delivery_info': {'exchange': '', 'routing_key': queue, QUEUE_KEY: queue}}}


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`; it keeps the event loop it is registered with for acks."""

    Channel = Channel
    #: the loop acks are sent on once per tick (:class:`project.transport.redis_fetch.QoS`); None: at once
    ack_loop = None

    def __init__(self, client, **kwargs):
        redis_fetch.check_fetch_max(client.transport_options.get('fetch_max', redis_fetch.FETCH_MAX))
        super().__init__(client, **kwargs)

    def register_with_event_loop(self, connection, loop):
        super().register_with_event_loop(connection, loop)
        self.ack_loop = loop


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """:class:`Channel` on a master found through Redis Sentinel (kombu's ``sentinel://``)."""

    from_transport_options = kombu_redis.SentinelChannel.from_transport_options + redis_fetch.TRANSPORT_OPTIONS


class SentinelTransport(Transport, kombu_redis.SentinelTransport):
    """kombu's Redis Sentinel transport with :class:`SentinelChannel`."""

    Channel = SentinelChannel


def install() -> None:
    """Make ``redis://``, ``rediss://``, ``redis+socket://`` and ``sentinel://`` URLs use the bus's transports.

    Process-wide and idempotent; must run before the first connection is made.
    """
    for alias, transport in (('redis', TRANSPORT), ('rediss', TRANSPORT), ('sentinel', SENTINEL_TRANSPORT)):
        kombu_transport.TRANSPORT_ALIASES[alias] = transport
        # kombu caches resolved aliases: drop a class resolved before install().
        kombu_transport._transport_cache.pop(alias, None)
