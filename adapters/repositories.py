"""SQLAlchemy repositories: they write through the unit of work's session (one transaction)."""
from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from adapters.orm import orders, users
from handlers.messages import OrderLine
from project.store.tables import utcnow


class SqlOrderRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, order_id: str, customer_id: str, lines: list[OrderLine], total: str) -> None:
        self.session.execute(orders.insert().values(
            order_id=order_id, customer_id=customer_id, total=total, placed_at=utcnow(),
            lines=[line.model_dump(mode="json") for line in lines]))

    def exists(self, order_id: str) -> bool:
        return self.session.execute(select(orders.c.order_id).where(orders.c.order_id == order_id)).first() is not None


class SqlUserRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, user_id: str, email: str, name: str) -> None:
        self.session.execute(users.insert().values(user_id=user_id, email=email, name=name, created_at=utcnow()))

    def email_taken(self, email: str) -> bool:
        return self.session.execute(select(users.c.user_id).where(users.c.email == email)).first() is not None
