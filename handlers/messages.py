"""The contracts of the reference domain (from the source articles)."""
from __future__ import annotations

from decimal import Decimal

from pydantic import BaseModel, ConfigDict, EmailStr, Field, PositiveInt

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
    """An order was stored; billing charges it, notifications thank the customer, fulfilment reserves its lines."""

    order_id: str
    customer_id: str
    total: Decimal
    #: units ordered per SKU (empty from publishers older than fulfilment: nothing to reserve)
    quantities: dict[str, int] = Field(default_factory=dict)


class CancelOrder(Command, boundary="orders", natural_key=("order_id",)):
    """Cancel an order that will not be shipped (sent by fulfilment: no payment in time, or out of stock)."""

    order_id: str = Field(min_length=1)
    reason: str = Field(min_length=1)


class PaymentProcessed(Event, boundary="billing"):
    """The payment gateway charged an order."""

    order_id: str
    amount: Decimal
    charge_id: str


class RefundPayment(Command, boundary="billing", natural_key=("charge_id",)):
    """Give a charge back (sent by fulfilment: the order was cancelled after, or before, it was charged)."""

    order_id: str = Field(min_length=1)
    charge_id: str = Field(min_length=1)
    amount: Decimal


class ReserveStock(Command, boundary="inventory", natural_key=("order_id",)):
    """Set an order's units aside: all of them, or none (sent by fulfilment when the order is placed)."""

    order_id: str = Field(min_length=1)
    #: units per SKU
    quantities: dict[str, PositiveInt]


class StockReserved(Event, boundary="inventory"):
    """Every unit of an order is set aside."""

    order_id: str


class OutOfStock(Event, boundary="inventory"):
    """An order's units could not all be set aside (`skus`: those short); nothing of it is reserved."""

    order_id: str
    skus: list[str]


class ShipOrder(Command, boundary="shipping", natural_key=("order_id",)):
    """Ship a paid order whose stock is reserved (sent by fulfilment)."""

    order_id: str = Field(min_length=1)


class UserAccountCreated(Event, boundary="accounts"):
    """A user account exists; welcome e-mail, audit log and SMS follow."""

    user_id: str
    email: str
    name: str
