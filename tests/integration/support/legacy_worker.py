"""A worker of another deployment that serves `orders.place_order` with its own handler.

Think of an older release of the shop that predates the bus's start-up owner check:
a plain Celery app (not ours) consuming the same command queue. It answers the bus's
`bus_owners` remote-control query like a bus worker would, naming its own handler, so
`bus check` and starting bus workers can see it.

    celery -A tests.integration.support.legacy_worker worker -Q orders.place_order
"""
import os

from celery import Celery
from celery.worker.control import inspect_command

HANDLER = "legacy_shop.place_order"

app = Celery("legacy-shop", broker=os.environ["CELERY_BROKER_URL"])


@app.task(name="orders.place_order")
def place_order(**fields):
    return {"placed_by": HANDLER}


@inspect_command()
def bus_owners(state):
    """The command queues this worker serves, and with which handler."""
    return {queue: HANDLER for queue in state.consumer.app.amqp.queues.consume_from}
