"""Batched fetch and batched acks for the bus's Redis channel (issue 15).

kombu's Redis transport spends, per message, in the worker's main process: one BRPOP,
one MULTI recording the message as unacked (ZADD ``unacked_index`` + HSET ``unacked``)
and, at its ack, another MULTI (ZREM + HDEL). The bus's channel
(:mod:`project.transport.redis_transport`) cuts that with what this module holds:

- fetch: after BRPOP returned an item from a list, :data:`FETCH_MORE` RPOPs up to
  :func:`more_to_fetch` further items from that same list and records every one that is a
  kombu message as unacked, in one script: one round trip, atomic. The records are
  kombu's own (index scored with the caller's ``time()``; hash value
  ``[payload, exchange, routing_key]`` as JSON, exchange and routing key from the
  message's ``delivery_info``), so the visibility-timeout restore of any kombu process
  reads them as it reads its own. :class:`QoS` then skips kombu's per-message MULTI for
  the tags the script recorded. BRPOP stays for the first item (a script cannot block);
  the script needs nothing newer than Redis 5 (BLMPOP, which would pop several items in
  one blocking call, is Redis 7 only; the embedded broker is 6.2);
- acks: on a transport registered with an event loop (Celery's prefork worker, its hub),
  :meth:`QoS.ack` drops the message from the channel's memory at once and keeps its tag;
  once per loop tick one MULTI removes every kept tag from the index and the hash.
  Without a loop (a plain kombu consumer, the bench's, the ``bus`` CLI) an ack goes to
  Redis at once, as in kombu. Kept tags are sent before anything that reads or restores
  this channel's unacked records (a restore by tag, the visibility sweep, the restore of
  unacked messages at close) and when the channel closes.

What a crash of the main process costs: an item BRPOP took and the process did not
record yet is lost, as with kombu; items the script took are recorded in the same step,
so none is lost. An ack kept and not yet sent leaves its message in ``unacked``: it is
restored after the visibility timeout and delivered again, and the bus's claims absorb
that delivery (commands: the idempotency key; events: the subscriber's inbox).
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

from project.errors import ConfigurationError

logger = logging.getLogger(__name__)

#: items fetched per round trip by default (BUS_FETCH_MAX; 1: one BRPOP per message, as kombu)
FETCH_MAX = 16
#: the transport options a channel reads for this module (kombu's ``from_transport_options``)
TRANSPORT_OPTIONS = ('fetch_max',)

# KEYS: the list BRPOP took an item from; the unacked index; the unacked hash (the last two
# with kombu's global key prefix: its prefixed client prefixes only an EVALSHA's first key).
# ARGV: how many items to take; '1' to record them as unacked ('0': a no-ack consumer's);
# the index's score (the caller's time()). Returns item, tag, item, tag, ...: a tag is
# the delivery tag recorded for the item before it, false if none was.
FETCH_MORE = '''
local record, now = ARGV[2] == '1', ARGV[3]
local out = {}
for _ = 1, tonumber(ARGV[1]) do
  local item = redis.call('RPOP', KEYS[1])
  if not item then break end
  local tag = false
  if record then
    local ok, message = pcall(cjson.decode, item)
    local properties = ok and type(message) == 'table' and message.properties
    local info = type(properties) == 'table' and properties.delivery_info
    if type(info) == 'table' and type(properties.delivery_tag) == 'string'
        and type(info.exchange) == 'string' and type(info.routing_key) == 'string' then
      tag = properties.delivery_tag
      redis.call('ZADD', KEYS[2], now, tag)
      redis.call('HSET', KEYS[3], tag,
                 '[' .. item .. ',' .. cjson.encode(info.exchange) .. ',' .. cjson.encode(info.routing_key) .. ']')
    end
  end
  out[#out + 1] = item
  out[#out + 1] = tag
end
return out
'''


def check_fetch_max(value: Any) -> int:
    """The ``fetch_max`` transport option as a whole number >= 1, or an error naming the fix."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ConfigurationError(f"broker_transport_options fetch_max={value!r} is not valid; use a whole number >= 1 "
                             f"(BUS_FETCH_MAX; default {FETCH_MAX}, 1: one BRPOP per message)")


def more_to_fetch(qos: virtual.QoS, cap: int) -> int:
    """How many items may follow the one BRPOP took: up to ``cap - 1``, within the prefetch window.

    ``qos`` has counted that one already. Celery's ``worker_disable_prefetch`` replaces
    ``can_consume`` on the instance with a limit no estimate tells: then none.
    """
    if cap <= 1 or 'can_consume' in vars(qos):
        return 0
    room = qos.can_consume_max_estimate()
    return cap - 1 if room is None else min(cap - 1, room)


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS that trusts the fetch script's records and sends acks once per loop tick."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: tags FETCH_MORE recorded as unacked, whose delivery is under way (the channel fills it)
        self.recorded: set[str] = set()
        self._acks: deque[str] = deque()
        self._flush_scheduled = False

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in self.recorded:
            self.recorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)  # Redis has its record already
        else:
            super().append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        loop = getattr(self.channel.connection, 'ack_loop', None)
        if loop is None:
            super().ack(delivery_tag)
            return
        self._acks.append(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self.send_acks_or_log)

    def send_acks(self) -> None:
        """Remove the records of every kept ack in one MULTI (ZREM and HDEL of all their tags)."""
        self._flush_scheduled = False  # first: an ack from here on schedules a send of its own
        tags = []
        while self._acks:
            tags.append(self._acks.popleft())
        if tags:
            with self.pipe_or_acquire() as pipe:
                pipe.zrem(self.unacked_index_key, *tags).hdel(self.unacked_key, *tags).execute()

    def send_acks_or_log(self) -> None:
        """:meth:`send_acks` where raising helps nobody (the loop's callback, a closing channel)."""
        try:
            self.send_acks()
        except Exception:  # noqa: BLE001 - the loop runs other callbacks after this one
            logger.warning("acks not sent to Redis: their messages come back after the visibility timeout, "
                           "and the bus's claims absorb that delivery", exc_info=True)

    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> None:
        # Every restore (reject with requeue, the visibility sweep, unacked at close) comes
        # here: an acked message must not come back.
        self.send_acks()
        super().restore_by_tag(tag, client=client, leftmost=leftmost)

    def restore_unacked_once(self, stderr: Any = None) -> None:
        self.send_acks_or_log()  # also when it runs at exit, with no close before
        super().restore_unacked_once(stderr=stderr)
