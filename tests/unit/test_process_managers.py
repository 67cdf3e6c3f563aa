"""Process managers in the in-process harness: declaration, steps, duplicates, missing instances, timeouts.

The managers are declared here on buses of their own (as test_harness_other_services.py
does), with contracts of this module: the order's events come from other services
(`harness.deliver`), and the commands the manager sends are handled elsewhere (the
harness lists them, `harness.sent(Ship)`, and runs nothing). The harness runs the real
executions: the subscriber's inbox claim, the manager's retry policy, the outbox and
the instances' versioned state (project/store/process_state.py).
"""
from __future__ import annotations

import logging
import shutil
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator

import pytest
from celery import Celery
from pydantic import BaseModel

from project.contracts import Command, Event
from project.core import Bus
from project.errors import ConfigurationError
from project.messaging.retry import Backoff
from project.observe import metrics
from project.process.declaration import ProcessManager
from project.store import process_state
from project.store.process_state import VersionConflict
from project.testing.harness import BusHarness
from tests.statements import statements, until_commit


class OrderOpened(Event, boundary="pmorders"):
    order_id: str


class Paid(Event, boundary="pmbilling"):
    order_id: str
    amount: int = 10


class Reserved(Event, boundary="pmstock"):
    order_id: str


class Refunded(Event, boundary="pmbilling"):
    payment_ref: str


class Ship(Command, boundary="pmshipping"):
    order_id: str


class Cancel(Command, boundary="pmshipping"):
    order_id: str
    reason: str


class Fulfilment(BaseModel):
    paid: bool = False
    reserved: bool = False
    seen: list[str] = []


# ---- handlers: plain functions, (state, event, process) ------------------------------------------
def ship_when_both(state: Fulfilment, process) -> None:
    if state.paid and state.reserved:
        process.commands.send(Ship(order_id=process.instance_id))
        process.complete()


def on_opened(state: Fulfilment, event: OrderOpened, process) -> None:
    state.seen.append("opened")
    process.request_timeout("payment", after=timedelta(minutes=30), data={"why": "payment"})


def on_paid(state: Fulfilment, event: Paid, process) -> None:
    state.paid = True
    state.seen.append("paid")
    process.cancel_timeout("payment")
    ship_when_both(state, process)


def on_reserved(state: Fulfilment, event: Reserved, process) -> Fulfilment:
    changed = state.model_copy(update={"reserved": True, "seen": [*state.seen, "reserved"]})  # a new state
    ship_when_both(changed, process)
    return changed


def on_payment_timeout(state: Fulfilment, timeout, process) -> None:
    process.commands.send(Cancel(order_id=process.instance_id, reason=timeout.data["why"]))
    process.complete()


def declare_fulfil(bus: Bus, **options) -> ProcessManager:
    """Paid and Reserved, in either order, start it; both: Ship, and it completes."""
    fulfil = bus.process_manager("fulfil", boundary="pmlab", state=Fulfilment, correlation="order_id", **options)
    fulfil.starts(Paid, on_paid)
    fulfil.starts(Reserved, on_reserved)
    return fulfil


@pytest.fixture
def make(bus_harness_template: Path, tmp_path: Path) -> Iterator[Callable[[Callable[[Bus], object]], BusHarness]]:
    """`make(declare)`: a harness on a fresh bus (and database) with what `declare(bus)` binds."""
    with ExitStack() as stack:
        def make(declare: Callable[[Bus], object]) -> BusHarness:
            app = Celery("process-managers", set_as_current=False)
            app.conf.include = [__name__]
            bus = Bus(app)
            declare(bus)
            database = tmp_path / f"bus-{len(stack._exit_callbacks)}.db"
            shutil.copyfile(bus_harness_template, database)
            return stack.enter_context(BusHarness(bus, f"sqlite:///{database}"))
        yield make


# ---- both events, either order, duplicated ------------------------------------------------------
@pytest.mark.parametrize("first, second", [(Paid, Reserved), (Reserved, Paid)], ids=["paid-first", "reserved-first"])
def test_both_events_in_either_order_send_one_command_and_complete_the_instance(make, first, second):
    # Given the manager, Paid and Reserved both starting it
    harness = make(declare_fulfil)
    # When the two events of order o-1 arrive, in this order
    harness.deliver(first(order_id="o-1"))
    harness.run_until_idle()
    assert harness.process("fulfil", "o-1").status == "running"
    harness.deliver(second(order_id="o-1"))
    harness.run_until_idle()
    # Then Ship was sent once, and the instance is completed with both applied
    assert harness.sent(Ship) == [Ship(order_id="o-1")]
    instance = harness.process("fulfil", "o-1")
    assert (instance.status, instance.version) == ("completed", 2)
    assert instance.state.paid and instance.state.reserved
    assert instance.completed_at is not None


def test_each_event_delivered_twice_is_applied_once(make):
    # Given the manager
    harness = make(declare_fulfil)
    # When Paid and Reserved each arrive twice (the same event ids: a broker's redelivery)
    paid = harness.deliver(Paid(order_id="o-2"))
    harness.deliver(Paid(order_id="o-2"), event_id=paid)
    reserved = harness.deliver(Reserved(order_id="o-2"))
    harness.deliver(Reserved(order_id="o-2"), event_id=reserved)
    harness.run_until_idle()
    # Then each was applied once (its inbox absorbed the copy), and Ship was sent once
    assert harness.outcomes("pmlab.fulfil.paid") == ["ran", "duplicate"]
    assert harness.outcomes("pmlab.fulfil.reserved") == ["ran", "duplicate"]
    instance = harness.process("fulfil", "o-2")
    assert (instance.status, instance.version, instance.state.seen) == ("completed", 2, ["paid", "reserved"])
    assert harness.sent(Ship) == [Ship(order_id="o-2")]


def test_an_event_after_completion_does_nothing(make):
    # Given an instance that completed (both events applied)
    harness = make(declare_fulfil)
    harness.deliver(Paid(order_id="o-3"))
    harness.deliver(Reserved(order_id="o-3"))
    harness.run_until_idle()
    # When another Paid (a new event, not a copy) arrives for it
    harness.deliver(Paid(order_id="o-3", amount=99))
    harness.run_until_idle()
    # Then its step ran (and claimed it), but the instance did not change and nothing more was sent
    assert harness.outcomes("pmlab.fulfil.paid") == ["ran", "ran"]
    assert harness.process("fulfil", "o-3").version == 2
    assert harness.sent(Ship) == [Ship(order_id="o-3")]


def test_instances_are_apart_by_correlation(make):
    # Given the manager
    harness = make(declare_fulfil)
    # When o-4 is paid and o-5 reserved
    harness.deliver(Paid(order_id="o-4"))
    harness.deliver(Reserved(order_id="o-5"))
    harness.run_until_idle()
    # Then each has its own instance, and nothing was shipped
    assert harness.process("fulfil", "o-4").state.paid and not harness.process("fulfil", "o-4").state.reserved
    assert harness.process("fulfil", "o-5").state.reserved and not harness.process("fulfil", "o-5").state.paid
    assert harness.sent(Ship) == []


# ---- timeouts ------------------------------------------------------------------------------------
def declare_timed(bus: Bus) -> ProcessManager:
    """OrderOpened starts it and asks for a payment timeout in 30 minutes; Paid cancels that; both Paid
    and Reserved: Ship; the timeout first: Cancel."""
    fulfil = bus.process_manager("fulfil", boundary="pmlab", state=Fulfilment, correlation="order_id")
    fulfil.starts(OrderOpened, on_opened)
    fulfil.handles(Paid, on_paid)
    fulfil.handles(Reserved, on_reserved)
    fulfil.on_timeout("payment", on_payment_timeout)
    return fulfil


def test_the_timeout_before_payment_sends_its_command_and_a_late_payment_does_nothing(make):
    # Given an opened order whose stock is reserved, waiting for its payment
    harness = make(declare_timed)
    harness.deliver(OrderOpened(order_id="o-10"))
    harness.deliver(Reserved(order_id="o-10"))
    harness.run_until_idle()
    assert set(harness.process("fulfil", "o-10").timers) == {"payment"}
    # When 29 minutes pass, nothing happens; after 31, the timeout is delivered
    harness.advance(timedelta(minutes=29))
    harness.run_until_idle()
    assert harness.sent(Cancel) == []
    harness.advance(timedelta(minutes=2))
    harness.run_until_idle()
    # Then its handler sent Cancel (with the data it was requested with) and completed the instance
    assert harness.sent(Cancel) == [Cancel(order_id="o-10", reason="payment")]
    assert harness.outcomes("pmlab.fulfil.timeout") == ["ran"]
    instance = harness.process("fulfil", "o-10")
    assert (instance.status, instance.timers) == ("completed", {})
    # ... and the payment arriving after that changes nothing and ships nothing
    harness.deliver(Paid(order_id="o-10"))
    harness.run_until_idle()
    assert harness.outcomes("pmlab.fulfil.paid") == ["ran"]
    assert harness.process("fulfil", "o-10").version == instance.version
    assert harness.sent(Ship) == []


def test_a_timeout_cancelled_by_the_payment_does_nothing_when_it_fires(make, caplog):
    # Given an opened order that was paid (which cancels its payment timeout)
    harness = make(declare_timed)
    harness.deliver(OrderOpened(order_id="o-11"))
    harness.deliver(Paid(order_id="o-11"))
    harness.run_until_idle()
    assert harness.process("fulfil", "o-11").timers == {}
    # When the timer fires all the same
    with caplog.at_level(logging.INFO, logger="project.process.runtime"):
        harness.advance(timedelta(minutes=31))
        harness.run_until_idle()
    # Then its delivery ran and did nothing but log why; the order goes on and ships
    assert harness.outcomes("pmlab.fulfil.timeout") == ["ran"]
    assert "timeout 'payment' of instance 'o-11'" in caplog.text and "it was cancelled or requested again" in caplog.text
    assert harness.sent(Cancel) == []
    harness.deliver(Reserved(order_id="o-11"))
    harness.run_until_idle()
    assert harness.sent(Ship) == [Ship(order_id="o-11")]
    assert harness.process("fulfil", "o-11").status == "completed"


def test_a_timeout_of_a_completed_instance_does_nothing(make, caplog):
    # Given an order opened, paid and reserved: shipped, completed, its timeout still due
    harness = make(declare_timed)
    for event in (OrderOpened(order_id="o-12"), Paid(order_id="o-12"), Reserved(order_id="o-12")):
        harness.deliver(event)
    harness.run_until_idle()
    completed = harness.process("fulfil", "o-12")
    # When the timer fires
    with caplog.at_level(logging.INFO, logger="project.process.runtime"):
        harness.advance(timedelta(hours=1))
        harness.run_until_idle()
    # Then nothing changes, and the log says why
    assert "the instance is completed" in caplog.text
    assert harness.sent(Cancel) == [] and harness.sent(Ship) == [Ship(order_id="o-12")]
    assert harness.process("fulfil", "o-12").version == completed.version


def test_the_timeout_is_a_command_of_the_manager_on_its_own_queue(make):
    # Given the manager with a timeout
    harness = make(declare_timed)
    registry = harness.bus.registry
    # Then its timeouts are one command, <boundary>.<manager>.timeout, keyed by the timer id, with its own queue
    timeout = registry.commands["pmlab.fulfil.timeout"]
    assert (timeout.boundary, timeout.contract.__name__, timeout.contract.natural_key) == (
        "pmlab", "FulfilTimeout", ("timer_id",))
    assert {q.name for q in harness.bus.topology.queues(["pmlab"])} >= {"pmlab.fulfil.timeout"}


def test_a_timeout_the_manager_does_not_declare_is_refused_naming_the_declaration(make):
    # Given a manager whose starting handler asks for the timeout "payment", declaring only "reminder"
    def declare(bus: Bus) -> None:
        manager = bus.process_manager("forgetful", boundary="pmlab", state=Fulfilment, correlation="order_id",
                                      retry=Backoff(max_retries=0))
        manager.starts(OrderOpened, on_opened)
        manager.on_timeout("reminder", on_payment_timeout)
    harness = make(declare)
    # When an order is opened
    harness.deliver(OrderOpened(order_id="o-13"))
    harness.run_until_idle()
    # Then the step fails, naming the declaration to add, and nothing of it is kept
    [dead] = harness.dead_letters("pmlab.forgetful.order_opened")
    assert ("forgetful has no timeout 'payment': declare it with forgetful.on_timeout('payment', handler) "
            "(declared: reminder)") in dead.error
    assert harness.process("forgetful", "o-13") is None


# ---- the steps are subscribers -------------------------------------------------------------------
def test_each_step_is_a_subscriber_of_the_managers_boundary_with_the_managers_policy(make):
    # Given the manager declared with a policy that retries connection errors only
    policy = Backoff(max_retries=4, base=0.1, cap=1.0, retry_on=(ConnectionError,))
    harness = make(lambda bus: declare_fulfil(bus, retry=policy))
    registry = harness.bus.registry
    # Then Paid and Reserved each have a subscriber <boundary>.<manager>.<event> of boundary pmlab
    assert sorted(registry.subscribers) == ["pmlab.fulfil.paid", "pmlab.fulfil.reserved"]
    paid = registry.subscribers["pmlab.fulfil.paid"]
    assert (paid.contract, paid.boundary, paid.handler_name) == (Paid, "pmlab", f"{__name__}.on_paid")
    # ... with the manager's policy, which retries version conflicts as well
    assert paid.retry.max_retries == 4
    assert paid.retry.retry_on == (ConnectionError, VersionConflict)
    # ... and the topology lists their queues, bound to the events' exchanges
    assert {q.name: q.exchange.name for q in harness.bus.topology.queues(["pmlab"])} == {
        "pmlab.fulfil.paid": "events.paid", "pmlab.fulfil.reserved": "events.reserved"}


def test_a_step_is_one_transaction_of_inbox_claim_instance_read_and_save_outbox_and_log(make):
    # Given an instance that Paid started
    harness = make(declare_fulfil)
    harness.deliver(Paid(order_id="o-14"))
    harness.run_until_idle()
    # When Reserved runs its step
    with statements(harness.bus.engine()) as seen:
        harness.deliver(Reserved(order_id="o-14"))
        harness.run_until_idle()
    # Then its transaction is the inbox claim, the read and the versioned save of the instance, the
    # command it sent and the execution log, in one commit: two statements more than a subscriber's
    assert until_commit(seen) == ["BEGIN IMMEDIATE", "INSERT bus_inbox", "SELECT bus_process_instances",
                                  "INSERT bus_outbox", "UPDATE bus_process_instances", "INSERT bus_executions",
                                  "COMMIT"]


def test_a_version_conflict_is_retried_by_the_policy_and_then_applied(make, monkeypatch):
    # Given the manager, whose policy retries connection errors only, and a save that loses its race once
    harness = make(lambda bus: declare_fulfil(bus, retry=Backoff(max_retries=2, base=0.1, retry_on=(ConnectionError,))))
    save, lost = process_state.save, []

    def racing(session, instance):
        if not lost:
            lost.append(instance.instance_id)
            raise VersionConflict(f"lost the race for {instance.instance_id}")
        return save(session, instance)
    monkeypatch.setattr(process_state, "save", racing)
    # When Paid arrives
    harness.deliver(Paid(order_id="o-6"))
    harness.run_until_idle()
    # Then its first attempt rolled back and was retried (not dead-lettered); the second applied it once
    assert harness.outcomes("pmlab.fulfil.paid") == ["retried", "ran"]
    assert harness.process("fulfil", "o-6").version == 1
    assert harness.dead_letters() == []


def test_dependencies_are_provided_as_for_subscribers(make):
    # Given handlers (a step's and a timeout's) that ask for a provided `ledger`, and the message context
    noted = []

    def on_paid_noting(state: Fulfilment, event: Paid, process, *, ledger, context) -> None:
        ledger.append((process.instance_id, context.handler))
        process.request_timeout("nudge", after=60)

    def on_nudge(state: Fulfilment, timeout, process, *, ledger) -> None:
        ledger.append((process.instance_id, timeout.timeout))

    def declare(bus: Bus) -> None:
        bus.provide("ledger", lambda uow: noted)
        manager = bus.process_manager("noting", boundary="pmlab", state=Fulfilment, correlation="order_id")
        manager.starts(Paid, on_paid_noting)
        manager.on_timeout("nudge", on_nudge)
    harness = make(declare)
    # When Paid arrives, and a minute passes
    harness.deliver(Paid(order_id="o-7"))
    harness.run_until_idle()
    harness.advance(61)
    harness.run_until_idle()
    # Then both handlers got them
    assert noted == [("o-7", "pmlab.noting.paid"), ("o-7", "nudge")]


# ---- an event without an instance ----------------------------------------------------------------
def declare_strict(on_missing: str) -> Callable[[Bus], object]:
    def declare(bus: Bus) -> None:
        manager = bus.process_manager("strict", boundary="pmlab", state=Fulfilment, correlation="order_id",
                                      on_missing=on_missing)
        manager.starts(OrderOpened, lambda state, event, process: state.seen.append("opened"))
        manager.handles(Paid, on_paid)
    return declare


@pytest.fixture
def unmatched(monkeypatch) -> list[tuple[str, str]]:
    """What was counted in bus_process_unmatched_total (metrics are off in tests: a recorder instead)."""
    counted: list[tuple[str, str]] = []
    monkeypatch.setattr(metrics, "process_unmatched", lambda manager, event: counted.append((manager, event)))
    return counted


def test_an_event_without_an_instance_is_logged_counted_and_ignored(make, unmatched, caplog):
    # Given a manager that only OrderOpened starts (on_missing="ignore", the default)
    harness = make(declare_strict("ignore"))
    # When Paid arrives for an order never opened
    with caplog.at_level(logging.WARNING, logger="project.process.runtime"):
        harness.deliver(Paid(order_id="o-8"))
        harness.run_until_idle()
    # Then it is logged and counted, no instance exists, and nothing is dead-lettered
    assert "strict has no instance 'o-8' for Paid, which does not start one: ignored" in caplog.text
    assert unmatched == [("strict", "Paid")]
    assert harness.process("strict", "o-8") is None
    assert harness.outcomes("pmlab.strict.paid") == ["ran"]
    assert harness.dead_letters() == []


def test_an_event_without_an_instance_is_dead_lettered_when_the_manager_says_so(make, unmatched):
    # Given the manager with on_missing="dead_letter"
    harness = make(declare_strict("dead_letter"))
    # When Paid arrives for an order never opened
    harness.deliver(Paid(order_id="o-9"))
    harness.run_until_idle()
    # Then it is counted and dead-lettered at once (refused: a domain error, not retried), naming what to do
    assert unmatched == [("strict", "Paid")]
    assert harness.outcomes("pmlab.strict.paid") == ["refused"]
    [dead] = harness.dead_letters("pmlab.strict.paid")
    assert "strict has no instance 'o-9' for Paid" in dead.error and "bus dlq replay" in dead.error
    # ... and once the order is opened, the same Paid applies
    harness.deliver(OrderOpened(order_id="o-9"))
    harness.deliver(Paid(order_id="o-9"))
    harness.run_until_idle()
    assert harness.process("strict", "o-9").state.seen == ["opened", "paid"]


def test_an_event_that_names_no_instance_is_dead_lettered_at_once(make):
    # Given the manager
    harness = make(declare_fulfil)
    # When Paid arrives with an empty order id
    harness.deliver(Paid(order_id=""))
    harness.run_until_idle()
    # Then it is dead-lettered without a retry, naming the fix, and no instance exists
    assert harness.outcomes("pmlab.fulfil.paid") == ["refused"]
    [dead] = harness.dead_letters("pmlab.fulfil.paid")
    assert "Paid gives fulfil the instance id '': it needs 1 to 300 characters; fix the publisher" in dead.error
    assert harness.process("fulfil", "") is None


# ---- declaration errors: one line naming the fix -------------------------------------------------
def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


def test_an_unknown_correlation_field_is_refused_naming_the_fields():
    bus = Bus(Celery("pm-declare", set_as_current=False))
    manager = bus.process_manager("fulfil", boundary="pmlab", state=Fulfilment, correlation="order_id")
    with pytest.raises(ConfigurationError) as error:
        manager.handles(Refunded, on_paid)
    assert "Refunded has no field 'order_id'" in one_line(error)
    assert "payment_ref" in one_line(error) and "correlation={Refunded: '<field>'" in one_line(error)


def test_a_correlation_mapping_without_the_event_is_refused():
    bus = Bus(Celery("pm-declare", set_as_current=False))
    manager = bus.process_manager("fulfil", boundary="pmlab", state=Fulfilment, correlation={Paid: "order_id"})
    with pytest.raises(ConfigurationError) as error:
        manager.starts(Reserved, on_reserved)
    assert "add Reserved: '<field>'" in one_line(error)


def test_a_state_that_is_not_a_pydantic_model_is_refused():
    bus = Bus(Celery("pm-declare", set_as_current=False))
    with pytest.raises(TypeError) as error:
        bus.process_manager("fulfil", boundary="pmlab", state=dict, correlation="order_id")
    assert "the state is a pydantic model class; declare `class FulfilState(BaseModel)" in one_line(error)


def test_a_state_without_defaults_is_refused():
    class Strict(BaseModel):
        order_id: str

    bus = Bus(Celery("pm-declare", set_as_current=False))
    with pytest.raises(ConfigurationError) as error:
        bus.process_manager("fulfil", boundary="pmlab", state=Strict, correlation="order_id")
    assert "Strict(), which needs order_id; give those fields defaults" in one_line(error)


def test_two_managers_with_one_name_are_refused():
    bus = Bus(Celery("pm-declare", set_as_current=False))
    bus.process_manager("fulfil", boundary="pmlab", state=Fulfilment, correlation="order_id")
    with pytest.raises(ConfigurationError) as error:
        bus.process_manager("fulfil", boundary="pmother", state=Fulfilment, correlation="order_id")
    assert "a process manager named 'fulfil' is declared already" in one_line(error)
    assert "give the new one another name" in one_line(error)


@pytest.mark.parametrize("handler", [
    pytest.param(lambda state, event: None, id="two-arguments"),
    pytest.param(lambda event, *, state, process: None, id="keyword-only-state"),
    pytest.param(lambda state, event, process, extra: None, id="four-arguments"),
])
def test_a_handler_that_does_not_take_state_event_process_is_refused(handler):
    bus = Bus(Celery("pm-declare", set_as_current=False))
    manager = bus.process_manager("fulfil", boundary="pmlab", state=Fulfilment, correlation="order_id")
    with pytest.raises(TypeError) as error:
        manager.handles(Paid, handler)
    assert "fulfil.handles(Paid, ...)" in one_line(error)
    assert "a handler takes (state, event, process) positionally" in one_line(error)


def test_one_event_twice_and_a_command_are_refused():
    bus = Bus(Celery("pm-declare", set_as_current=False))
    manager = bus.process_manager("fulfil", boundary="pmlab", state=Fulfilment, correlation="order_id")
    manager.starts(Paid, on_paid)
    with pytest.raises(ConfigurationError) as error:
        manager.handles(Paid, on_reserved)
    assert f"fulfil already handles Paid with {__name__}.on_paid; one handler per event" in one_line(error)
    with pytest.raises(TypeError) as error:
        manager.handles(Ship, on_paid)
    assert "bind it with bus.command()" in one_line(error)


@pytest.mark.parametrize("options, says", [
    ({"on_missing": "drop"}, "on_missing='drop'; use one of 'ignore', 'dead_letter'"),
    ({"retry": 3}, "retry=3; pass a Backoff"),
    ({"retry": Backoff(give_up_on=(VersionConflict,))}, "take it out of give_up_on"),
])
def test_bad_options_are_refused(options, says):
    bus = Bus(Celery("pm-declare", set_as_current=False))
    with pytest.raises((ConfigurationError, TypeError)) as error:
        bus.process_manager("fulfil", boundary="pmlab", state=Fulfilment, correlation="order_id", **options)
    assert says in one_line(error)
