"""What the running workers serve, asked over Celery remote control."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from project.worker import find_conflicts

if TYPE_CHECKING:
    from project.core import Bus


@dataclass
class Survey:
    workers: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    unconsumed: list[str] = field(default_factory=list)


def survey(bus: "Bus", timeout: float) -> Survey:
    """Owners of every command queue across the cluster, conflicts and unconsumed queues."""
    replies = bus.app.control.broadcast("bus_owners", reply=True, timeout=timeout) or []
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
    report.unconsumed = sorted(set(bus.registry.commands) - consumed)
    return report
