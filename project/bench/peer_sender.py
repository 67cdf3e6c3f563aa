"""The sending process of `bus bench --peers`: `python -m project.bench.peer_sender dramatiq|faststream`.

The same line protocol as project/bench/sender.py (its `serve`), for the peer named on
the command line, configured by the environment the bench gives it (BUS_BENCH_PEER_URL,
BUS_BENCH_SUBSCRIBERS). Operations (times in epoch seconds, taken right before the
first and after the last send):
- `burst {kind, n, start}`: send `n` messages as fast as one thread can (`kind`: `noop`,
  or `fan`, one message to the fanout every subscriber gets a copy of); seq from `start`;
- `warm`: connect (and declare) before anything is timed.
"""
from __future__ import annotations

import importlib
import sys
import time
from typing import Any

from project.bench.sender import serve


def burst(side: Any, kind: str, n: int, start: int = 0) -> dict[str, Any]:
    first = time.time()
    side.burst(kind, range(start, start + n))
    return {"first": first, "last": time.time(), "sent": n}


def warm(side: Any) -> dict[str, Any]:
    side.warm()
    return {"ok": True}


def main() -> None:
    serve(lambda: importlib.import_module(f"project.bench.peer_{sys.argv[1]}").sender(), {"burst": burst, "warm": warm})


if __name__ == "__main__":
    main()
