"""The bus side of `bus bench`: a bench-only boundary, loaded with BUS_TASK_MODULES=project.bench.tasks.

- `bench.no_op` (`NoOp`): a command whose handler does nothing; with `sent_at` it
  records its latency first. It goes through everything a command goes through:
  caller-side validation, its own queue, validation again, the idempotency claim, the
  result stored with the key and in Celery's result backend.
- `bench.publish_one` (`PublishOne`): a command that publishes one `BenchPublished`
  event through the outbox.
- BUS_BENCH_SUBSCRIBERS subscribers `bench_sub.sub_000`, ... of `BenchPublished`, each
  on its own durable queue, each doing nothing (inbox claim and commit only).
- `bench.advance_pair` (`AdvancePair`): a command that publishes `PairOpened` (or, with
  `closing`, `PairClosed`) of the pair `seq`: the process manager `pair` (boundary
  `bench_pm`) starts an instance on the first and completes it on the second, one step
  each (`bench_pm.pair.pair_opened`, `bench_pm.pair.pair_closed`): load the instance,
  run the handler, save the state with its version, inbox claim and commit.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from pydantic import BaseModel

from project import bus
from project.bench import probe as bench_probe
from project.contracts import Command, Event, EventSink

SUBSCRIBER_BOUNDARY = "bench_sub"
PROCESS_BOUNDARY = "bench_pm"


class NoOp(Command, boundary="bench"):
    """Do nothing (the bench's unit of command work)."""

    seq: int = 0
    sent_at: float = 0.0  # epoch seconds at the caller's .delay(); 0: latency not measured


class PublishOne(Command, boundary="bench"):
    """Publish one BenchPublished."""

    seq: int = 0


class BenchPublished(Event, boundary="bench"):
    """The bench's event, fanned out to every bench subscriber."""

    seq: int = 0


class AdvancePair(Command, boundary="bench"):
    """Publish PairOpened of the pair `seq` (with `closing`: PairClosed)."""

    seq: int = 0
    closing: bool = False


class PairOpened(Event, boundary="bench"):
    """Starts the process manager instance of the pair `seq`."""

    seq: int = 0


class PairClosed(Event, boundary="bench"):
    """Completes the process manager instance of the pair `seq`."""

    seq: int = 0


class Pair(BaseModel):
    """The state of one pair: which of its events arrived."""

    opened: bool = False
    closed: bool = False


def no_op(command: NoOp) -> None:
    """Does nothing; with `sent_at`, records its latency first."""
    if command.sent_at:
        bench_probe.started(command.seq, command.sent_at)


def publish_one(command: PublishOne, *, events: EventSink) -> None:
    """Publishes one event (outbox row, published after commit)."""
    events.publish(BenchPublished(seq=command.seq))


def advance_pair(command: AdvancePair, *, events: EventSink) -> None:
    """Publishes the pair's next event (outbox row, published after commit)."""
    events.publish(PairClosed(seq=command.seq) if command.closing else PairOpened(seq=command.seq))


def on_opened(state: Pair, event: PairOpened, process: Any) -> None:
    """The starting step: a new instance, its state saved."""
    state.opened = True


def on_closed(state: Pair, event: PairClosed, process: Any) -> None:
    """The handled step: the instance read, its state saved, completed."""
    state.closed = True
    process.complete()


def _subscriber(index: int) -> Callable[..., Any]:
    def handler(event: BenchPublished) -> None:
        """Does nothing (one delivery)."""
    handler.__name__ = handler.__qualname__ = f"sub_{index:03d}"
    return handler


def subscriber_count() -> int:
    """How many bench subscribers this process registers (BUS_BENCH_SUBSCRIBERS, default 0)."""
    return int(os.environ.get("BUS_BENCH_SUBSCRIBERS", "0"))


no_op_task = bus.command(NoOp)(no_op)
publish_one_task = bus.command(PublishOne)(publish_one)
advance_pair_task = bus.command(AdvancePair)(advance_pair)
#: a missing instance is dead-lettered, so that it counts as a failure in the bench, not as a step
pair = bus.process_manager("pair", boundary=PROCESS_BOUNDARY, state=Pair, correlation="seq", on_missing="dead_letter")
pair.starts(PairOpened, on_opened)
pair.handles(PairClosed, on_closed)
subscriber_tasks = [bus.subscriber(BenchPublished, boundary=SUBSCRIBER_BOUNDARY)(_subscriber(i))
                    for i in range(subscriber_count())]
