"""Binds the inventory boundary's handlers to the bus."""
from handlers import inventory
from handlers.messages import ReserveStock
from project import bus
from tasks import wiring  # noqa: F401  (providers)

reserve_stock = bus.command(ReserveStock)(inventory.reserve_stock)
