"""Binds the notifications boundary's subscribers to the bus."""
from handlers import notifications
from handlers.messages import OrderPlaced, UserAccountCreated
from project import bus
from tasks import wiring  # noqa: F401  (providers)

send_order_confirmation = bus.subscriber(OrderPlaced, boundary="notifications")(notifications.send_order_confirmation)
send_welcome_email = bus.subscriber(UserAccountCreated, boundary="notifications")(notifications.send_welcome_email)
send_welcome_sms = bus.subscriber(UserAccountCreated, boundary="notifications")(notifications.send_welcome_sms)
