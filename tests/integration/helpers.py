"""Small helpers shared by the integration tests (no fixtures here)."""
from __future__ import annotations

ITEMS = [{"sku": "book", "quantity": 2, "unit_price": "12.50"}, {"sku": "pen", "quantity": 1, "unit_price": "1.99"}]
#: the total of ITEMS, as the handler computes it
ITEMS_TOTAL = "26.99"
PLACE_ORDER = "orders.place_order"
REGISTER_USER = "accounts.register_user"
PLACE_ORDER_CONTRACT = "handlers.messages.PlaceOrder"
REGISTER_USER_CONTRACT = "handlers.messages.RegisterUser"

#: project/worker.py BusStartup asks the cluster who owns each command queue with
#: app.control.broadcast() on a connection of the app's pool, before the pool forks. On
#: Redis that connection is left with a BRPOP in flight; kombu's after-fork cleanup in
#: each child closes it and waits for the BRPOP reply, which the first child already
#: read: every child after the first hangs at birth. The worker then runs on one
#: process, and a warm shutdown (SIGTERM) waits for the hung child forever.
FORK_HANG = ("bug in project/worker.py (BusStartup): the owner broadcast leaves a pooled Redis connection "
             "with a BRPOP in flight; forked pool children hang closing it, so -c 2 runs on one process")


def order(order_id: str, customer_id: str = "c-1", items: list | None = None) -> dict:
    """The fields of a PlaceOrder."""
    return {"order_id": order_id, "customer_id": customer_id, "items": items or ITEMS}


def queues_of(topology: dict, boundary: str | None = None) -> set[str]:
    """Command and subscriber queues of `boundary` (all when None), per `bus topology --json`."""
    queues = {c["queue"] for c in topology["commands"] if boundary in (None, c["boundary"])}
    queues |= {s["queue"] for e in topology["events"] for s in e["subscribers"]
               if boundary in (None, s["boundary"])}
    return queues


def boundaries_of(topology: dict) -> set[str]:
    return {c["boundary"] for c in topology["commands"]} | {
        s["boundary"] for e in topology["events"] for s in e["subscribers"]}
