"""The sending process of `bus bench`: `python -m project.bench.sender bare|bus`.

One JSON request per line on stdin, one JSON reply per line on stdout (library output
goes to stderr). Two processes, because the bus changes process-wide things (the Redis
transport, a before_task_publish handler): `bare` imports project/bench/bare.py only,
`bus` imports the bus with project/bench/tasks.py. Both are configured by the
environment `bus bench` gives them.

Operations (all times are epoch seconds, taken right before the first and after the
last send):
- `burst {kind, n, start}`: send `n` messages as fast as one thread can (`kind`:
  `noop`, `fan`, or on the bus `open` / `close`: the pairs' events of the process
  manager); seq numbers from `start`;
- `paced {n, rate}`: send `n` no-op messages at `rate`/s, each stamped with its send
  time (latency); seq 0..n-1;
- `relay {n, batch}` (bus): write `n` events into the outbox (committed, unpublished),
  then time `project.messaging.outbox.relay` publishing them;
- `timers {n, start, batch}` (bus): write `n` no-op commands into the outbox as durable
  timers already due (committed, unpublished), seq numbers from `start`;
- `relay_now {batch}` (bus): one `project.messaging.outbox.relay` pass, timed (`sent`:
  the rows it published);
- `purge {queues}`: empty these queues (what the relay left behind).
"""
from __future__ import annotations

import json
import sys
import time
import traceback
import uuid
from typing import Any, Callable

_RUN = uuid.uuid4().hex[:8]


class Side:
    """How one side (bare Celery or the bus) sends each kind of message."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        if kind == "bare":
            from project.bench import bare as bench_bare
            self.app = bench_bare.app
            self._noop, self._fan = bench_bare.noop, bench_bare.publish_fan
        else:
            from project import app
            from project.bench import tasks as bench_tasks
            self.app = app
            self._noop, self._fan = bench_tasks.no_op_task, bench_tasks.publish_one_task
            self._pair = bench_tasks.advance_pair_task

    def noop(self, seq: int, sent_at: float = 0.0) -> None:
        if self.kind == "bare":
            self._noop.delay(seq=seq, sent_at=sent_at)
        else:
            self._noop.delay(seq=seq, sent_at=sent_at, idempotency_key=f"{_RUN}-noop-{seq}-{sent_at}")

    def fan(self, seq: int) -> None:
        if self.kind == "bare":
            self._fan(seq)
        else:
            self._fan.delay(seq=seq, idempotency_key=f"{_RUN}-fan-{seq}")

    def pair(self, seq: int, closing: bool) -> None:
        """The bus only: the pair `seq`'s opening (or closing) event, published by a command."""
        self._pair.delay(seq=seq, closing=closing, idempotency_key=f"{_RUN}-pair-{seq}-{closing}")

    def sends(self, kind: str) -> Callable[[int], None]:
        """How this side sends one message of `kind` (see `burst`)."""
        return {"noop": self.noop, "fan": self.fan, "open": lambda seq: self.pair(seq, closing=False),
                "close": lambda seq: self.pair(seq, closing=True)}[kind]


def burst(side: Side, kind: str, n: int, start: int = 0) -> dict[str, Any]:
    send = side.sends(kind)
    first = time.time()
    for seq in range(start, start + n):
        send(seq)
    return {"first": first, "last": time.time(), "sent": n}


def paced(side: Side, n: int, rate: float) -> dict[str, Any]:
    interval = 1.0 / rate
    first = time.time()
    behind = 0
    for seq in range(n):
        due = first + seq * interval
        wait = due - time.time()
        if wait > 0:
            time.sleep(wait)
        elif wait < -interval:
            behind += 1
        side.noop(seq, sent_at=time.time())
    return {"first": first, "last": time.time(), "sent": n, "behind": behind}


def relay(side: Side, n: int, batch: int = 500) -> dict[str, Any]:
    from project import bus
    from project.bench.tasks import BenchPublished
    from project.messaging import outbox
    from project.store.uow import UnitOfWork
    started = time.time()
    for offset in range(0, n, batch):
        with UnitOfWork(bus.engine()) as uow:
            sink = outbox.OutboxSink(uow.session, "bench", f"relay-{uuid.uuid4().hex}-{offset}")
            for seq in range(offset, min(n, offset + batch)):
                sink.publish(BenchPublished(seq=seq))
            uow.commit()
    written = time.time()
    published = outbox.relay(bus.wiring, batch=batch)
    return {"write_s": written - started, "relay_s": time.time() - written, "published": published}


def timers(side: Side, n: int, start: int = 0, batch: int = 500) -> dict[str, Any]:
    """`n` durable timers of no-op commands, rows as a handler's `commands.send(..., delay=...)` writes them,
    due now."""
    from project import bus
    from project.bench.tasks import NoOp
    from project.messaging import outbox
    from project.messaging.sending import body_of
    from project.store.tables import utcnow
    from project.store.uow import UnitOfWork
    started = time.time()
    for offset in range(start, start + n, batch):
        with UnitOfWork(bus.engine()) as uow:
            sink = outbox.OutboxSink(uow.session, "bench", f"timers-{uuid.uuid4().hex}-{offset}")
            for seq in range(offset, min(start + n, offset + batch)):
                body, task_id = body_of(NoOp(seq=seq), f"{_RUN}-timer-{seq}")
                sink.schedule(NoOp.task_name(), body, utcnow(), row_id=task_id)
            uow.commit()
    return {"written": n, "write_s": time.time() - started}


def relay_now(side: Side, batch: int = 500) -> dict[str, Any]:
    from project import bus
    from project.messaging import outbox
    first = time.time()
    published = outbox.relay(bus.wiring, batch=batch)
    return {"first": first, "last": time.time(), "sent": published}


def purge(side: Side, queues: list[str]) -> dict[str, Any]:
    from kombu import Queue
    removed = 0
    with side.app.connection_for_write() as connection:
        channel = connection.default_channel
        for name in queues:
            try:
                removed += Queue(name, channel=channel).purge() or 0
            except Exception:  # noqa: BLE001 - a queue that does not exist holds nothing
                channel = connection.channel()
    return {"removed": removed}


def warm(side: Side) -> dict[str, Any]:
    """Open the broker connection (and, on the bus, the topology) before anything is timed."""
    with side.app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=3)
    return {"ok": True}


OPS: dict[str, Callable[..., dict[str, Any]]] = {
    "burst": burst, "paced": paced, "relay": relay, "timers": timers, "relay_now": relay_now, "purge": purge,
    "warm": warm}


def serve(make_side: Callable[[], Any], ops: dict[str, Callable[..., dict[str, Any]]]) -> None:
    """Answer the requests on stdin with `ops`, one JSON line each (also project/bench/peer_sender.py)."""
    out = sys.stdout
    sys.stdout = sys.stderr  # anything a library prints stays off the protocol stream
    side = make_side()
    out.write(json.dumps({"value": "ready"}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = {"value": ops[request.pop("op")](side, **request)}
        except Exception as exc:  # noqa: BLE001 - reported to the orchestrator
            reply = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def main() -> None:
    serve(lambda: Side(sys.argv[1]), OPS)


if __name__ == "__main__":
    main()
