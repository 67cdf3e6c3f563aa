"""`bus catalog`: write docs/catalog.md or an AsyncAPI document from the loaded bus."""
from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path

import typer

from project.cli.common import loaded_bus
from project.observe.catalog import (
    DEFAULT_ASYNCAPI,
    DEFAULT_MARKDOWN,
    contracts,
    markdown,
)


class Format(str, Enum):
    auto = "auto"
    yaml = "yaml"
    json = "json"


def catalog(
    asyncapi: bool = typer.Option(False, "--asyncapi", help="Write an AsyncAPI 3.0 document instead of Markdown."),
    output: str = typer.Option(None, "--output", "-o",
                               help=f"File to write ('-': standard output). Default: {DEFAULT_MARKDOWN}, "
                                    f"or {DEFAULT_ASYNCAPI} with --asyncapi."),
    fmt: Format = typer.Option(Format.auto, "--format",
                               help="AsyncAPI as yaml or json; auto: json for a .json output, else yaml."),
    check: bool = typer.Option(False, "--check", help="Write nothing; exit 1 if the file is not what would be written."),
) -> None:
    """Write docs/catalog.md (contracts, JSON Schemas, owners, senders, subscribers, flow) or an AsyncAPI document."""
    catalog = contracts(loaded_bus())
    target = output or str(DEFAULT_ASYNCAPI if asyncapi else DEFAULT_MARKDOWN)
    if asyncapi:
        from project.observe.asyncapi import document, dump
        kind = fmt.value if fmt is not Format.auto else ("json" if target.endswith(".json") else "yaml")
        text = dump(document(catalog), kind)
    else:
        text = markdown(catalog)
    if target == "-":
        sys.stdout.write(text)
        return
    path = Path(target)
    if check:
        current = path.read_text() if path.exists() else None
        if current != text:
            typer.echo(f"{path} is stale: run `bus catalog{' --asyncapi' if asyncapi else ''}"
                       f"{'' if output is None else ' --output ' + output}` and commit it", err=True)
            raise typer.Exit(1)
        typer.echo(f"{path} is up to date")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    typer.echo(f"wrote {path}")
