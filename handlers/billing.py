"""The billing boundary: charge placed orders, refund cancelled ones. Pure business logic, no Celery."""
from __future__ import annotations

from handlers.messages import OrderPlaced, PaymentProcessed, RefundPayment
from handlers.ports import PaymentGateway
from project.contracts import EventSink, MessageContext


def charge_payment(event: OrderPlaced, *, gateway: PaymentGateway, events: EventSink,
                   context: MessageContext) -> None:
    """Charge the order's total once: the gateway gets a key stable per (event, subscriber)."""
    charge_id = gateway.charge(event.customer_id, event.total, idempotency_key=context.idempotency_key)
    events.publish(PaymentProcessed(order_id=event.order_id, amount=event.total, charge_id=charge_id))


def refund_payment(cmd: RefundPayment, *, gateway: PaymentGateway) -> None:
    """Give the charge back once: the gateway's key is the charge's, whoever asks and however often."""
    gateway.refund(cmd.charge_id, cmd.amount, idempotency_key=f"refund:{cmd.charge_id}")
