"""The orders boundary: placing an order. Pure business logic, no Celery."""
from __future__ import annotations

from handlers.messages import PlaceOrder
from handlers.ports import OrderRepository


def place_order(cmd: PlaceOrder, *, orders: OrderRepository) -> dict:
    """Store the order and return its id and total."""
    total = sum((line.unit_price * line.quantity for line in cmd.items), start=0)
    orders.add(cmd.order_id, cmd.customer_id, list(cmd.items), f"{total:.2f}")
    return {"order_id": cmd.order_id, "total": f"{total:.2f}"}
