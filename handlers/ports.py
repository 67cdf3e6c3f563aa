"""What the handlers need from the outside world, as protocols (adapters implement them)."""
from __future__ import annotations

from decimal import Decimal
from typing import Protocol

from handlers.messages import OrderLine


class OrderRepository(Protocol):
    def add(self, order_id: str, customer_id: str, lines: list[OrderLine], total: str) -> None: ...
    def cancel(self, order_id: str, reason: str) -> None:
        """Record that the order will not be shipped, and why."""


class UserRepository(Protocol):
    def add(self, user_id: str, email: str, name: str) -> None: ...
    def email_taken(self, email: str) -> bool: ...


class PaymentGateway(Protocol):
    def charge(self, customer_id: str, amount: Decimal, *, idempotency_key: str) -> str:
        """Charge and return the charge id; the same key never charges twice."""

    def refund(self, charge_id: str, amount: Decimal, *, idempotency_key: str) -> None:
        """Give the charge back; the same key never refunds twice."""


class Stock(Protocol):
    def reserve(self, order_id: str, quantities: dict[str, int]) -> list[str]:
        """Set every unit aside, or none: the SKUs short of stock (empty: all reserved)."""


class Shipments(Protocol):
    def ship(self, order_id: str) -> None: ...


class Mailer(Protocol):
    def send(self, to: str, subject: str, body: str) -> None: ...


class SmsSender(Protocol):
    def send(self, to: str, text: str) -> None: ...


class AuditLog(Protocol):
    def record(self, what: str, subject: str) -> None: ...
