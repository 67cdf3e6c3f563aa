"""The notifications boundary: tell people what happened. Pure business logic, no Celery."""
from __future__ import annotations

from handlers.messages import OrderPlaced, UserAccountCreated
from handlers.ports import Mailer, SmsSender


def send_order_confirmation(event: OrderPlaced, *, mailer: Mailer) -> None:
    """Thank the customer for the order."""
    mailer.send(f"{event.customer_id}@customers.example", f"Thank you for order {event.order_id}",
                f"We received your order {event.order_id} of {event.total}.")


def send_welcome_email(event: UserAccountCreated, *, mailer: Mailer) -> None:
    """Welcome the new user by e-mail."""
    mailer.send(event.email, "Welcome!", f"Hello {event.name}, your account is ready.")


def send_welcome_sms(event: UserAccountCreated, *, sms: SmsSender) -> None:
    """Welcome the new user by SMS."""
    sms.send(event.user_id, f"Welcome, {event.name}!")
