"""The shipping boundary: send a paid, reserved order on its way. Pure business logic, no Celery."""
from __future__ import annotations

from handlers.messages import ShipOrder
from handlers.ports import Shipments


def ship_order(cmd: ShipOrder, *, shipments: Shipments) -> None:
    """Hand the order to the carrier (recorded as a shipment)."""
    shipments.ship(cmd.order_id)
