"""What the handlers need from the outside world, as protocols (adapters implement them)."""
from __future__ import annotations

from typing import Protocol

from handlers.messages import OrderLine


class OrderRepository(Protocol):
    def add(self, order_id: str, customer_id: str, lines: list[OrderLine], total: str) -> None: ...
    def exists(self, order_id: str) -> bool: ...


class UserRepository(Protocol):
    def add(self, user_id: str, email: str, name: str) -> None: ...
    def email_taken(self, email: str) -> bool: ...
