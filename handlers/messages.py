"""The contracts of the reference domain (from the source articles)."""
from __future__ import annotations

from decimal import Decimal

from pydantic import BaseModel, ConfigDict, EmailStr, Field

from project.contracts import Command, Event


class OrderLine(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    sku: str = Field(min_length=1)
    quantity: int = Field(gt=0)
    unit_price: Decimal = Field(ge=0, decimal_places=2)


class PlaceOrder(Command, boundary="orders", natural_key=("order_id",)):
    """Place a customer's order; the order id is its natural idempotency key."""

    order_id: str = Field(min_length=1)
    customer_id: str = Field(min_length=1)
    items: list[OrderLine] = Field(min_length=1)


class RegisterUser(Command, boundary="accounts"):
    """Create a user account; an e-mail address belongs to one account."""

    user_id: str = Field(min_length=1)
    email: EmailStr
    name: str = Field(min_length=1)


class OrderPlaced(Event, boundary="orders"):
    """An order was stored; billing charges it, notifications thank the customer."""

    order_id: str
    customer_id: str
    total: Decimal


class PaymentProcessed(Event, boundary="billing"):
    """The payment gateway charged an order."""

    order_id: str
    amount: Decimal
    charge_id: str


class UserAccountCreated(Event, boundary="accounts"):
    """A user account exists; welcome e-mail, audit log and SMS follow."""

    user_id: str
    email: str
    name: str
