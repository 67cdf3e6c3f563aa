"""The events driver (clients/events_driver.py) plus relays that start at one instant.

Same protocol and process model as driver.py; it adds:

- `write_orders`: `n` OrderPlaced events committed to the outbox in one transaction,
  published by nobody (what workers that died after their commits leave behind);
- `relays_together`: `relays` threads at one barrier, each running `outbox.relay` on a
  connection of its own (the engine's pool gives each thread its own), as beat's relay
  task and `bus relay` do when their runs overlap;
- `publish_while_relaying`: one thread publishes the rows one by one as workers do
  after their commits (`outbox.publish`), another relays with no grace, at one barrier.
"""
from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))  # the repository root

from handlers.messages import OrderPlaced  # noqa: E402
from project import bus  # noqa: E402
from project.messaging import outbox
from project.store.uow import UnitOfWork  # noqa: E402
from tests.integration.support.clients import driver as base  # noqa: E402
from tests.integration.support.clients import events_driver  # noqa: E402,F401  (its operations join base.OPS)


def write_orders(n: int, tag: str) -> list[str]:
    """`n` OrderPlaced events in the outbox, committed and unpublished; their row ids."""
    with UnitOfWork(bus.engine()) as uow:
        written = []
        for i in range(n):
            sink = outbox.OutboxSink(uow.session, "orders", f"orders.place_order:{tag}-{i}")
            sink.publish(OrderPlaced(order_id=f"o-{tag}-{i}", customer_id=f"c-{tag}-{i}", total=Decimal("1.00")))
            written += sink.written
        uow.commit()
    return written


def _together(jobs: list[Callable[[], int]]) -> list[int]:
    """Run `jobs` in threads released at one barrier; what each returned."""
    barrier = threading.Barrier(len(jobs))

    def run(job: Callable[[], int]) -> int:
        barrier.wait(30)
        return job()

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(run, jobs))


def relays_together(relays: int, batch: int = 500) -> list[int]:
    """`relays` relays (no grace) started at one instant; the rows each published."""
    return _together([lambda: outbox.relay(bus.wiring, batch=batch, grace=timedelta(0))] * relays)


def publish_while_relaying(ids: list[str]) -> dict[str, Any]:
    """Workers' publishes after commit (one row each) and a relay, started at one instant."""
    def workers() -> int:
        return sum(outbox.publish(bus.wiring, [row_id]) for row_id in ids)

    published, relayed = _together([workers, lambda: outbox.relay(bus.wiring, batch=50, grace=timedelta(0))])
    return {"published": published, "relayed": relayed}


base.OPS.update({f.__name__: f for f in (write_orders, relays_together, publish_while_relaying)})

if __name__ == "__main__":
    base.main()
