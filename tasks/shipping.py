"""Binds the shipping boundary's handlers to the bus."""
from handlers import shipping
from handlers.messages import ShipOrder
from project import bus
from tasks import wiring  # noqa: F401  (providers)

ship_order = bus.command(ShipOrder)(shipping.ship_order)
