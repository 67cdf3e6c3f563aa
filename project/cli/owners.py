"""`bus owners`: the owner lease of each command queue (project/messaging/ownership.py), and releasing one.

`bus owners` lists them (exit 0); `bus owners release QUEUE` deletes one so that a
renamed handler can start before it expires: exit 0 when it released a lease, 1 when
that queue had none, 2 on a name that is neither a command queue of this registry nor
leased (nothing is changed then).
"""
from __future__ import annotations

import json

import typer
from rich.table import Table

from project.cli.common import console, database_engine, fail, loaded_bus

owners_cli = typer.Typer(help="Owner leases: which handler owns each command queue, until when.",
                         invoke_without_command=True)



def _leases():
    from project.messaging.ownership import read_leases
    return read_leases(database_engine())


@owners_cli.callback()
def owners(ctx: typer.Context,
           as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the owner lease of every command queue: handler, last holder, times, live or expired."""
    if ctx.invoked_subcommand is not None:
        return
    from project.messaging.ownership import queue_of, state
    from project.store.tables import utcnow
    held, now = _leases(), utcnow()
    rows = [{"queue": queue_of(h), "handler": h.key, "holder": h.holder, "acquired_at": h.acquired_at.isoformat(),
             "renewed_at": h.renewed_at.isoformat(), "expires_at": h.expires_at.isoformat(), "state": state(h, now)}
            for h in held]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{len(rows)} owner lease(s)")
    for column in ("queue", "handler", "last holder", "acquired", "renewed", "expires", "state"):
        table.add_column(column, overflow="fold")
    for h in held:
        table.add_row(queue_of(h), h.key, h.holder, f"{h.acquired_at:%Y-%m-%d %H:%M:%S}",
                      f"{h.renewed_at:%Y-%m-%d %H:%M:%S}", f"{h.expires_at:%Y-%m-%d %H:%M:%S}",
                      "[green]live[/green]" if state(h, now) == "live" else "[yellow]expired[/yellow]")
    console.print(table)


@owners_cli.command()
def release(queue: str = typer.Argument(..., help="The command queue, e.g. orders.place_order.")) -> None:
    """Delete a queue's owner lease, so that a renamed handler can start now (stop the old workers first)."""
    from project.messaging.ownership import describe, lease_name, queue_of, state
    from project.store.lease import release as release_lease
    held = {queue_of(h): h for h in _leases()}
    known = set(loaded_bus().registry.commands) | set(held)
    if queue not in known:
        fail(f"{queue!r} is not a command queue of this bus nor leased; known: {', '.join(sorted(known)) or 'none'}")
    if queue not in held or not release_lease(database_engine(), lease_name(queue)):
        fail(f"{queue} has no owner lease; nothing to release (`bus owners` lists them)", code=1)
    console.print(f"released the owner lease of {queue}: it was {describe(held[queue])}", highlight=False)
    if state(held[queue]) == "live":
        console.print(f"[yellow]warning[/yellow]: it was live; if {held[queue].holder} or a replica still runs, "
                      f"it takes the lease back at its next renewal: stop those workers first", highlight=False)
