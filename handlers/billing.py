"""The billing boundary: charge placed orders. Pure business logic, no Celery."""
from __future__ import annotations

from handlers.messages import OrderPlaced, PaymentProcessed
from handlers.ports import PaymentGateway
from project.contracts import EventSink, MessageContext


def charge_payment(event: OrderPlaced, *, gateway: PaymentGateway, events: EventSink,
                   context: MessageContext) -> None:
    """Charge the order's total once: the gateway gets a key stable per (event, subscriber)."""
    charge_id = gateway.charge(event.customer_id, event.total, idempotency_key=context.idempotency_key)
    events.publish(PaymentProcessed(order_id=event.order_id, amount=event.total, charge_id=charge_id))
