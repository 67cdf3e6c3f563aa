"""The orders boundary: placing an order. Pure business logic, no Celery."""
from __future__ import annotations

from handlers.messages import OrderPlaced, PlaceOrder
from handlers.ports import OrderRepository
from project.contracts import EventSink


def place_order(cmd: PlaceOrder, *, orders: OrderRepository, events: EventSink) -> dict:
    """Store the order, record the fact, return its id and total."""
    total = sum((line.unit_price * line.quantity for line in cmd.items), start=0)
    orders.add(cmd.order_id, cmd.customer_id, list(cmd.items), f"{total:.2f}")
    events.publish(OrderPlaced(order_id=cmd.order_id, customer_id=cmd.customer_id, total=total))
    return {"order_id": cmd.order_id, "total": f"{total:.2f}"}
