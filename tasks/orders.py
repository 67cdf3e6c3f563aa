"""Binds the orders boundary's handlers to the bus."""
from handlers import orders
from handlers.messages import CancelOrder, PlaceOrder
from project import bus
from tasks import wiring  # noqa: F401  (providers)

place_order = bus.command(PlaceOrder)(orders.place_order)
cancel_order = bus.command(CancelOrder)(orders.cancel_order)
