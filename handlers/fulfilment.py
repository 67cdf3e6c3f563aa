"""Fulfilment: the process manager that ships a placed order once it is paid and its stock reserved.

Pure business logic, no Celery: a state model and one handler per event or timeout, each
`handler(state, message, process)`. tasks/fulfilment.py declares which event starts an
instance and how events find it (`order_id`); docs/process-managers.md has the orderings
table and the state diagram drawn from that declaration.

- OrderPlaced: send ReserveStock, and wait PAYMENT_WINDOW for the payment (unless it came first);
- PaymentProcessed and StockReserved, in either order: ShipOrder, done;
- no payment within PAYMENT_WINDOW, or OutOfStock: CancelOrder;
- a cancelled order that is (or gets) charged: RefundPayment, done. Billing charges every
  placed order on its own, so a cancelled order still waits LATE_PAYMENT_WINDOW for a late
  charge to give back before it is done.
"""
from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any, Optional, Protocol

from pydantic import BaseModel

from handlers.messages import (
    CancelOrder,
    OrderPlaced,
    OutOfStock,
    PaymentProcessed,
    RefundPayment,
    ReserveStock,
    ShipOrder,
    StockReserved,
)
from project.contracts import CommandSender

#: how long a placed order waits for its payment before it is cancelled
PAYMENT_WINDOW = timedelta(minutes=30)
#: how long a cancelled, unpaid order waits for a late charge to refund before it is done
LATE_PAYMENT_WINDOW = timedelta(days=1)


class Process(Protocol):
    """What a step may do with its instance (the bus passes project/process/context.py's Process)."""

    instance_id: str
    commands: CommandSender

    def request_timeout(self, name: str, after: timedelta, data: Optional[dict[str, Any]] = None) -> str: ...
    def cancel_timeout(self, name: str) -> None: ...
    def complete(self) -> None: ...


class Fulfilment(BaseModel):
    """One order on its way: what has happened to it so far."""

    placed: bool = False
    paid: bool = False
    reserved: bool = False
    #: why the order was cancelled (None: it was not)
    cancelled: Optional[str] = None
    charge_id: Optional[str] = None
    amount: Optional[Decimal] = None
    shipped: bool = False
    refunded: bool = False


def on_order_placed(state: Fulfilment, event: OrderPlaced, process: Process) -> None:
    """Reserve the order's units; give the payment PAYMENT_WINDOW unless it arrived first."""
    state.placed = True
    process.commands.send(ReserveStock(order_id=event.order_id, quantities=event.quantities))
    if not state.paid:
        process.request_timeout("payment", after=PAYMENT_WINDOW)


def on_payment_processed(state: Fulfilment, event: PaymentProcessed, process: Process) -> None:
    """Paid: ship if the stock is reserved; refund if the order is cancelled already."""
    state.paid, state.charge_id, state.amount = True, event.charge_id, event.amount
    process.cancel_timeout("payment")
    if state.cancelled:
        process.commands.send(RefundPayment(order_id=event.order_id, charge_id=event.charge_id, amount=event.amount))
        state.refunded = True
        process.complete()
    elif state.reserved:
        process.commands.send(ShipOrder(order_id=event.order_id))
        state.shipped = True
        process.complete()


def on_stock_reserved(state: Fulfilment, event: StockReserved, process: Process) -> None:
    """Reserved: ship if paid (a cancelled order ships nothing: it waits for a late charge only)."""
    state.reserved = True
    if state.paid and not state.cancelled:
        process.commands.send(ShipOrder(order_id=event.order_id))
        state.shipped = True
        process.complete()


def on_out_of_stock(state: Fulfilment, event: OutOfStock, process: Process) -> None:
    """Nothing to ship: cancel; refund the charge if there is one, else wait for a late one."""
    if state.cancelled:  # cancelled by the payment timeout already
        return
    state.cancelled = f"out of stock: {', '.join(event.skus)}"
    process.commands.send(CancelOrder(order_id=event.order_id, reason=state.cancelled))
    if state.paid:
        process.commands.send(RefundPayment(order_id=event.order_id, charge_id=state.charge_id, amount=state.amount))
        state.refunded = True
        process.complete()
    else:
        process.cancel_timeout("payment")
        process.request_timeout("late_payment", after=LATE_PAYMENT_WINDOW)


def on_payment_timeout(state: Fulfilment, timeout: Any, process: Process) -> None:
    """No payment within PAYMENT_WINDOW (a payment cancels this timeout): cancel, wait for a late charge."""
    state.cancelled = f"no payment within {PAYMENT_WINDOW}"
    process.commands.send(CancelOrder(order_id=process.instance_id, reason=state.cancelled))
    process.request_timeout("late_payment", after=LATE_PAYMENT_WINDOW)


def on_late_payment_window(state: Fulfilment, timeout: Any, process: Process) -> None:
    """A cancelled order was not charged after all: nothing to give back."""
    process.complete()
