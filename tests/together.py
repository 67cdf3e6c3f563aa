"""Run callers at one instant: threads released together by a barrier, each on its own connection."""
from __future__ import annotations

import threading
from typing import Any, Callable


def at_one_instant(count: int, ask: Callable[[int], Any], timeout: float = 60.0) -> list[Any]:
    """`ask(0..count-1)`, each in its own thread, all released by one barrier; what each returned or raised."""
    barrier, outcome = threading.Barrier(count), [None] * count

    def run(n: int) -> None:
        barrier.wait()
        try:
            outcome[n] = ask(n)
        except Exception as exc:  # noqa: BLE001 - the caller inspects what each one got
            outcome[n] = exc

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), f"a caller did not return within {timeout}s (a deadlock?)"
    return outcome
