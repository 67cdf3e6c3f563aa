"""`bus timers ...`: the durable timers waiting in the outbox (project/store/timers.py): list, cancel.

`bus timers list` shows each pending timer (id, kind, name, due at, due in, correlation),
soonest first. `bus timers cancel ID` exits 0 when the timer will not run, 1 when it is
too late (published, or being published) or no timer has that id, each with one line
saying which, and 2 on an id that cannot be one (empty, longer than the column); nothing
is changed then.
"""
from __future__ import annotations

import json
from datetime import timedelta
from typing import Optional

import typer
from rich.table import Table

from project.cli.common import ago, console, database_engine, errors, fail

timers_cli = typer.Typer(help="Durable timers: delayed commands and events waiting in the outbox.",
                         no_args_is_help=True)


def _due_in(left: timedelta) -> str:
    """`in 2h`, or `12s ago` for a timer past its due time (the relay publishes it at its next tick)."""
    return f"in {ago(left)}" if left > timedelta(0) else f"{ago(-left)} ago"


@timers_cli.command("list")
def list_(limit: Optional[int] = typer.Option(None, "--limit", min=1, help="At most this many, soonest first."),
          as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the timers not yet published nor cancelled, soonest first."""
    from project.store.tables import as_utc, utcnow
    from project.store.timers import pending
    now = utcnow()
    rows = [(row, as_utc(row.due_at)) for row in pending(database_engine(), limit)]
    if as_json:
        typer.echo(json.dumps([{"id": row.id, "kind": row.kind, "name": row.name, "due_at": due.isoformat(),
                                "due_in": (due - now).total_seconds(), "correlation_id": row.correlation_id}
                               for row, due in rows], indent=2))
        return
    table = Table(title=f"{len(rows)} pending timer(s)")
    for column in ("id", "kind", "name", "due at", "due in", "correlation"):
        table.add_column(column, overflow="fold")
    for row, due in rows:
        table.add_row(row.id, row.kind, row.name, f"{due:%Y-%m-%d %H:%M:%S}", _due_in(due - now),
                      row.correlation_id or "-")
    console.print(table)


@timers_cli.command()
def cancel(timer_id: str = typer.Argument(..., metavar="ID", help="The timer's id (`bus timers list`).")) -> None:
    """Cancel a timer that is not published yet: it will not run."""
    from project.store.tables import outbox
    from project.store.timers import Cancel
    from project.store.timers import cancel as cancel_timer
    longest = outbox.c.id.type.length
    if not timer_id.strip() or len(timer_id) > longest:
        fail(f"{timer_id!r} is not a timer id (1 to {longest} characters); `bus timers list` shows the ids")
    outcome = cancel_timer(database_engine(), timer_id)
    if outcome is Cancel.CANCELLED:
        console.print(f"timer {timer_id} is cancelled: it will not run", highlight=False)
        return
    if outcome is Cancel.TOO_LATE:
        errors.print(f"too late: timer {timer_id} is published or being published; it runs as due", highlight=False)
    else:
        errors.print(f"unknown: no timer {timer_id}; `bus timers list` shows the pending ones", highlight=False)
    raise typer.Exit(1)
