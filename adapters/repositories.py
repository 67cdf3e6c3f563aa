"""SQLAlchemy repositories: they write through the unit of work's session (one transaction)."""
from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from adapters.orm import (
    order_cancellations,
    orders,
    shipments,
    stock,
    stock_reservations,
    users,
)
from handlers.messages import OrderLine
from project.store.tables import utcnow


class SqlOrderRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, order_id: str, customer_id: str, lines: list[OrderLine], total: str) -> None:
        self.session.execute(orders.insert().values(
            order_id=order_id, customer_id=customer_id, total=total, placed_at=utcnow(),
            lines=[line.model_dump(mode="json") for line in lines]))

    def cancel(self, order_id: str, reason: str) -> None:
        self.session.execute(order_cancellations.insert().values(order_id=order_id, reason=reason, at=utcnow()))

    def exists(self, order_id: str) -> bool:
        return self.session.execute(select(orders.c.order_id).where(orders.c.order_id == order_id)).first() is not None


class SqlUserRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, user_id: str, email: str, name: str) -> None:
        self.session.execute(users.insert().values(user_id=user_id, email=email, name=name, created_at=utcnow()))

    def email_taken(self, email: str) -> bool:
        return self.session.execute(select(users.c.user_id).where(users.c.email == email)).first() is not None


class SqlStock:
    """Stock per SKU; a reservation takes every line or none, in the handler's transaction."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def reserve(self, order_id: str, quantities: dict[str, int]) -> list[str]:
        taken, short = [], []
        for sku, quantity in sorted(quantities.items()):  # one order of row locks: no deadlock between orders
            done = self.session.execute(update(stock).where(stock.c.sku == sku, stock.c.available >= quantity)
                                        .values(available=stock.c.available - quantity)).rowcount
            (taken if done else short).append(sku)
        if short:  # give back what this order took
            for sku in taken:
                self.session.execute(update(stock).where(stock.c.sku == sku)
                                     .values(available=stock.c.available + quantities[sku]))
            return short
        self.session.execute(stock_reservations.insert().values(order_id=order_id, quantities=quantities,
                                                                at=utcnow()))
        return []


class SqlShipments:
    def __init__(self, session: Session) -> None:
        self.session = session

    def ship(self, order_id: str) -> None:
        self.session.execute(shipments.insert().values(order_id=order_id, at=utcnow()))


def restock(conn: Connection, levels: dict[str, int]) -> None:
    """Set the stock of each SKU to its level (the demo and tests fill the shelves with it)."""
    for sku, available in levels.items():
        if not conn.execute(update(stock).where(stock.c.sku == sku).values(available=available)).rowcount:
            conn.execute(stock.insert().values(sku=sku, available=available))
