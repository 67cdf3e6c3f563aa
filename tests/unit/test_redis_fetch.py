"""Batched acks and the fetch's size (project/transport/redis_fetch.py), with fakes that record what Redis would get.

The fetch script itself, and acks on a real server, are in tests/integration/test_redis_fetch.py.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable

import pytest

from project.errors import ConfigurationError
from project.transport.redis_fetch import QoS, check_fetch_max, more_to_fetch


class Pipeline:
    """A MULTI as a list of commands, appended to its client's `sent` when executed."""

    def __init__(self, sent: list[list[tuple]]) -> None:
        self.sent, self.commands = sent, []

    def zrem(self, key: str, *tags: str) -> "Pipeline":
        self.commands.append(("ZREM", key, *tags))
        return self

    def hdel(self, key: str, *tags: str) -> "Pipeline":
        self.commands.append(("HDEL", key, *tags))
        return self

    def execute(self) -> None:
        self.sent.append(self.commands)


class Client:
    def __init__(self) -> None:
        self.sent: list[list[tuple]] = []

    def pipeline(self) -> Pipeline:
        return Pipeline(self.sent)


class Loop:
    """An event loop's call_soon; `tick()` runs what was scheduled, as the hub does each tick."""

    def __init__(self) -> None:
        self.ready: list[Callable[[], Any]] = []

    def call_soon(self, callback: Callable[[], Any]) -> None:
        self.ready.append(callback)

    def tick(self) -> None:
        ready, self.ready = self.ready, []
        for callback in ready:
            callback()


class Transport:
    def __init__(self, ack_loop: Loop | None) -> None:
        self.ack_loop = ack_loop


class Channel:
    """What the QoS uses of a channel: its keys, its connection (the transport) and a client."""

    unacked_key, unacked_index_key = "unacked", "unacked_index"
    do_restore = False  # no restore of unacked messages at exit (kombu's finalizer), unless a test asks

    def __init__(self, loop: Loop | None) -> None:
        self.connection = Transport(loop)
        self.client = Client()

    @contextmanager
    def conn_or_acquire(self, client: Any = None):
        yield client or self.client


def delivered(qos: QoS, *tags: str) -> None:
    """Messages the fetch script recorded, delivered through the QoS (no Redis write)."""
    for tag in tags:
        qos.recorded.add(tag)
        qos.append(object(), tag)


def test_without_an_event_loop_each_ack_is_sent_at_once():
    # Given a channel of a plain consumer (no event loop) holding two messages
    channel = Channel(loop=None)
    qos = QoS(channel, prefetch_count=10)
    delivered(qos, "t1", "t2")
    # When both are acked, Then each ack went to Redis at once, as kombu sends it
    qos.ack("t1")
    qos.ack("t2")
    assert channel.client.sent == [[("ZREM", "unacked_index", "t1"), ("HDEL", "unacked", "t1")],
                                   [("ZREM", "unacked_index", "t2"), ("HDEL", "unacked", "t2")]]


def test_with_an_event_loop_the_acks_of_a_tick_go_in_one_multi():
    # Given a worker's channel (registered with its event loop) holding three messages
    loop = Loop()
    channel = Channel(loop)
    qos = QoS(channel, prefetch_count=3)
    delivered(qos, "t1", "t2", "t3")
    assert not qos.can_consume()
    # When all three are acked in one tick
    for tag in ("t1", "t2", "t3"):
        qos.ack(tag)
    # Then the channel has room again at once, Redis got nothing yet, and one send is scheduled
    assert qos.can_consume() and channel.client.sent == [] and len(loop.ready) == 1
    # ... which the next tick runs: one MULTI for all three tags
    loop.tick()
    assert channel.client.sent == [[("ZREM", "unacked_index", "t1", "t2", "t3"), ("HDEL", "unacked", "t1", "t2", "t3")]]
    # ... and an ack in a later tick is a send of its own
    delivered(qos, "t4")
    qos.ack("t4")
    loop.tick()
    assert channel.client.sent[1:] == [[("ZREM", "unacked_index", "t4"), ("HDEL", "unacked", "t4")]]


def test_kept_acks_are_sent_before_the_unacked_messages_are_restored():
    # Given a worker's channel with one message acked in this tick and one not
    loop = Loop()
    channel = Channel(loop)
    qos = QoS(channel, prefetch_count=10)
    delivered(qos, "acked", "held")
    qos.ack("acked")
    restored: list[str] = []
    qos.restore_unacked = lambda client=None: restored.extend(qos._delivered)  # what kombu would hand back
    channel.do_restore = True
    # When the channel restores its unacked messages (as it does when it closes)
    qos.restore_unacked_once()
    # Then the ack went to Redis first, and only the other message is handed back
    assert channel.client.sent == [[("ZREM", "unacked_index", "acked"), ("HDEL", "unacked", "acked")]]
    assert restored == ["held"]
    # ... and the scheduled send finds nothing left to send
    loop.tick()
    assert len(channel.client.sent) == 1


def test_a_send_that_fails_in_the_loop_is_logged_not_raised(caplog):
    # Given a kept ack and a Redis that refuses the connection
    loop = Loop()
    channel = Channel(loop)
    qos = QoS(channel, prefetch_count=10)
    delivered(qos, "t1")
    qos.ack("t1")

    def refused() -> Pipeline:
        raise ConnectionError("Redis is down")
    channel.client.pipeline = refused
    # When the loop runs the send, Then it does not raise (the loop's other callbacks run) and says what follows
    loop.tick()
    assert "come back after the visibility timeout" in caplog.text


@pytest.mark.parametrize("prefetch, held, cap, more", [
    (16, 1, 16, 15),   # room for the rest of a fetch
    (4, 1, 16, 3),     # the prefetch window is the limit
    (4, 4, 16, 0),     # no room left
    (0, 1, 16, 15),    # no prefetch limit: the cap
    (16, 1, 1, 0),     # BUS_FETCH_MAX=1: BRPOP only
])
def test_a_fetch_takes_what_the_prefetch_window_and_the_cap_allow(prefetch: int, held: int, cap: int, more: int):
    qos = QoS(Channel(loop=None), prefetch_count=prefetch)
    delivered(qos, *(f"t{n}" for n in range(held)))
    assert more_to_fetch(qos, cap) == more


def test_a_fetch_takes_nothing_more_when_celery_disables_prefetch():
    # Given Celery's worker_disable_prefetch, which replaces can_consume on the QoS instance
    qos = QoS(Channel(loop=None), prefetch_count=16)
    qos.can_consume = lambda: True
    # Then no batch is taken (its limit, free pool processes, is not one the estimate knows)
    assert more_to_fetch(qos, 16) == 0


@pytest.mark.parametrize("value", [0, -1, "16", 2.5, True, None])
def test_a_bad_fetch_max_is_refused_naming_the_setting(value: Any):
    with pytest.raises(ConfigurationError, match=r"fetch_max=.* is not valid; use a whole number >= 1 \(BUS_FETCH_MAX"):
        check_fetch_max(value)
    assert check_fetch_max(1) == 1


def test_the_channels_read_fetch_max_and_the_sentinel_one_keeps_kombus_options():
    from project.transport.redis_transport import Channel as RedisChannel
    from project.transport.redis_transport import SentinelChannel
    assert "fetch_max" in RedisChannel.from_transport_options
    assert {"fetch_max", "master_name", "sentinel_kwargs"} <= set(SentinelChannel.from_transport_options)
