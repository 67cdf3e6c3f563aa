"""`bus process ...`: process-manager instances and their declarations: list, show, diagram.

`bus process list [--manager M] [--status running|completed]` lists stored instances, the
most recently changed first. `bus process show MANAGER INSTANCE_ID` prints one instance:
status, version, times, pending timeouts (with their timers' due times), its state, and
its history as far as the execution log shows it (project/observe/processes.py says what
it cannot show). `bus process diagram MANAGER` prints the manager's Mermaid state diagram
(project/observe/process_diagram.py). A manager or status that cannot be one is refused
in one line with status 2; an instance that does not exist is status 1.
"""
from __future__ import annotations

import json
from typing import Any, Optional

import typer
from rich.table import Table

from project.cli.common import console, database_engine, errors, fail, loaded_bus
from project.cli.instances import instance_json, print_instance, row

process_cli = typer.Typer(help="Process managers: their instances, histories and state diagrams.",
                          no_args_is_help=True)
STATUSES = ("running", "completed")


def _manager(name: str) -> Any:
    """The declared manager `name`, or a one-line refusal naming the declared ones (status 2)."""
    managers = loaded_bus().process_managers
    if name not in managers:
        fail(f"no process manager {name!r}; declared: {', '.join(sorted(managers)) or 'none'} "
             f"(`bus process list` shows instances of every manager)")
    return managers[name]


@process_cli.command("list")
def list_(manager: Optional[str] = typer.Option(None, "--manager", help="Only this manager's instances."),
          status: Optional[str] = typer.Option(None, "--status", help="running or completed."),
          limit: Optional[int] = typer.Option(None, "--limit", min=1, help="At most this many, newest first."),
          as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List process-manager instances, the most recently changed first."""
    from project.observe.processes import instances
    if status is not None and status not in STATUSES:
        fail(f"--status {status!r}: use one of {', '.join(STATUSES)}")
    if manager is not None:
        _manager(manager)
    found = instances(database_engine(), manager, status, limit)
    if as_json:
        typer.echo(json.dumps([row(i) for i in found], indent=2, default=str))
        return
    table = Table(title=f"{len(found)} instance(s)")
    for column in ("manager", "instance", "status", "version", "pending timeouts", "updated"):
        table.add_column(column, overflow="fold")
    for i in found:
        table.add_row(i.manager, i.instance_id, i.status, str(i.version), ", ".join(sorted(i.timers)) or "-",
                      f"{i.updated_at:%Y-%m-%d %H:%M:%S}")
    console.print(table)


@process_cli.command()
def show(manager: str = typer.Argument(..., help="The process manager (`bus process list` shows them)."),
         instance_id: str = typer.Argument(..., metavar="INSTANCE_ID", help="The instance: its correlation value."),
         as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Show one instance: status, version, pending timeouts, state and history."""
    declared = _manager(manager)
    engine = database_engine()
    with engine.connect() as conn:
        instance = declared.instance(conn, instance_id)
    if instance is None:
        errors.print(f"{manager} has no instance {instance_id!r}: it never started, or it is another manager's; "
                     f"`bus process list --manager {manager}` shows its instances", highlight=False)
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps(instance_json(engine, declared, instance), indent=2, default=str))
        return
    print_instance(engine, declared, instance)


@process_cli.command()
def diagram(manager: str = typer.Argument(..., help="The process manager.")) -> None:
    """Print the manager's Mermaid state diagram, drawn from its declaration and its handlers' source."""
    from project.observe.process_diagram import state_diagram
    typer.echo(state_diagram(_manager(manager)), nl=False)
