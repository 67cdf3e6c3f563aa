"""The harness and commands handled by another service.

A handler of this service may send a command whose handler lives in another service
(`commands.send(ShipOrder(...))`, handled by the shipping service's workers). On a
broker the command waits on its queue for that service; nothing here runs it. The
harness did run it: it found no handler, counted a KeyError as a 'dead-lettered' run,
and `sent(ShipOrder)` was empty, since it rebuilt sent commands from this registry only.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import pytest
from celery import Celery

from project.contracts import Command, CommandSender
from project.core import Bus
from project.testing.harness import BusHarness


class ReserveStock(Command, boundary="stock_here"):
    order_id: str


class ShipOrder(Command, boundary="shipping_elsewhere"):
    order_id: str


def reserve_stock(cmd: ReserveStock, *, commands: CommandSender) -> None:
    commands.send(ShipOrder(order_id=cmd.order_id))


@pytest.fixture
def harness(bus_harness_template: Path, tmp_path: Path) -> Iterator[BusHarness]:
    """A bus whose only handler is reserve_stock (ShipOrder's handler is another service's)."""
    app = Celery("harness-other-services", set_as_current=False)
    app.conf.include = [__name__]
    bus = Bus(app)
    bus.command(ReserveStock)(reserve_stock)
    database = tmp_path / "bus.db"
    shutil.copyfile(bus_harness_template, database)
    with BusHarness(bus, f"sqlite:///{database}") as harness:
        yield harness


def test_a_command_for_another_service_is_sent_and_not_run_here(harness):
    # Given a handler that sends a command of another service
    harness.send(ReserveStock(order_id="o-1"))
    # When the harness runs until idle
    harness.run_until_idle()
    # Then the command is listed as sent, and only this service's handler ran
    assert harness.sent(ShipOrder) == [ShipOrder(order_id="o-1")]
    assert [(run.name, run.outcome) for run in harness.runs] == [("stock_here.reserve_stock", "ran")]
