"""Queues, exchanges and bindings, derived from the registry and nothing else.

Publishers, workers, the CLI and the docs all read the broker layout from here:
- a command gets a durable direct exchange and queue, both named after its task
  (`orders.place_order`), which is also what Celery creates for `queue=<name>`;
- an event gets a durable fanout exchange `events.<snake_event>`;
- a subscriber gets a durable queue `<boundary>.<handler>` bound to its event's exchange;
- on RabbitMQ with BUS_RABBITMQ_DEAD_LETTERS=arguments, both kinds of queue dead-letter
  to `bus.dead_letter` (project/dead_letters/dlx.py);
- on RabbitMQ with BUS_RABBITMQ_QUEUE_TYPE=quorum, every queue is a quorum queue whose
  main exchange is the topic `bus.queues` (bound by its own name), and the bindings above
  are declared next to it (project/transport/quorum.py says why).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from kombu import Exchange, Queue

from project.contracts import Event
from project.dead_letters import dlx
from project.messaging.registry import CommandBinding, Registry, SubscriberBinding
from project.transport import quorum

#: the bus's own housekeeping (outbox relay, key purge), in the pseudo-boundary `bus`
MAINTENANCE_BOUNDARY = "bus"
MAINTENANCE_QUEUE = "bus.maintenance"


def _queue(name: str, exchange: Exchange, arguments: dict[str, Any] | None) -> Queue:
    """Durable queue `name` bound to `exchange` with its own name as the routing key."""
    if quorum.enabled():
        return quorum.routed_queue(name, [(exchange, name)], dlx.queue_arguments())
    return Queue(name, exchange, routing_key=name, durable=True, queue_arguments=arguments)


def maintenance_queue() -> Queue:
    return _queue(MAINTENANCE_QUEUE, Exchange(MAINTENANCE_QUEUE, type="direct", durable=True), None)


def command_queue(binding: CommandBinding) -> Queue:
    """The dedicated queue of a command."""
    return named_command_queue(binding.name)


def named_command_queue(name: str) -> Queue:
    """The queue of command task `name`, for senders that do not load its binding."""
    return _queue(name, Exchange(name, type="direct", durable=True), dlx.queue_arguments())


def event_exchange(exchange_name: str) -> Exchange:
    """The durable fanout exchange of an event."""
    return Exchange(exchange_name, type="fanout", durable=True)


def subscriber_queue(binding: SubscriberBinding) -> Queue:
    """A subscriber's own durable queue, bound to its event's fanout exchange."""
    return _queue(binding.name, event_exchange(binding.contract.exchange_name()), dlx.queue_arguments())


@dataclass(frozen=True)
class Topology:
    """Everything the broker must hold for one registry."""

    registry: Registry

    def queues(self, boundaries: Iterable[str] | None = None) -> list[Queue]:
        """Command and subscriber queues, optionally of some boundaries only."""
        wanted = set(boundaries) if boundaries else None
        queues = [command_queue(b) for b in self.registry.commands.values()
                  if wanted is None or b.boundary in wanted]
        queues += [subscriber_queue(s) for s in self.registry.subscribers.values()
                   if wanted is None or s.boundary in wanted]
        if wanted is None or MAINTENANCE_BOUNDARY in wanted:
            queues.append(maintenance_queue())
        return queues

    def boundaries(self) -> set[str]:
        """Every boundary a worker may be started for, `bus` (housekeeping) included."""
        return self.registry.boundaries() | {MAINTENANCE_BOUNDARY}

    def subscriber_queues(self, exchange_name: str) -> list[Queue]:
        """The queues bound to one event's exchange."""
        return [subscriber_queue(s) for s in self.registry.subscribers.values()
                if s.contract.exchange_name() == exchange_name]

    def exchanges(self) -> list[Exchange]:
        return [event_exchange(name) for name in sorted(self.registry.events)]

    def describe(self, command_policy: Any = None) -> dict[str, Any]:
        """A JSON-ready catalog: commands and events with their broker names and retry policies."""
        commands = [
            {"command": b.contract.__name__, "task": b.name, "queue": b.name,
             "boundary": b.boundary, "handler": b.handler_name,
             "retry": command_policy.describe() if command_policy else None}
            for b in sorted(self.registry.commands.values(), key=lambda b: b.name)
        ]
        events = []
        for name, contract in sorted(known_events(self.registry).items()):
            subs = [s for s in self.registry.subscribers.values() if s.contract is contract]
            events.append({
                "event": contract.__name__, "exchange": name, "type": "fanout",
                "owner": contract.boundary,
                "subscribers": [{"task": s.name, "queue": s.name, "boundary": s.boundary,
                                 "handler": s.handler_name, "retry": s.retry.describe() if s.retry else None}
                                for s in sorted(subs, key=lambda s: s.name)],
            })
        return {"commands": commands, "events": events}


def known_events(registry: Registry) -> dict[str, type[Event]]:
    """Every imported event contract by exchange name, with or without subscribers."""
    found: dict[str, type[Event]] = dict(registry.events)
    pending = list(Event.__subclasses__())
    while pending:
        contract = pending.pop()
        pending += contract.__subclasses__()
        found.setdefault(contract.exchange_name(), contract)
    return found
