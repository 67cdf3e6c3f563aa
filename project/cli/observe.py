"""`bus topology` and `bus trace`: what the bus is wired to do, and what it did.

Both read the bus's own data (the registry; the database), so they work without Flower
or a running worker.
"""
from __future__ import annotations

import json

import typer
from rich.table import Table

from project.cli.common import console, loaded_bus, redact


def topology(as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
             mermaid: bool = typer.Option(False, "--mermaid", help="A Mermaid flowchart of the message flow.")) -> None:
    """Print every command and event with its task, queue, exchange, handler and retry policy."""
    from project.observe.mermaid import describe, flowchart, policy_text
    bus = loaded_bus()
    catalog = describe(bus.topology, bus.command_policy)
    if as_json:
        typer.echo(json.dumps(catalog, indent=2))
        return
    if mermaid:
        typer.echo(flowchart(catalog), nl=False)
        return
    table = Table(title="commands")
    for column in ("task = queue", "boundary", "handler", "publishes / sends", "retry"):
        table.add_column(column)
    for c in catalog["commands"]:
        table.add_row(c["task"], c["boundary"], c["handler"], _outputs(c), policy_text(c["retry"]))
    console.print(table)
    if catalog["events"]:
        events = Table(title="events")
        for column in ("exchange (fanout)", "owner", "subscribers"):
            events.add_column(column)
        for e in catalog["events"]:
            events.add_row(e["exchange"], e["owner"], ", ".join(s["queue"] for s in e["subscribers"]) or "-")
        console.print(events)
        subscribers = Table(title="subscribers")
        for column in ("task = queue", "event", "boundary", "handler", "publishes / sends", "retry"):
            subscribers.add_column(column)
        for e in catalog["events"]:
            for s in e["subscribers"]:
                subscribers.add_row(s["task"], e["exchange"], s["boundary"], s["handler"], _outputs(s),
                                    policy_text(s["retry"]))
        console.print(subscribers)


def _outputs(entry: dict) -> str:
    return ", ".join([*entry.get("publishes", ()), *entry.get("sends", ())]) or "-"


def trace(correlation_id: str = typer.Argument(..., help="The conversation: the id of the message that began it."),
          as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Print a conversation as a tree: command -> events -> subscriber runs -> what they sent."""
    from sqlalchemy.exc import SQLAlchemyError

    from project.observe.trace import conversation, render
    bus = loaded_bus()
    try:
        found = conversation(bus.engine(), bus.topology, correlation_id)
    except SQLAlchemyError as exc:
        typer.echo(f"cannot read the bus database at {redact(bus.settings.database_url)}: "
                   f"{str(exc.orig if hasattr(exc, 'orig') else exc).splitlines()[0]}. Check BUS_DATABASE_URL, "
                   f"and that the schema is current: bus db upgrade", err=True)
        raise typer.Exit(1) from None
    if found is None:
        typer.echo(f"no conversation {correlation_id!r} in the bus's records: no command, execution, outbox row, "
                   f"intake or dead letter carries it. Pass the id of the message that began it (the task id "
                   f"of the first command, or the bus_correlation_id header); records older than "
                   f"BUS_KEY_RETENTION are purged.", err=True)
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps(found.to_dict(), indent=2, default=str))
        return
    console.print(render(found))
