"""Binds the audit boundary's subscribers to the bus."""
from handlers import audit
from handlers.messages import UserAccountCreated
from project import bus
from tasks import wiring  # noqa: F401  (providers)

record_user_created = bus.subscriber(UserAccountCreated, boundary="audit")(audit.record_user_created)
