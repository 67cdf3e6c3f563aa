"""Who serves what, for `bus check`: the owner leases (the authority) and the live workers.

The owner leases in the bus database decide who may serve a command queue
(project/messaging/ownership.py); the live workers, asked over Celery remote control
(`bus_owners`), show who consumes what right now, including workers that take no
lease (another deployment, an older release): a pair of them serving one queue with
different handlers is a conflict too. Silence in that survey proves nothing; it is
never used to let a worker start.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from project.messaging import ownership
from project.messaging.registry import Registry

if TYPE_CHECKING:
    from project.messaging.wiring import Wiring


@dataclass
class Survey:
    workers: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    unconsumed: list[str] = field(default_factory=list)
    #: owner leases nobody renews any more (warnings)
    expired: list[str] = field(default_factory=list)


def survey(wiring: "Wiring", timeout: float) -> Survey:
    """Live workers and owner leases: conflicts, unconsumed command queues, expired leases."""
    report = ask_workers(wiring.app.control, wiring.registry, timeout)
    bound = {queue: binding.handler_name for queue, binding in wiring.registry.commands.items()}
    conflicts, report.expired = ownership.examine(bound, ownership.read_leases(wiring.engine()))
    report.conflicts += conflicts
    return report


def ask_workers(control: Any, registry: Registry, timeout: float) -> Survey:
    """What the running workers answer to `bus_owners`: conflicts between them and unconsumed queues."""
    replies = control.broadcast("bus_owners", reply=True, timeout=timeout) or []
    owners: dict[str, dict[str, str]] = {}
    for reply in replies:
        # a worker without the bus's remote-control command answers {"error": ...}: not an owner
        owners.update({host: served for host, served in reply.items()
                       if isinstance(served, dict) and "error" not in served})
    report = Survey(workers=sorted(owners))
    hosts = sorted(owners)
    for i, host in enumerate(hosts):  # each pair of workers once
        report.conflicts += find_conflicts(owners[host], [{h: owners[h]} for h in hosts[i + 1:]], host)
    consumed = {queue for served in owners.values() for queue in served}
    report.unconsumed = sorted(set(registry.commands) - consumed)
    return report


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
