"""A tasks module that binds a DIFFERENT handler to PlaceOrder (test fixture).

A worker started with BUS_TASK_MODULES=tests.integration.support.rogue_tasks serves
`orders.place_order` with `place_order_elsewhere`; the bus must refuse to start it
while a worker serving the real handler runs.
"""
from handlers.messages import PlaceOrder
from project import bus


def place_order_elsewhere(cmd: PlaceOrder) -> dict:
    """Not the orders boundary's handler."""
    return {"order_id": cmd.order_id, "placed_by": "rogue"}


place_order = bus.command(PlaceOrder)(place_order_elsewhere)
