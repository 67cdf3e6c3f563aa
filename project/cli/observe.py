"""`bus topology` and `bus trace`: what the bus is wired to do, and what it did.

Both read the bus's own data (the registry; the database), so they work without Flower
or a running worker.
"""
from __future__ import annotations

import json
from typing import Any

import typer
from rich.table import Table

from project.cli.common import console, loaded_bus, redact


def topology(as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
             mermaid: bool = typer.Option(False, "--mermaid", help="A Mermaid flowchart of the message flow.")) -> None:
    """Print every command and event with its task, queue, exchange, handler and retry policy, and every process
    manager with its state, correlation, steps and timeouts."""
    from project.observe.mermaid import correlation_text, describe, flowchart, policy_text, state_text, step_text, \
        timeouts_text
    bus = loaded_bus()
    catalog = describe(bus.topology, bus.command_policy, bus.process_managers)
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
    if catalog["process_managers"]:
        managers = Table(title="process managers")
        for column in ("name", "boundary", "state", "correlation", "steps: event -> task = queue",
                       "timeouts -> task", "on missing", "retry"):
            managers.add_column(column)
        for m in catalog["process_managers"]:
            managers.add_row(m["name"], m["boundary"], state_text(m), correlation_text(m["correlation"]),
                             "\n".join(step_text(step) for step in m["handles"]), timeouts_text(m), m["on_missing"],
                             policy_text(m["retry"]))
        console.print(managers)


def _outputs(entry: dict) -> str:
    return ", ".join([*entry.get("publishes", ()), *entry.get("sends", ())]) or "-"


def trace(correlation_id: str = typer.Argument(..., metavar="ID", help=(
              "The conversation: the id of the message that began it; or a process-manager instance's id "
              "(its correlation value, e.g. an order id).")),
          as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Print a conversation as a tree: command -> events -> subscriber runs -> what they sent; or the history of
    the process-manager instances of that id."""
    from sqlalchemy.exc import SQLAlchemyError

    from project.observe.trace import conversation, render
    bus = loaded_bus()
    try:
        found = conversation(bus.engine(), bus.topology, correlation_id)
        processes = _instances(bus, correlation_id)
    except SQLAlchemyError as exc:
        typer.echo(f"cannot read the bus database at {redact(bus.settings.database_url)}: "
                   f"{str(exc.orig if hasattr(exc, 'orig') else exc).splitlines()[0]}. Check BUS_DATABASE_URL, "
                   f"and that the schema is current: bus db upgrade", err=True)
        raise typer.Exit(1) from None
    if found is None and not processes:
        typer.echo(f"no conversation {correlation_id!r} in the bus's records: no command, execution, outbox row, "
                   f"intake or dead letter carries it, and no process-manager instance has that id. Pass the id of "
                   f"the message that began it (the task id of the first command, or the bus_correlation_id "
                   f"header), or an instance's id (`bus process list`); records older than BUS_KEY_RETENTION are "
                   f"purged.", err=True)
        raise typer.Exit(1)
    if as_json:
        from project.cli.instances import instance_json
        shown = found.to_dict() if found is not None else {}
        if processes:
            shown["process_instances"] = [instance_json(bus.engine(), declared, instance)
                                          for declared, instance in processes]
        typer.echo(json.dumps(shown, indent=2, default=str))
        return
    if found is not None:
        console.print(render(found))
    from project.cli.instances import print_instance
    for declared, instance in processes:
        print_instance(bus.engine(), declared, instance)


def _instances(bus: Any, instance_id: str) -> list[tuple[Any, Any]]:
    """(manager, instance) for every process manager with an instance of this id."""
    found = []
    with bus.engine().connect() as conn:
        for _, declared in sorted(bus.process_managers.items()):
            instance = declared.instance(conn, instance_id)
            if instance is not None:
                found.append((declared, instance))
    return found
