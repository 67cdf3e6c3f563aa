"""A tasks module for the process-manager tests (tests/integration/test_process_managers.py).

A worker loads it next to the shop's wiring (audit provider):
BUS_TASK_MODULES=tests.integration.support.process_tasks. The process manager `parcel`
(boundary `pmlab`) waits for `PartPaid` and `PartPacked` of one order, either of which may
start it; once both have arrived it sends `ShipParcel` and completes. Each handler changes
the state and sends what it sends, then holds `hold` seconds before the step saves, so that
two steps of one order on two workers read the same version and race for the save (or a
timeout runs meanwhile, or the test SIGKILLs the process). A handler that holds leaves a
marker `<BUS_HOME>/parcels/<order id>.<paid|packed>.<pid>.<time ns>` first (which pool
process runs it, how many times it ran), and stops holding early once the test creates
`<BUS_HOME>/parcels/<order id>.release`. `ShipParcel` has no natural key: a second send
would be a second command (and a second audit), not a duplicate absorbed.
A PartPaid with `packing_within` seconds asks for the timeout "packing" (PartPacked cancels
it); when it fires first, it sends `CancelParcel` and completes the instance.
"""
from __future__ import annotations

import os
import time

from pydantic import BaseModel, Field

from project import bus
from project.contracts import Command, Event
from project.messaging.retry import Backoff
from tasks import wiring  # noqa: F401  (providers: audit)


class PartPaid(Event, boundary="pmpay"):
    order_id: str
    hold: float = Field(default=0.0, ge=0, le=10)
    packing_within: float = Field(default=0.0, ge=0, le=3600)


class PartPacked(Event, boundary="pmpack"):
    order_id: str
    hold: float = Field(default=0.0, ge=0, le=10)


class ShipParcel(Command, boundary="pmship"):
    order_id: str


class CancelParcel(Command, boundary="pmship"):
    order_id: str
    reason: str


class Parcel(BaseModel):
    paid: bool = False
    packed: bool = False


def ship_when_both(state: Parcel, process) -> None:
    if state.paid and state.packed:
        process.commands.send(ShipParcel(order_id=process.instance_id))
        process.complete()


def hold(event: PartPaid | PartPacked, kind: str) -> None:
    """Leave this run's marker, then hold `event.hold` seconds, or until the order's release file exists."""
    if not event.hold:
        return
    marks = bus.settings.home / "parcels"
    marks.mkdir(parents=True, exist_ok=True)
    (marks / f"{event.order_id}.{kind}.{os.getpid()}.{time.time_ns()}").touch()
    release, until = marks / f"{event.order_id}.release", time.monotonic() + event.hold
    while not release.exists() and time.monotonic() < until:
        time.sleep(0.05)


def on_paid(state: Parcel, event: PartPaid, process) -> None:
    state.paid = True
    if event.packing_within and not state.packed:
        process.request_timeout("packing", after=event.packing_within, data={"reason": "not packed in time"})
    ship_when_both(state, process)
    hold(event, "paid")


def on_packed(state: Parcel, event: PartPacked, process) -> None:
    state.packed = True
    process.cancel_timeout("packing")
    ship_when_both(state, process)
    hold(event, "packed")


def on_packing_timeout(state: Parcel, timeout, process) -> None:
    process.commands.send(CancelParcel(order_id=process.instance_id, reason=timeout.data["reason"]))
    process.complete()


def ship_parcel(cmd: ShipParcel, *, audit) -> None:
    audit.record("ship-parcel", cmd.order_id)


def cancel_parcel(cmd: CancelParcel, *, audit) -> None:
    audit.record("cancel-parcel", cmd.order_id)


#: a lost race is retried within about a second (Celery publishes a countdown in whole seconds)
parcel = bus.process_manager("parcel", boundary="pmlab", state=Parcel, correlation="order_id",
                             retry=Backoff(max_retries=10, base=0.2, cap=1.0))
parcel.starts(PartPaid, on_paid)
parcel.starts(PartPacked, on_packed)
parcel.on_timeout("packing", on_packing_timeout)
ship_parcel_task = bus.command(ShipParcel)(ship_parcel)
cancel_parcel_task = bus.command(CancelParcel)(cancel_parcel)
