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
from typing import TYPE_CHECKING, Any, Callable, Iterable

import click
from celery import Celery, bootsteps, signals
from celery.worker.control import inspect_command

from project.errors import ConfigurationError
from project.messaging import ownership
from project.settings import require_task_modules
from project.store import lease
from project.transport import embedded

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from project.messaging.providers import Providers
    from project.messaging.registry import Registry
    from project.messaging.topology import Topology
    from project.messaging.wiring import Wiring
    from project.settings import Settings

logger = logging.getLogger(__name__)
_installed: dict[int, tuple["Wiring", "Providers", Callable[[], "Settings"]]] = {}


def install(wiring: "Wiring", providers: "Providers", settings: Callable[[], "Settings"]) -> None:
    """Add the `--boundary` option and the start-up step to the workers of `wiring.app`."""
    app = wiring.app
    _installed[id(app)] = wiring, providers, settings
    app.user_options["worker"].add(click.Option(
        ("--boundary",), multiple=True, default=(),
        help="Consume the queues of these boundaries only (repeat or comma-separate).",
    ))
    app.steps["worker"].add(BusStartup)
    signals.celeryd_init.connect(_note_task_modules, weak=False)


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


def owned_commands(registry: "Registry", consumed: Iterable[str]) -> dict[str, str]:
    """{command queue: handler} for the command queues in `consumed`."""
    return {q: registry.commands[q].handler_name for q in consumed if q in registry.commands}


def _note_task_modules(instance: Any = None, conf: Any = None, options: Any = None, **_: Any) -> None:
    """celeryd_init: the task modules the configuration (and `-I`) names, noted before the worker adds
    the modules of the tasks it already has (the bus's own) to `include`."""
    if instance is not None:
        instance.bus_task_modules = {"imports": conf.imports, "include": [*(conf.include or ()),
                                                                         *((options or {}).get("include") or ())]}


def _require_task_modules(worker: Any) -> None:
    """A worker without task modules stops at once: one line in its log, no traceback, exit code 2."""
    try:
        require_task_modules(getattr(worker, "bus_task_modules", None) or worker.app.conf)
    except ConfigurationError as exc:
        logger.critical("%s", exc)
        raise SystemExit(2) from None


class BusStartup(bootsteps.StartStopStep):
    """Select queues, check wiring, take the owner leases; runs before the pool and the consumer start."""

    label = "celery-bus"
    # started after the pool: its first processes fork before the heartbeat thread exists
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker, boundary: tuple[str, ...] = (), **options: Any) -> None:
        _require_task_modules(worker)
        wiring, providers, settings = _installed[id(worker.app)]
        current = settings()
        if current.embedded:
            embedded.ensure_running(current.home)
        self._select_queues(worker.app, wiring.topology, boundary)
        registry = wiring.registry
        for binding in [*registry.commands.values(), *registry.subscribers.values()]:
            providers.check(binding)
        owned = owned_commands(registry, worker.app.amqp.queues.consume_from or {})
        self.heartbeat = self._own(worker, wiring.engine, owned)
        super().__init__(worker, **options)

    def create(self, worker) -> ownership.Heartbeat | None:
        return self.heartbeat  # started and stopped with the worker (StartStopStep)

    @staticmethod
    def _own(worker, engine_of: Callable[[], "Engine"], owned: dict[str, str]) -> ownership.Heartbeat | None:
        """Take the owner leases of `owned` (OwnerConflict if another handler holds one); their heartbeat."""
        ttl = ownership.lease_ttl()  # checked by every worker, also one without command queues
        if not owned:
            return None
        engine = engine_of()
        for claimed in ownership.claim(engine, owned, worker.hostname, ttl):
            logger.info("%s", claimed.line())

        def renew(queue: str, handler: str) -> tuple[bool, lease.Lease]:
            return lease.acquire(engine, ownership.lease_name(queue), handler, worker.hostname, ttl)

        def stop_consuming(queue: str) -> None:
            # the consumer's own loop cancels it, as Celery's remote control `cancel_consumer` does
            worker.consumer.call_soon(worker.consumer.cancel_task_queue, queue)

        return ownership.Heartbeat(renew, owned, ttl.total_seconds() / 3, stop_consuming)

    @staticmethod
    def _select_queues(app: Celery, topology: "Topology", boundary: tuple[str, ...]) -> None:
        names = parse_boundaries(boundary, topology.boundaries())
        # Celery consumed -Q itself (WorkController.setup_queues, before the steps) and the
        # steps never see the option; what it selected is in _consume_from (the public
        # consume_from falls back to every declared queue when nothing was selected).
        explicit = list(app.amqp.queues._consume_from or ())
        wanted = topology.queues(names) if names else (topology.queues() if not explicit else [])
        by_name = {q.name: q for q in topology.queues()}
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
    installed = _installed.get(id(app))
    if installed is None:
        return {}
    wiring, _, _ = installed
    return owned_commands(wiring.registry, app.amqp.queues.consume_from or {})
