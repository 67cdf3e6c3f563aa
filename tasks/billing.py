"""Binds the billing boundary's handlers to the bus."""
from handlers import billing
from handlers.messages import OrderPlaced, RefundPayment
from project import bus
from project.messaging.retry import Backoff
from tasks import wiring  # noqa: F401  (providers)

charge_payment = bus.subscriber(OrderPlaced, boundary="billing",
                                retry=Backoff(max_retries=8, base=0.5, cap=30.0))(billing.charge_payment)
refund_payment = bus.command(RefundPayment)(billing.refund_payment)
