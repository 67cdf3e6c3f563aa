"""Routing by the naming rule: a bus task's queue is its name. No hand-written table."""
from __future__ import annotations

import re
from typing import Any

_BUS_NAME = re.compile(r"^[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*$")


def route_by_name(name: str, args: Any = None, kwargs: Any = None, options: Any = None,
                  task: Any = None, **kw: Any) -> dict[str, str] | None:
    """`orders.place_order` -> queue `orders.place_order`; other tasks keep Celery's routing.

    Events (`events.*`) are published to their fanout exchange by the outbox, never routed here.
    """
    if _BUS_NAME.match(name) and not name.startswith(("celery.", "events.", "bus.")):
        return {"queue": name}
    return None
