"""One step of a process manager: find the instance, run the handler on its state, save it.

A step runs inside an execution of project/messaging/execution.py, as the handler of a
bus task, and needs nothing of Celery:
- an event step is the handler of the subscriber `<boundary>.<manager>.<event>`: its inbox
  claim applies each (event, instance) once, its policy retries it, its outbox sink
  (`events`) sends what the handler sends;
- the timeout step is the handler of the command `<boundary>.<manager>.timeout`, whose
  claim (keyed by the timer id) runs each timer once.

The step reads the instance in the execution's own transaction (the sink's session), runs
the handler with (state, message, process) and saves the state under the version it read
(project/store/process_state.py): state, outbox rows and claim commit together. A step that
lost a race raises VersionConflict; the execution rolls back and its policy runs it again
(the manager's policy always retries conflicts: project/process/declaration.py).

The timeout step reads its instance with a row lock instead: it runs under the bus's
command policy, which retries infrastructure failures only, so it must not lose a race.
An event step racing it waits for the lock's COMMIT and retries on the conflict.

An event that finds no instance, in a step that does not start one, is counted
(bus_process_unmatched_total) and ignored or dead-lettered, as the manager's `on_missing`
says. An event for a completed instance, and a timeout that is no longer pending (the
instance completed, or the timeout was requested again or cancelled), do nothing but log.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol

from pydantic import BaseModel

from project.contracts import DomainError, Event, snake_case
from project.observe import metrics
from project.process.context import Process
from project.store import process_state
from project.store.process_state import COMPLETED, RUNNING, Instance

if TYPE_CHECKING:
    from project.contracts import MessageContext
    from project.messaging.outbox import OutboxSink

logger = logging.getLogger(__name__)
#: the dependencies every step takes itself: its outbox sink (whose session it saves in) and context
STEP_DEPENDENCIES = ("events", "context")


class Manager(Protocol):
    """What a step reads of its process manager's declaration (project/process/declaration.py)."""

    name: str
    state: type[BaseModel]
    on_missing: str
    timeout_task: str
    timeouts: dict[str, Callable[..., Any]]

    def instance_id(self, event: Event) -> str: ...


class NoInstance(DomainError):
    """An event found no instance of its process manager and does not start one (on_missing="dead_letter")."""


class NoSuchTimeout(DomainError):
    """A timer fired for a timeout its process manager no longer declares."""


class EventStep:
    """The subscriber handler of one (manager, event): `step(event, *, events, context, **its handler's)`."""

    def __init__(self, manager: Manager, contract: type[Event], handler: Callable[..., Any], starts: bool) -> None:
        self.manager, self.contract, self.handler, self.starts = manager, contract, handler, starts
        #: the subscriber (task, queue) is `<boundary>.<__name__>`: `<boundary>.<manager>.<event>`
        self.__name__ = f"{manager.name}.{snake_case(contract.__name__)}"
        # the catalog and `bus topology` show (and read the source of) the application's handler
        self.__module__, self.__qualname__, self.__wrapped__ = handler.__module__, handler.__qualname__, handler
        self.__signature__ = step_signature([handler])

    def __call__(self, event: Event, *, events: "OutboxSink", context: "MessageContext", **dependencies: Any) -> None:
        manager = self.manager
        instance_id = manager.instance_id(event)
        read = process_state.load(events.session, manager.name, instance_id)
        if read is None and not self.starts:
            self._missing(event, instance_id)
            return
        if read is None:
            read = Instance(manager.name, instance_id, manager.state().model_dump(mode="json"))
        elif read.status == COMPLETED:
            logger.info("%s: instance %r is completed; %s %s does nothing", manager.name, instance_id,
                        type(event).__name__, context.message_id)
            return
        apply(manager, read, self.handler, event, events, {"events": events, "context": context, **dependencies})

    def _missing(self, event: Event, instance_id: str) -> None:
        manager, name = self.manager, type(event).__name__
        metrics.process_unmatched(manager.name, name)
        what = f"{manager.name} has no instance {instance_id!r} for {name}, which does not start one"
        if manager.on_missing == "dead_letter":
            raise NoInstance(f"{what}: dead-lettered (on_missing='dead_letter'). Replay it (bus dlq replay) once the "
                             f"instance exists, or let {name} start one: {manager.name}.handles({name}, handler, "
                             f"starts=True)")
        logger.warning("%s: ignored (on_missing='ignore')", what)


class TimeoutStep:
    """The handler of a manager's timeout command: `step(timeout, *, events, context, **its handlers')`."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager
        self.__name__, self.__module__, self.__qualname__ = "timeout", __name__, f"TimeoutStep.{manager.name}"

    @property
    def __signature__(self) -> inspect.Signature:
        """The dependencies of every timeout handler declared so far (declared after the task exists)."""
        return step_signature(self.manager.timeouts.values())

    def __call__(self, timeout: Any, *, events: "OutboxSink", context: "MessageContext", **dependencies: Any) -> None:
        manager, name = self.manager, timeout.timeout
        handler = manager.timeouts.get(name)
        if handler is None:
            raise NoSuchTimeout(f"{manager.name} has no timeout {name!r} (timer {timeout.timer_id}); declare "
                                f"{manager.name}.on_timeout({name!r}, handler) to handle it")
        read = process_state.load(events.session, manager.name, timeout.instance_id, lock=True)
        idle = _idle(read, name, timeout.timer_id)
        if idle is not None:
            logger.info("%s: timeout %r of instance %r (timer %s) does nothing: %s", manager.name, name,
                        timeout.instance_id, timeout.timer_id, idle)
            return
        pending = {other: timer for other, timer in read.timers.items() if other != name}
        apply(manager, replace(read, timers=pending), handler, timeout, events,
              {"events": events, "context": context, **dependencies})


def _idle(read: Instance | None, name: str, timer_id: str) -> str | None:
    """Why the timer `timer_id` of timeout `name` does nothing to `read`; None if it is the one pending."""
    if read is None:
        return "the instance does not exist"
    if read.status == COMPLETED:
        return "the instance is completed"
    if read.timers.get(name) != timer_id:
        return "it was cancelled or requested again"
    return None


def apply(manager: Manager, read: Instance, handler: Callable[..., Any], message: Any, sink: "OutboxSink",
          available: dict[str, Any]) -> None:
    """Run `handler(state, message, process, **its dependencies)` on `read` and save the outcome."""
    state = manager.state.model_validate(read.state)
    process = Process(manager.name, read.instance_id, sink, read.timers, manager.timeout_task, manager.timeouts)
    returned = handler(state, message, process, **{name: available[name] for name in keyword_only(handler)})
    if returned is not None and not isinstance(returned, manager.state):
        raise TypeError(f"{handler.__module__}.{handler.__qualname__} returned a {type(returned).__name__}; a "
                        f"{manager.name} handler returns None after changing the state, or a new "
                        f"{manager.state.__name__}")
    state = state if returned is None else returned
    status = COMPLETED if process.completed else RUNNING
    process_state.save(sink.session, replace(read, state=state.model_dump(mode="json"), status=status,
                                             timers={} if process.completed else process.timers))


def keyword_only(handler: Callable[..., Any]) -> list[str]:
    """The names of `handler`'s keyword-only parameters: its dependencies."""
    return [p.name for p in inspect.signature(handler).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def step_signature(handlers: Iterable[Callable[..., Any]]) -> inspect.Signature:
    """`(message, /, *, events, context, <the handlers' dependencies>)`: what the bus's providers fill in."""
    names = dict.fromkeys(STEP_DEPENDENCIES)
    for handler in handlers:
        names.update(dict.fromkeys(keyword_only(handler)))
    return inspect.Signature([inspect.Parameter("message", inspect.Parameter.POSITIONAL_ONLY),
                              *(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY) for name in names)])
