"""Small helpers shared by the integration tests (no fixtures here)."""
from __future__ import annotations

import socket

ITEMS = [{"sku": "book", "quantity": 2, "unit_price": "12.50"}, {"sku": "pen", "quantity": 1, "unit_price": "1.99"}]
#: the total of ITEMS, as the handler computes it
ITEMS_TOTAL = "26.99"
PLACE_ORDER = "orders.place_order"
REGISTER_USER = "accounts.register_user"
PLACE_ORDER_CONTRACT = "handlers.messages.PlaceOrder"
REGISTER_USER_CONTRACT = "handlers.messages.RegisterUser"


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


def free_port() -> int:
    """A TCP port nothing listens on at the moment (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
