"""The registry: one handler per command, in the contract's boundary; subscribers for events only."""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from handlers import orders
from handlers.messages import OrderPlaced, PlaceOrder, RegisterUser
from project.errors import DuplicateCommandHandler, NotACommand, WrongBoundary
from project.messaging.registry import Registry
from tests.conftest import REPO


def place_order_here(cmd: PlaceOrder) -> dict:
    return {}


def place_order_there(cmd: PlaceOrder) -> dict:
    return {}


def where(func) -> str:
    """`module.name (file:line)` as an operator would look it up."""
    return f"{func.__module__}.{func.__qualname__} ({inspect.getsourcefile(func)}:{func.__code__.co_firstlineno})"


def test_a_second_handler_for_a_command_names_both_handlers_and_their_files():
    # Given PlaceOrder is handled by one function
    registry = Registry()
    registry.add_command(PlaceOrder, place_order_here)

    # When another function is bound to it
    with pytest.raises(DuplicateCommandHandler) as error:
        registry.add_command(PlaceOrder, place_order_there)

    # Then the error names both, where they live, and the fix; the first binding stays
    message = str(error.value)
    assert f"PlaceOrder is already handled by {where(place_order_here)}" in message
    assert f"{where(place_order_there)} cannot handle it too" in message
    assert "A command has exactly one handler" in message
    assert registry.commands["orders.place_order"].handler is place_order_here


def test_binding_the_same_handler_again_is_harmless():
    # Given a module imported twice (e.g. under two names), binding the same function again
    registry = Registry()
    first = registry.add_command(PlaceOrder, place_order_here)
    again = registry.add_command(PlaceOrder, place_order_here)
    assert again == first and len(registry.commands) == 1


def test_two_modules_binding_one_command_fail_at_import_in_one_process(tmp_path: Path):
    # Given the real tasks.orders, and another module that binds PlaceOrder to its own handler
    (tmp_path / "second_owner.py").write_text(textwrap.dedent("""\
        from handlers.messages import PlaceOrder
        from project import bus


        def place_order_too(cmd: PlaceOrder) -> dict:
            return {}


        bus.command(PlaceOrder)(place_order_too)
    """))
    # When one process imports both
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "BUS_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", "import tasks.orders, second_owner"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)

    # Then the import fails with DuplicateCommandHandler naming both handlers and files
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("project.errors.DuplicateCommandHandler: PlaceOrder is already handled by "
                           f"{where(orders.place_order)}")
    assert f"second_owner.place_order_too ({tmp_path / 'second_owner.py'}:5) cannot handle it too" in last


def test_a_handler_outside_the_contracts_boundary_is_refused_with_a_hint():
    # When billing tries to handle the orders boundary's command
    with pytest.raises(WrongBoundary) as error:
        Registry().add_command(PlaceOrder, place_order_here, boundary="billing")
    # Then it is told where the handler belongs
    assert "PlaceOrder belongs to boundary 'orders'; it cannot be handled in 'billing'" in str(error.value)
    assert "Move the handler to the 'orders' boundary" in str(error.value)


def test_the_contracts_own_boundary_is_accepted():
    binding = Registry().add_command(PlaceOrder, place_order_here, boundary="orders")
    assert (binding.name, binding.boundary, binding.handler_name) == (
        "orders.place_order", "orders", f"{__name__}.place_order_here")


@pytest.mark.parametrize("not_a_command, hint", [
    (OrderPlaced, "events take subscribers: use bus.subscriber()"),
    ({"order_id": "o-1"}, "declare `class X(Command, boundary=...)`"),
    (PlaceOrder(order_id="o", customer_id="c", items=[{"sku": "a", "quantity": 1, "unit_price": "1"}]),
     "takes a Command contract class"),
    (dict, "takes a Command contract class"),
], ids=["event-class", "dict", "command-instance", "other-class"])
def test_only_command_classes_take_a_handler(not_a_command, hint):
    with pytest.raises(NotACommand) as error:
        Registry().add_command(not_a_command, place_order_here)
    assert hint in str(error.value)


def test_a_subscriber_binds_an_event_in_its_own_boundary():
    def charge(event: OrderPlaced) -> None: ...

    binding = Registry().add_subscriber(OrderPlaced, charge, "billing")
    assert (binding.name, binding.boundary, binding.contract) == ("billing.charge", "billing", OrderPlaced)


@pytest.mark.parametrize("not_an_event, hint", [
    (PlaceOrder, "a command has one handler: use bus.command()"),
    (RegisterUser, "a command has one handler: use bus.command()"),
    ({"order_id": "o-1"}, "takes an Event contract class"),
], ids=["command", "other-command", "dict"])
def test_a_subscriber_takes_only_an_event(not_an_event, hint):
    with pytest.raises(TypeError) as error:
        Registry().add_subscriber(not_an_event, place_order_here, "billing")
    assert hint in str(error.value)


def test_boundaries_are_those_of_commands_and_subscribers():
    registry = Registry()
    registry.add_command(PlaceOrder, place_order_here)
    registry.add_subscriber(OrderPlaced, place_order_there, "billing")
    assert registry.boundaries() == {"orders", "billing"}
