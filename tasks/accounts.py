"""Binds the accounts boundary's handlers to the bus."""
from handlers import accounts
from handlers.messages import RegisterUser
from project import bus
from tasks import wiring  # noqa: F401  (providers)

register_user = bus.command(RegisterUser)(accounts.register_user)
