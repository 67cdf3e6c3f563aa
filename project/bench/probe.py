"""What a `bus bench` worker measures about itself, with no I/O per message.

Imported by both bench worker apps (project/bench/bare.py for bare Celery and
project/bench/tasks.py for the bus), so both sides are measured the same way:

- every task that ends in SUCCESS adds one to its slot's count and moves the slot's
  "last done" wall-clock time forward (slot 1: event deliveries, to subscribers and
  process manager steps; slot 0: the rest);
  a task that fails counts in its slot's failures, so a stalled phase says why;
- `started(seq, sent_at)`, called first thing by a latency-measuring handler, keeps
  `now - sent_at` at index `seq`: end-to-end latency from the caller's `.delay()` to
  the handler's start.

The numbers live in shared memory allocated at `worker_init`, in the worker's main
process before the pool forks, so every pool process writes to the same arrays; the
remote-control command `bench_probe` (answered by the main process) reads them. The
orchestrator (project/bench/run.py) polls it to detect completion: the time of the last
completion comes from the worker, not from the polling, so the poll interval does not
blur the figures.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import time
from typing import Any

from celery import signals
from celery.worker import state as worker_state
from celery.worker.control import inspect_command

#: task names (prefixes) counted in the deliveries slot: subscribers and process manager steps
DELIVERY_PREFIXES = ("bench_sub.", "bench_pm.", "bench_bare.fan")
#: latency samples a worker can hold (seq numbers 0 .. LATENCY_SLOTS-1)
LATENCY_SLOTS = int(os.environ.get("BUS_BENCH_LATENCY_SLOTS", "20000"))
_FIELDS = 3  # per slot: successes, last success (epoch seconds), failures


class _Shared:
    counts: Any = None
    latency: Any = None
    lock: Any = None


def _allocate() -> None:
    if _Shared.counts is not None:
        return
    context = multiprocessing.get_context("fork") if hasattr(os, "fork") else multiprocessing
    _Shared.lock = context.Lock()
    _Shared.counts = context.RawArray("d", 2 * _FIELDS)
    _Shared.latency = context.RawArray("d", LATENCY_SLOTS)
    _clear_latency()


def _clear_latency() -> None:
    for i in range(len(_Shared.latency)):
        _Shared.latency[i] = math.nan


@signals.worker_init.connect(weak=False)
def _on_worker_init(**_: Any) -> None:
    _allocate()  # before the pool forks: the children share these arrays


@signals.task_postrun.connect(weak=False)
def _on_task_postrun(task: Any = None, state: str | None = None, **_: Any) -> None:
    if _Shared.counts is None or task is None:
        return
    base = _FIELDS if task.name.startswith(DELIVERY_PREFIXES) else 0
    now = time.time()
    with _Shared.lock:
        if state == "SUCCESS":
            _Shared.counts[base] += 1
            if now > _Shared.counts[base + 1]:
                _Shared.counts[base + 1] = now
        else:
            _Shared.counts[base + 2] += 1


def started(seq: int, sent_at: float) -> None:
    """Record the latency of message `seq` (sent at `sent_at`, epoch seconds) at handler start."""
    now = time.time()
    if _Shared.latency is not None and 0 <= seq < len(_Shared.latency):
        _Shared.latency[seq] = now - sent_at


def percentiles(samples: list[float], points: tuple[float, ...] = (50, 90, 99)) -> dict[str, float]:
    """Nearest-rank percentiles of `samples` (seconds), keyed `p50`, `p90`, ..."""
    ordered = sorted(samples)
    if not ordered:
        return {}
    found = {f"p{p:g}": ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] for p in points}
    found["max"] = ordered[-1]
    found["mean"] = sum(ordered) / len(ordered)
    return found


@inspect_command(args=[("op", str), ("count", int)], signature="[op] [count]")
def bench_probe(state: Any, op: str = "read", count: int = 0) -> dict[str, Any]:
    """Counters of this worker; `op=latency`: percentiles of samples 0..count-1; `op=reset`: clear samples."""
    _allocate()
    reply: dict[str, Any] = {}
    if op == "reset":
        _clear_latency()
    elif op == "latency":
        samples = [_Shared.latency[i] for i in range(min(count, len(_Shared.latency)))]
        recorded = [s for s in samples if not math.isnan(s)]
        reply["latency"] = {"recorded": len(recorded), **percentiles(recorded)}
    with _Shared.lock:
        counts = list(_Shared.counts)
    reply["slots"] = [counts[i:i + _FIELDS] for i in range(0, len(counts), _FIELDS)]
    reply["active"] = len(worker_state.active_requests)
    return reply
