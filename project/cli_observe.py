"""`bus topology`: what the bus is wired to do, read from its registry (no server needed)."""
from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def topology(as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
             mermaid: bool = typer.Option(False, "--mermaid", help="A Mermaid flowchart of the message flow.")) -> None:
    """Print every command and event with its task, queue, exchange, handler and retry policy."""
    from project.cli import loaded_bus
    from project.mermaid import describe, flowchart, policy_text
    catalog = describe(loaded_bus())
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
