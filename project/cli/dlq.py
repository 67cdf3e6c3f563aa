"""`bus dlq ...`: list, show, replay, purge and drain dead letters (see project/dead_letters/admin.py).

Bad input (an unknown id, reason or queue, flags that contradict each other) prints
what is wrong and how to ask instead, and exits with status 2; nothing is changed.
"""
from __future__ import annotations

import json
from typing import Optional

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from project.cli.common import console, database_engine, errors, fail, loaded_bus
from project.durations import parse_duration

dlq_cli = typer.Typer(help="Dead letters: messages the bus could not process, kept with the reason.",
                      no_args_is_help=True)
#: replays of this many entries or more show a progress bar (on stderr)
PROGRESS_FROM = 10



def _bus():
    return loaded_bus()


def _selection(queue: str | None, reason: str | None, older_than: str | None, replayed: bool | None = None):
    from project.dead_letters.admin import DeadLetterError, Selection, check_reason
    age = None
    if older_than is not None:
        try:
            age = parse_duration(older_than)
        except ValueError as exc:
            fail(f"--older-than {older_than!r}: {exc}")
    try:
        check_reason(reason)
    except DeadLetterError as exc:
        fail(str(exc))
    return Selection(queue=queue, reason=reason, older_than=age, replayed=replayed)


@dlq_cli.command("list")
def list_(queue: Optional[str] = typer.Option(None, "--queue", help="Only this queue."),
          reason: Optional[str] = typer.Option(None, "--reason", help="Only this reason."),
          pending: bool = typer.Option(False, "--pending", help="Leave out entries already replayed."),
          limit: Optional[int] = typer.Option(None, "--limit", min=1, help="At most this many, oldest first."),
          as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List dead letters, oldest first."""
    from project.dead_letters.admin import as_dict, find
    rows = find(database_engine(), _selection(queue, reason, None, False if pending else None), limit)
    if as_json:
        typer.echo(json.dumps([as_dict(r) for r in rows], indent=2))
        return
    table = Table(title=f"{len(rows)} dead letter(s)")
    for column in ("id", "reason", "queue", "message id", "attempts", "last failed", "replayed", "error"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(str(r.id), r.reason, r.queue or "-", r.message_id or "-", str(r.attempts),
                      f"{r.last_failed_at:%Y-%m-%d %H:%M:%S}",
                      f"{r.replays}x, {r.replayed_at:%H:%M:%S}" if r.replayed_at else (f"{r.replays}x" if r.replays else "-"),
                      (r.error or "")[:120])
    console.print(table)


@dlq_cli.command()
def show(letter_id: int = typer.Argument(..., metavar="ID"),
         as_json: bool = typer.Option(False, "--json", help="Machine-readable output (body as base64 too).")) -> None:
    """Show one dead letter: reason, error, traceback, headers and body."""
    from project.dead_letters.admin import DeadLetterError, as_dict, get
    try:
        [row] = get(database_engine(), [letter_id])
    except DeadLetterError as exc:
        fail(str(exc))
    view = as_dict(row, body=True)
    if as_json:
        typer.echo(json.dumps(view, indent=2, default=str))
        return
    for key in ("id", "reason", "task", "queue", "boundary", "message_id", "correlation_id", "attempts",
                "first_failed_at", "last_failed_at", "replays", "replayed_at", "content_type", "content_encoding"):
        console.print(f"[bold]{key}[/bold]: {view[key]}", highlight=False)
    console.print(f"[bold]error[/bold]: {view['error']}", highlight=False)
    console.print("[bold]headers[/bold]:", json.dumps(view["headers"], indent=2, default=str), highlight=False)
    body = view["body_text"]
    console.print(f"[bold]body[/bold] ({view['body_size']} bytes):",
                  body if body is not None else f"(binary, base64) {view['body_base64']}", highlight=False)
    if view["traceback"]:
        console.print("[bold]traceback[/bold]:", view["traceback"], highlight=False)


@dlq_cli.command()
def replay(ids: Optional[list[int]] = typer.Argument(None, metavar="[ID]...", help="Dead letters to re-send."),
           queue: Optional[str] = typer.Option(None, "--queue", help="Re-send the pending dead letters of this queue."),
           reason: Optional[str] = typer.Option(None, "--reason", help="With --queue: only this reason."),
           include_replayed: bool = typer.Option(False, "--all",
                                                 help="With --queue: also entries replayed before."),
           as_json: bool = typer.Option(False, "--json", help="Print the replayed ids as JSON.")) -> None:
    """Re-send dead letters, each to its own queue only, keeping message and event ids."""
    from project.dead_letters.admin import DeadLetterError, find, get
    from project.dead_letters.admin import replay as replay_rows
    if ids and queue:
        fail("give dead-letter ids or --queue, not both")
    if not ids and not queue:
        fail("give the ids to replay (`bus dlq list` shows them), or --queue Q for the pending ones of a queue")
    if ids and (reason or include_replayed):
        fail("--reason and --all go with --queue; with ids, exactly those entries are replayed")
    selection = None if ids else _selection(queue, reason, None, replayed=None if include_replayed else False)
    try:
        rows = get(database_engine(), ids) if ids else find(database_engine(), selection)
        bus = _bus()
        if queue and queue not in {q.name for q in bus.topology.queues()}:
            raise DeadLetterError(f"--queue {queue!r} is not a queue of this bus; `bus topology` lists them")
        if len(rows) < PROGRESS_FROM or as_json:
            sent = replay_rows(bus.wiring, rows)
        else:
            with Progress(TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                          console=errors, transient=True) as progress:
                task = progress.add_task("replay", total=len(rows))
                sent = replay_rows(bus.wiring, rows, on_sent=lambda _row: progress.advance(task))
    except DeadLetterError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps({"replayed": [r.id for r in rows]}))
        return
    where = f" of {queue}" if queue else ""
    console.print(f"replayed {sent} dead letter(s){where}", highlight=False)


@dlq_cli.command()
def purge(queue: Optional[str] = typer.Option(None, "--queue", help="Only this queue."),
          reason: Optional[str] = typer.Option(None, "--reason", help="Only this reason."),
          older_than: Optional[str] = typer.Option(None, "--older-than", help="Last failed longer ago, e.g. 7d, 12h."),
          replayed: bool = typer.Option(False, "--replayed", help="Only entries already replayed."),
          everything: bool = typer.Option(False, "--all", help="Every dead letter (no filter).")) -> None:
    """Delete dead letters for good."""
    from project.dead_letters.admin import purge as purge_rows
    selection = _selection(queue, reason, older_than, True if replayed else None)
    if everything and not selection.empty:
        fail("--all purges every dead letter; leave it out to purge by --queue/--reason/--older-than/--replayed")
    if not everything and selection.empty:
        fail("say what to purge: --queue, --reason, --older-than, --replayed, or --all for every dead letter")
    count = purge_rows(database_engine(), selection)
    console.print(f"purged {count} dead letter(s)", highlight=False)


@dlq_cli.command()
def drain(as_json: bool = typer.Option(False, "--json", help="Print the count as JSON.")) -> None:
    """RabbitMQ: move what the broker dead-lettered (queue bus.dead_letter) into the store."""
    from project.dead_letters.dlx import DeadLetterExchangeError
    from project.dead_letters.dlx import drain as drain_queue
    bus = _bus()
    try:
        count = drain_queue(bus.settings)
    except DeadLetterExchangeError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps({"drained": count}))
    else:
        console.print(f"drained {count} message(s) into the store", highlight=False)
