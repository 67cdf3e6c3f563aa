"""What a worker does at start-up, before it consumes anything.

- `--boundary orders[,billing]` (repeatable) selects the queues of those boundaries;
  without it (and without `-Q`) the worker consumes every queue in the registry.
- Every handler's dependencies must be provided.
- Exactly one owner across processes: the running workers are asked which handler
  serves each command queue (remote control `bus_owners`); if another handler serves
  one of ours, this worker refuses to start. Replicas of the same handler are fine.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterable

import click
from celery import Celery, bootsteps
from celery.worker.control import inspect_command

from project import embedded
from project.errors import ConfigurationError, OwnerConflict

if TYPE_CHECKING:
    from project.core import Bus

logger = logging.getLogger(__name__)
OWNER_QUERY_TIMEOUT = 1.0
_buses: dict[int, "Bus"] = {}


def install(app: Celery, bus: "Bus") -> None:
    """Add the `--boundary` option and the start-up step to `app`'s workers."""
    _buses[id(app)] = bus
    app.user_options["worker"].add(click.Option(
        ("--boundary",), multiple=True, default=(),
        help="Consume the queues of these boundaries only (repeat or comma-separate).",
    ))
    app.steps["worker"].add(BusStartup)


def parse_boundaries(values: Iterable[str], known: set[str]) -> list[str]:
    """`("orders,billing", "x")` -> names; unknown names raise with the known ones."""
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigurationError(
            f"--boundary {', '.join(unknown)}: no such boundary; known: {', '.join(sorted(known)) or 'none'} "
            f"(check BUS_TASK_MODULES lists the tasks modules that bind them)"
        )
    return names


def owned_commands(bus: "Bus", consumed: Iterable[str]) -> dict[str, str]:
    """{command queue: handler} for the command queues in `consumed`."""
    return {q: bus.registry.commands[q].handler_name for q in consumed if q in bus.registry.commands}


def find_conflicts(mine: dict[str, str], replies: list[dict[str, Any]], me: str) -> list[str]:
    """Descriptions of queues another worker serves with a different handler."""
    found = []
    for reply in replies:
        for host, theirs in reply.items():
            if host == me or not isinstance(theirs, dict):
                continue
            for queue, handler in theirs.items():
                if queue in mine and mine[queue] != handler:
                    found.append(f"{queue} is served by {handler} on {host}, but {me} would serve it "
                                 f"with {mine[queue]}")
    return found


class BusStartup(bootsteps.Step):
    """Select queues, check wiring and ownership; runs before the consumer starts."""

    label = "celery-bus"

    def __init__(self, worker, boundary: tuple[str, ...] = (), **options: Any) -> None:
        bus = _buses[id(worker.app)]
        if bus.settings.embedded:
            embedded.ensure_running(bus.settings.home)
        self._select_queues(worker.app, bus, boundary)
        for binding in [*bus.registry.commands.values(), *bus.registry.subscribers.values()]:
            bus.check_dependencies(binding)
        mine = owned_commands(bus, worker.app.amqp.queues.consume_from or {})
        if mine:
            # On a connection of its own, closed here: on Redis a pooled one keeps the reply
            # BRPOP in flight, and every forked pool process then hangs closing it.
            with worker.app.connection_for_write() as connection:
                replies = worker.app.control.broadcast("bus_owners", reply=True, timeout=OWNER_QUERY_TIMEOUT,
                                                       connection=connection) or []
            conflicts = find_conflicts(mine, replies, worker.hostname)
            if conflicts:
                raise OwnerConflict(
                    "refusing to start: a command has exactly one owner. " + "; ".join(conflicts)
                    + ". Stop the other worker or remove one of the bindings (see `bus check`)."
                )
        super().__init__(worker, **options)

    @staticmethod
    def _select_queues(app: Celery, bus: "Bus", boundary: tuple[str, ...]) -> None:
        names = parse_boundaries(boundary, bus.topology.boundaries())
        # Celery consumed -Q itself (WorkController.setup_queues, before the steps) and the
        # steps never see the option; what it selected is in _consume_from (the public
        # consume_from falls back to every declared queue when nothing was selected).
        explicit = list(app.amqp.queues._consume_from or ())
        wanted = bus.topology.queues(names) if names else (bus.topology.queues() if not explicit else [])
        by_name = {q.name: q for q in bus.topology.queues()}
        selection = [q.name for q in wanted] + [q for q in explicit if q not in {w.name for w in wanted}]
        for name in selection:
            if name in by_name:
                app.amqp.queues[name] = by_name[name]
        if selection:
            app.amqp.queues.select(selection)


@inspect_command()
def bus_owners(state) -> dict[str, str]:
    """{command queue: handler} this worker serves (for the one-owner check)."""
    app = state.consumer.app
    bus = _buses.get(id(app))
    if bus is None:
        return {}
    return owned_commands(bus, app.amqp.queues.consume_from or {})
