"""What a peer worker process of `bus bench --peers` measures about itself, with no I/O per message.

The peers (dramatiq, FastStream) have no Celery remote control, so each worker process
keeps the same counters as project/bench/probe.py in a small memory-mapped file of its
own, BUS_BENCH_PEER_COUNTS/<pid>.counts: per slot (0: no-op messages, 1: fan-out
deliveries) the successes, the wall-clock time of the last success, and failures. A
handler adds to it in memory; the orchestrator reads every file of the directory
(`read`), so, as for Celery, the time of the last completion comes from the worker and
the poll interval does not blur the figures. A process's file appears when it is ready
to consume (`ready`): the orchestrator waits for one per worker process.
"""
from __future__ import annotations

import mmap
import os
import threading
import time
from pathlib import Path
from typing import Any

#: the environment `bus bench --peers` gives a peer's worker and sender: counter directory, broker, confirms
COUNTS_ENV = "BUS_BENCH_PEER_COUNTS"
URL_ENV = "BUS_BENCH_PEER_URL"
CONFIRM_ENV = "BUS_BENCH_PEER_CONFIRM"  # "1": send with publisher confirms
SLOTS = 2
_FIELDS = 3  # per slot: successes, last success (epoch seconds), failures
_SIZE = 8 * SLOTS * _FIELDS


class _Mine:
    view: Any = None
    lock = threading.Lock()


def _reset_after_fork() -> None:
    _Mine.view = None  # a forked child counts in a file of its own
    _Mine.lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


def _view() -> Any:
    if _Mine.view is None:
        path = Path(os.environ[COUNTS_ENV]) / f"{os.getpid()}.counts"
        with open(path, "w+b") as file:
            file.truncate(_SIZE)
            _Mine.view = memoryview(mmap.mmap(file.fileno(), _SIZE)).cast("d")
    return _Mine.view


def ready(*_: Any, **__: Any) -> None:
    """This process consumes now: its counter file appears (hook signatures of both peers accepted)."""
    _view()


def completed(slot: int = 0) -> None:
    """One message of `slot` was handled."""
    now = time.time()
    view = _view()
    with _Mine.lock:
        view[slot * _FIELDS] += 1
        if now > view[slot * _FIELDS + 1]:
            view[slot * _FIELDS + 1] = now


def read(directory: Path) -> dict[str, Any]:
    """The counters of every worker process that wrote to `directory`, added up (bench_probe's shape)."""
    slots = [[0.0, 0.0, 0.0] for _ in range(SLOTS)]
    processes = 0
    for path in directory.glob("*.counts"):
        data = memoryview(path.read_bytes()).cast("d")
        if len(data) != SLOTS * _FIELDS:
            continue  # being created
        processes += 1
        for slot in range(SLOTS):
            count, last, failed = data[slot * _FIELDS:(slot + 1) * _FIELDS]
            slots[slot] = [slots[slot][0] + count, max(slots[slot][1], last), slots[slot][2] + failed]
    return {"slots": slots, "processes": processes}
