"""What a worker does at start-up, before it consumes anything, and while it runs.

- `--boundary orders[,billing]` (repeatable) selects the queues of those boundaries;
  without it (and without `-Q`) the worker consumes every queue in the registry.
- Every handler's dependencies must be provided.
- Exactly one owner across processes: the worker takes the owner lease of each command
  queue it consumes in the bus database, in one transaction, before the pool starts
  (project/messaging/ownership.py); if another handler holds one, it refuses to start with
  OwnerConflict. Replicas of the same handler share the lease. While it runs, a thread
  of its main process renews the leases every ttl/3; a queue whose lease another
  handler took is no longer consumed.
- It answers the remote-control query `bus_owners` (which handler serves which command
  queue here), which `bus check` uses to list the live workers.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterable

import click
from celery import Celery, bootsteps
from celery.worker.control import inspect_command

from project.errors import ConfigurationError
from project.messaging import ownership
from project.store import lease
from project.transport import embedded

if TYPE_CHECKING:
    from project.core import Bus

logger = logging.getLogger(__name__)
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


class BusStartup(bootsteps.StartStopStep):
    """Select queues, check wiring, take the owner leases; runs before the pool and the consumer start."""

    label = "celery-bus"
    # started after the pool: its first processes fork before the heartbeat thread exists
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker, boundary: tuple[str, ...] = (), **options: Any) -> None:
        bus = _buses[id(worker.app)]
        if bus.settings.embedded:
            embedded.ensure_running(bus.settings.home)
        self._select_queues(worker.app, bus, boundary)
        for binding in [*bus.registry.commands.values(), *bus.registry.subscribers.values()]:
            bus.check_dependencies(binding)
        self.heartbeat = self._own(worker, bus, owned_commands(bus, worker.app.amqp.queues.consume_from or {}))
        super().__init__(worker, **options)

    def create(self, worker) -> ownership.Heartbeat | None:
        return self.heartbeat  # started and stopped with the worker (StartStopStep)

    @staticmethod
    def _own(worker, bus: "Bus", owned: dict[str, str]) -> ownership.Heartbeat | None:
        """Take the owner leases of `owned` (OwnerConflict if another handler holds one); their heartbeat."""
        ttl = ownership.lease_ttl()  # checked by every worker, also one without command queues
        if not owned:
            return None
        engine = bus.engine()
        for claimed in ownership.claim(engine, owned, worker.hostname, ttl):
            logger.info("%s", claimed.line())

        def renew(queue: str, handler: str) -> tuple[bool, lease.Lease]:
            return lease.acquire(engine, ownership.lease_name(queue), handler, worker.hostname, ttl)

        def stop_consuming(queue: str) -> None:
            # the consumer's own loop cancels it, as Celery's remote control `cancel_consumer` does
            worker.consumer.call_soon(worker.consumer.cancel_task_queue, queue)

        return ownership.Heartbeat(renew, owned, ttl.total_seconds() / 3, stop_consuming)

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
    """{command queue: handler} this worker serves (`bus check`'s survey of live workers; the owner lease decides)."""
    app = state.consumer.app
    bus = _buses.get(id(app))
    if bus is None:
        return {}
    return owned_commands(bus, app.amqp.queues.consume_from or {})
