"""What every `bus` command group shares: the consoles, the loaded bus, option parsing."""
from __future__ import annotations

from datetime import timedelta
from typing import NoReturn

import typer

from project.durations import parse_duration
from project.observe.console import make_console

console = make_console()
#: errors and progress go to stderr, so stdout stays parseable
errors = make_console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Refuse with one line on stderr, `error: message` (the message names the fix), and exit `code`."""
    errors.print(f"[red]error[/red]: {message}", highlight=False)
    raise typer.Exit(code)


def loaded_bus():
    """The bus with every tasks module of the configuration imported (full registry)."""
    from project import app, bus
    from project.settings import import_task_modules
    import_task_modules(app)  # none configured, or one not found: one line naming the fix (exit 2)
    return bus


def database_engine():
    """The engine of the configured BUS_DATABASE_URL (no tasks modules imported: the store alone)."""
    from project.settings import load
    from project.store.engine import engine_for
    return engine_for(load().database_url)


def ago(delta: timedelta) -> str:
    """`delta` as an operator reads it, in its largest whole unit: 90s, 10m, 3h, 2d."""
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def duration(text: str, option: str) -> timedelta:
    """`text` as a timedelta; a usage error naming `option` and the accepted forms otherwise."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


def redact(url: str) -> str:
    head, _, tail = url.rpartition("@")
    return f"{head.split('://')[0]}://***@{tail}" if head else url
