"""Declaring a process manager, in a tasks module, like a subscriber; its handlers stay free of Celery.

    fulfilment = bus.process_manager("fulfilment", boundary="fulfilment", state=FulfilmentState,
                                     correlation="order_id")
    fulfilment.starts(OrderPlaced, handlers.on_order_placed)    # may create the instance
    fulfilment.handles(PaymentProcessed, handlers.on_paid)       # needs one (starts=True: or creates it)
    fulfilment.on_timeout("payment", handlers.on_payment_timeout)

    def on_paid(state: FulfilmentState, event: PaymentProcessed, process, *, gateway) -> None: ...

Each (manager, event) is a subscriber of the manager's boundary, `<boundary>.<manager>.<event>`:
its own queue bound to the event's fanout exchange, the manager's retry policy, the
inbox and the outbox (project/process/runtime.py runs it). A manager with timeouts also
has the command `<boundary>.<manager>.timeout`, which its durable timers deliver. `describe()`
gives the declaration as data: `bus topology`, the catalog and AsyncAPI list managers with it.

`correlation` finds an event's instance: a field every event has, {event class: field or
function}, or a function of the event. `state` is a pydantic model whose fields all have
defaults: a new instance starts from `state()`. `retry` (a Backoff) always retries a
version conflict, a race lost to another step of the same instance. `on_missing` says what
becomes of an event whose instance does not exist and which does not start one:
"ignore" (logged and counted) or "dead_letter".

Mistakes are refused here, when the tasks module is imported, each in one line naming the fix.
"""
from __future__ import annotations

import inspect
import re
import types
from dataclasses import replace
from typing import Any, Callable, Mapping, Union

from pydantic import BaseModel, Field, ValidationError

from project.contracts import Command, DomainError, Event
from project.errors import ConfigurationError
from project.messaging.retry import Backoff
from project.process.runtime import EventStep, TimeoutStep
from project.store import process_state
from project.store.process_state import Instance, VersionConflict

#: how an event finds its instance: a field, {event class: field or function}, or a function of the event
Correlation = Union[str, Mapping[type[Event], Union[str, Callable[[Event], Any]]], Callable[[Event], Any]]
ON_MISSING = ("ignore", "dead_letter")
#: steps of one instance race each other by design: retried quickly and often
DEFAULT_POLICY = Backoff(max_retries=10, base=0.5, cap=30.0)
#: the longest instance id the store keeps (bus_process_instances.instance_id)
MAX_INSTANCE_ID = 300
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class BadCorrelation(DomainError):
    """An event's correlation gives no usable instance id (empty, or too long)."""


class ProcessManager:
    """One declared process manager: its steps by event, its timeouts by name (see the module docstring)."""

    def __init__(self, name: str, *, boundary: str, state: type[BaseModel], correlation: Correlation,
                 retry: Backoff | None, on_missing: str, subscribe: Callable[..., Any],
                 command: Callable[..., Any]) -> None:
        for what, value in (("name", name), ("boundary", boundary)):
            if not isinstance(value, str) or not _NAME.match(value):
                raise ConfigurationError(f"bus.process_manager({what}={value!r}): it names queues; use lowercase "
                                         f"letters, digits and _, starting with a letter, e.g. 'fulfilment'")
        _check_state(name, state)
        if not (isinstance(correlation, (str, Mapping)) or callable(correlation)):
            raise TypeError(f"{name}: correlation={correlation!r} is neither a field name, a mapping "
                            f"{{event class: field or function}} nor a function of the event; e.g. "
                            f"correlation='order_id'")
        if on_missing not in ON_MISSING:
            raise ConfigurationError(f"{name}: on_missing={on_missing!r}; use one of {', '.join(map(repr, ON_MISSING))}")
        self.name, self.boundary, self.state, self.on_missing = name, boundary, state, on_missing
        self.correlation = correlation
        self.retry = _retrying_conflicts(name, DEFAULT_POLICY if retry is None else retry)
        self.timeout_task = f"{boundary}.{name}.timeout"
        #: the event steps by event class, and the timeout handlers by name
        self.steps: dict[type[Event], EventStep] = {}
        self.timeouts: dict[str, Callable[..., Any]] = {}
        #: the subscriber task (= queue) of each event step
        self.step_tasks: dict[type[Event], str] = {}
        self._correlate: dict[type[Event], Callable[[Event], Any]] = {}
        self._subscribe, self._command = subscribe, command
        self._timeout_task: Any = None

    # ---- declaring ---------------------------------------------------------------
    def starts(self, contract: type[Event], handler: Callable[..., Any]) -> Any:
        """`handler(state, event, process)` runs on `contract`, creating the instance if there is none;
        returns the subscriber's Celery task."""
        return self.handles(contract, handler, starts=True)

    def handles(self, contract: type[Event], handler: Callable[..., Any], *, starts: bool = False) -> Any:
        """`handler(state, event, process)` runs on `contract` for an existing instance (`starts`: or a new
        one); returns the subscriber's Celery task."""
        call = f"{self.name}.{'starts' if starts else 'handles'}({getattr(contract, '__name__', contract)}, ...)"
        if not (isinstance(contract, type) and issubclass(contract, Event)):
            raise TypeError(f"{call}: a process manager reacts to Event contract classes, got {contract!r}"
                            + ("; a command has one handler: bind it with bus.command()"
                               if isinstance(contract, type) and issubclass(contract, Command) else ""))
        if contract in self.steps:
            raise ConfigurationError(f"{call}: {self.name} already handles {contract.__name__} with "
                                     f"{_named(self.steps[contract].handler)}; one handler per event: merge them")
        _check_handler(handler, call, "event")
        self._correlate[contract] = self._correlation_of(contract)
        step = self.steps[contract] = EventStep(self, contract, handler, starts)
        task = self._subscribe(contract, boundary=self.boundary, retry=self.retry)(step)
        self.step_tasks[contract] = task.name
        return task

    def on_timeout(self, name: str, handler: Callable[..., Any]) -> Any:
        """`handler(state, timeout, process)` runs when the timeout `name` an instance requested is due
        (`timeout.data` is what it requested with); returns the manager's timeout task."""
        call = f"{self.name}.on_timeout({name!r}, ...)"
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"{call}: a timeout is named by a non-empty string, e.g. 'payment'")
        if name in self.timeouts:
            raise ConfigurationError(f"{call}: {self.name} already handles timeout {name!r} with "
                                     f"{_named(self.timeouts[name])}; one handler per timeout: merge them")
        _check_handler(handler, call, "timeout")
        self.timeouts[name] = handler
        if self._timeout_task is None:
            self._timeout_task = self._command(timeout_contract(self.boundary, self.name))(TimeoutStep(self))
        return self._timeout_task

    # ---- describing ----------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The declaration as JSON-ready data (for `bus topology`, the catalog and AsyncAPI): steps in the
        order declared, each with its subscriber task (= queue); the timeouts by name and their command task."""
        return {
            "name": self.name, "boundary": self.boundary,
            "state": {"model": self.state.__name__, "fields": list(self.state.model_fields),
                      "schema": self.state.model_json_schema(mode="serialization")},
            "correlation": _correlation_text(self.correlation), "on_missing": self.on_missing,
            "retry": self.retry.describe(),
            "starts": [contract.__name__ for contract, step in self.steps.items() if step.starts],
            "handles": [{"event": contract.__name__, "exchange": contract.exchange_name(), "starts": step.starts,
                         "task": self.step_tasks[contract], "queue": self.step_tasks[contract],
                         "handler": _named(step.handler)} for contract, step in self.steps.items()],
            "timeouts": [{"timeout": name, "handler": _named(handler)} for name, handler in self.timeouts.items()],
            "timeout_task": self.timeout_task if self.timeouts else None,
        }

    # ---- at run time -------------------------------------------------------------
    def instance_id(self, event: Event) -> str:
        """The id of the instance `event` belongs to (BadCorrelation, dead-lettered, if it has none)."""
        value = self._correlate[type(event)](event)
        text = "" if value is None else str(value)
        if not text or len(text) > MAX_INSTANCE_ID:
            raise BadCorrelation(f"{type(event).__name__} gives {self.name} the instance id {text[:80]!r}: it needs "
                                 f"1 to {MAX_INSTANCE_ID} characters; fix the publisher, or the correlation")
        return text

    def instance(self, connection: Any, instance_id: str) -> Instance | None:
        """The instance `instance_id` as stored, its state as this manager's model (None: never started)."""
        found = process_state.load(connection, self.name, instance_id)
        return None if found is None else replace(found, state=self.state.model_validate(found.state))

    def _correlation_of(self, contract: type[Event]) -> Callable[[Event], Any]:
        correlation = self.correlation
        if isinstance(correlation, Mapping):
            if contract not in correlation:
                raise ConfigurationError(f"{self.name}: correlation names no field or function for "
                                         f"{contract.__name__}; add {contract.__name__}: '<field>' to it")
            correlation = correlation[contract]
        if not isinstance(correlation, str):
            return correlation
        if correlation not in contract.model_fields:
            raise ConfigurationError(
                f"{self.name}: {contract.__name__} has no field {correlation!r} to find its instance by (its fields: "
                f"{', '.join(contract.model_fields) or 'none'}); pass correlation={{{contract.__name__}: '<field>', "
                f"...}} or a function of the event")
        return lambda event: getattr(event, correlation)


class ProcessManagers(dict[str, ProcessManager]):
    """The process managers of one bus, by name."""

    def add(self, manager: ProcessManager) -> ProcessManager:
        existing = self.get(manager.name)
        if existing is not None:
            raise ConfigurationError(f"a process manager named {manager.name!r} is declared already (boundary "
                                     f"{existing.boundary!r}, state {existing.state.__name__}); give the new one "
                                     f"another name")
        self[manager.name] = manager
        return manager

    def __missing__(self, name: str) -> ProcessManager:
        raise KeyError(f"no process manager {name!r}; declared: {', '.join(sorted(self)) or 'none'}")


def timeout_contract(boundary: str, manager: str) -> type[Command]:
    """The command a manager's timers deliver: `<boundary>.<manager>.timeout`, run once per timer id."""
    task = f"{boundary}.{manager}.timeout"

    def body(namespace: dict[str, Any]) -> None:
        namespace.update(
            __module__=__name__, __qualname__=f"{_camel(manager)}Timeout",
            __doc__=f"A timeout of the process manager {manager}, due for one instance (sent by its durable timer).",
            __annotations__={"instance_id": str, "timeout": str, "data": dict[str, Any], "timer_id": str},
            data=Field(default_factory=dict), task_name=classmethod(lambda cls: task))
    return types.new_class(f"{_camel(manager)}Timeout", (Command,),
                           {"boundary": boundary, "natural_key": ("timer_id",)}, body)


def _check_state(name: str, state: Any) -> None:
    """Refuse a state that is not a pydantic model class, or that cannot start as `state()`."""
    if not (isinstance(state, type) and issubclass(state, BaseModel)):
        raise TypeError(f"bus.process_manager({name!r}, state={state!r}): the state is a pydantic model class; "
                        f"declare `class {_camel(name)}State(BaseModel): ...` and pass state={_camel(name)}State")
    try:
        state()
    except ValidationError as exc:
        missing = [str(e["loc"][0]) for e in exc.errors() if e["loc"]]
        raise ConfigurationError(f"{name}: a new instance starts from {state.__name__}(), which needs "
                                 f"{', '.join(missing)}; give those fields defaults and set them in the "
                                 f"starting handler") from None


def _retrying_conflicts(name: str, policy: Backoff) -> Backoff:
    """`policy`, retrying version conflicts too (they are a step's lost race, not a failure)."""
    if not isinstance(policy, Backoff):
        raise TypeError(f"{name}: retry={policy!r}; pass a Backoff, e.g. retry=Backoff(max_retries=10, base=0.5)")
    if issubclass(VersionConflict, policy.give_up_on):
        raise ConfigurationError(f"{name}: retry={policy} gives up on VersionConflict, a race between two steps of "
                                 f"one instance that a retry resolves; take it out of give_up_on")
    if issubclass(VersionConflict, policy.retry_on):
        return policy
    return replace(policy, retry_on=(*policy.retry_on, VersionConflict))


def _check_handler(handler: Callable[..., Any], call: str, message: str) -> None:
    """Refuse a handler that cannot be called as `handler(state, <message>, process, **dependencies)`."""
    fix = (f"a handler takes (state, {message}, process) positionally and its dependencies keyword-only: "
           f"def handler(state, {message}, process, *, gateway): ...")
    if not callable(handler):
        raise TypeError(f"{call}: {handler!r} is not callable; {fix}")
    signature = inspect.signature(handler)
    dependencies = {p.name: None for p in signature.parameters.values()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty}
    try:
        signature.bind(None, None, None, **dependencies)
    except TypeError:
        raise TypeError(f"{call}: {_named(handler)}{signature} does not fit; {fix}") from None


def _correlation_text(correlation: Correlation) -> Any:
    """A field name as it is; a function as `module.name()`; a mapping as {event name: either}."""
    if isinstance(correlation, Mapping):
        return {contract.__name__: _correlation_text(found) for contract, found in correlation.items()}
    return correlation if isinstance(correlation, str) else f"{_named(correlation)}()"


def _named(handler: Callable[..., Any]) -> str:
    return f"{getattr(handler, '__module__', '?')}.{getattr(handler, '__qualname__', handler)}"


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))
