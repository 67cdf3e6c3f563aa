"""The orders boundary: placing and cancelling an order. Pure business logic, no Celery."""
from __future__ import annotations

from handlers.messages import CancelOrder, OrderPlaced, PlaceOrder
from handlers.ports import OrderRepository
from project.contracts import EventSink


def place_order(cmd: PlaceOrder, *, orders: OrderRepository, events: EventSink) -> dict:
    """Store the order, record the fact, return its id and total."""
    total = sum((line.unit_price * line.quantity for line in cmd.items), start=0)
    orders.add(cmd.order_id, cmd.customer_id, list(cmd.items), f"{total:.2f}")
    quantities: dict[str, int] = {}
    for line in cmd.items:
        quantities[line.sku] = quantities.get(line.sku, 0) + line.quantity
    events.publish(OrderPlaced(order_id=cmd.order_id, customer_id=cmd.customer_id, total=total,
                               quantities=quantities))
    return {"order_id": cmd.order_id, "total": f"{total:.2f}"}


def cancel_order(cmd: CancelOrder, *, orders: OrderRepository) -> None:
    """Record that the order will not be shipped, and why (fulfilment decides: project/process/)."""
    orders.cancel(cmd.order_id, cmd.reason)
