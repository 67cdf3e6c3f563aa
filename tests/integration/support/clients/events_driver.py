"""The sending driver (clients/driver.py) plus the outbox operations the event tests need.

Same protocol and process model as driver.py (one JSON request per line on stdin, one
reply per line on stdout, configured from the scenario's environment); it adds:

- `write_event`: write events into the outbox with `OutboxSink` in a committed
  `UnitOfWork`, and publish nothing: the state a worker leaves when it dies right
  after its commit, before `publish_after_commit`;
- `publish_outbox`: `project.messaging.outbox.publish(bus.wiring, ids)`, what a worker does after commit;
- `relay`: `project.messaging.outbox.relay(bus.wiring, grace=...)`, what `bus relay` and beat do.
"""
from __future__ import annotations

import importlib
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))  # the repository root

# Importing the base driver moves library output off the protocol stream and loads the
# bus with every tasks module (as a worker does); its OPS table is extended below.
from project import bus  # noqa: E402
from project.messaging import outbox
from project.store.uow import UnitOfWork  # noqa: E402
from tests.integration.support.clients import driver as base  # noqa: E402


def write_event(contract: str, fields: dict[str, Any], boundary: str, origin: str) -> list[str]:
    """Write one event into the outbox, commit, publish nothing; the outbox row ids."""
    module, _, name = contract.rpartition(".")
    event = getattr(importlib.import_module(module), name)(**fields)
    with UnitOfWork(bus.engine()) as uow:
        sink = outbox.OutboxSink(uow.session, boundary, origin)
        sink.publish(event)
        uow.commit()
    return sink.written


def publish_outbox(ids: list[str]) -> int:
    """Publish these outbox rows now, as a worker does after its commit; the number published."""
    return outbox.publish(bus.wiring, ids)


def relay(grace_seconds: float = 0.0) -> int:
    """Publish every unpublished outbox row older than the grace; the number published."""
    return outbox.relay(bus.wiring, grace=timedelta(seconds=grace_seconds))


base.OPS.update({f.__name__: f for f in (write_event, publish_outbox, relay)})

if __name__ == "__main__":
    base.main()
