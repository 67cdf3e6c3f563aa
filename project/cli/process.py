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

from project.cli.common import ago, console, database_engine, errors, fail, loaded_bus

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
        typer.echo(json.dumps([_row(i) for i in found], indent=2, default=str))
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


def instance_json(engine: Any, declared: Any, instance: Any) -> dict[str, Any]:
    """One instance as `bus process show --json` and `bus trace <instance id> --json` print it."""
    from project.observe.processes import history, timers
    return {**_row(instance), "state": instance.state.model_dump(mode="json"), "timers": timers(engine, instance),
            "history": [vars(step) for step in history(engine, declared, instance)]}


def print_instance(engine: Any, declared: Any, instance: Any) -> None:
    """One instance as `bus process show` and `bus trace <instance id>` print it: status, timeouts, state, history."""
    from project.observe.processes import history, timers
    from project.store.tables import utcnow
    pending, steps = timers(engine, instance), history(engine, declared, instance)
    now = utcnow()
    console.print(f"{instance.manager} {instance.instance_id}: {instance.status}, version {instance.version}, started "
                  f"{instance.started_at:%Y-%m-%d %H:%M:%S}, updated {instance.updated_at:%Y-%m-%d %H:%M:%S}"
                  + (f", completed {instance.completed_at:%Y-%m-%d %H:%M:%S}" if instance.completed_at else ""),
                  highlight=False)
    for name, timer in sorted(pending.items()):
        when = timer["due_at"]
        console.print(f"pending timeout {name}: timer {timer['timer_id']}, "
                      + ("not in the outbox (purged?)" if when is None else
                         f"due {when:%Y-%m-%d %H:%M:%S} ({'in ' + ago(when - now) if when > now else 'due now'}"
                         f"{', published: its delivery is on the way' if timer['published'] else ''})"),
                      highlight=False)
    console.print(f"state: {instance.state.model_dump_json()}", highlight=False)
    table = Table(title=f"history: {len(steps)} step(s) in the execution log")
    for column in ("started", "message", "task", "state", "attempts", "trace"):
        table.add_column(column, overflow="fold")
    for step in steps:
        table.add_row(f"{step.started_at:%Y-%m-%d %H:%M:%S}", step.message, step.task, step.state,
                      str(step.attempts), f"bus trace {step.correlation_id}" if step.correlation_id else "-")
    console.print(table)


@process_cli.command()
def diagram(manager: str = typer.Argument(..., help="The process manager.")) -> None:
    """Print the manager's Mermaid state diagram, drawn from its declaration and its handlers' source."""
    from project.observe.process_diagram import state_diagram
    typer.echo(state_diagram(_manager(manager)), nl=False)


def _row(instance: Any) -> dict[str, Any]:
    return {"manager": instance.manager, "instance_id": instance.instance_id, "status": instance.status,
            "version": instance.version, "pending_timeouts": sorted(instance.timers),
            "started_at": instance.started_at, "updated_at": instance.updated_at,
            "completed_at": instance.completed_at}
