"""The inventory boundary: set an order's stock aside. Pure business logic, no Celery."""
from __future__ import annotations

from handlers.messages import OutOfStock, ReserveStock, StockReserved
from handlers.ports import Stock
from project.contracts import EventSink


def reserve_stock(cmd: ReserveStock, *, stock: Stock, events: EventSink) -> None:
    """Reserve every unit of the order, or none; say which."""
    short = stock.reserve(cmd.order_id, dict(cmd.quantities))
    if short:
        events.publish(OutOfStock(order_id=cmd.order_id, skus=short))
    else:
        events.publish(StockReserved(order_id=cmd.order_id))
