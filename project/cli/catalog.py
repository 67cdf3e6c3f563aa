"""`bus catalog`: write docs/catalog.md or an AsyncAPI document from the loaded bus.

The AsyncAPI document's `info` names the service's contracts: `--title` / `--version`,
else the app's configuration (`bus_catalog_title` / `bus_catalog_version` in its
celeryconfig.py), else "celery-bus contracts" and the installed celery-bus version.
"""
from __future__ import annotations

import shlex
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Mapping

import typer

from project.cli.common import fail, loaded_bus
from project.observe.catalog import (
    DEFAULT_ASYNCAPI,
    DEFAULT_MARKDOWN,
    contracts,
    markdown,
)

#: the configuration keys a service names its AsyncAPI document with
TITLE_KEY, VERSION_KEY = "bus_catalog_title", "bus_catalog_version"


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
    title: str = typer.Option(None, "--title", help=f"The AsyncAPI document's title. Default: the app's "
                                                    f"{TITLE_KEY} setting, else 'celery-bus contracts'."),
    version: str = typer.Option(None, "--version", help=f"The AsyncAPI document's version. Default: the app's "
                                                        f"{VERSION_KEY} setting, else celery-bus's version."),
    check: bool = typer.Option(False, "--check", help="Write nothing; exit 1 if the file is not what would be written."),
) -> None:
    """Write docs/catalog.md (contracts, JSON Schemas, owners, senders, subscribers, flow) or an AsyncAPI document."""
    if not asyncapi and (title is not None or version is not None):
        fail("--title and --version name the AsyncAPI document: add --asyncapi, or leave them out")
    bus = loaded_bus()
    found = contracts(bus.topology, bus.command_policy, bus.process_managers)
    target = output or str(DEFAULT_ASYNCAPI if asyncapi else DEFAULT_MARKDOWN)
    if asyncapi:
        from project.observe.asyncapi import DEFAULT_TITLE, document, dump
        conf = bus.app.conf
        info = {"title": _info(title, "--title", conf, TITLE_KEY, "give the document a name, e.g. --title "
                               "'Shop contracts'", f"set the document's name, or remove it for {DEFAULT_TITLE!r}"),
                "version": _info(version, "--version", conf, VERSION_KEY, "give the contracts' version, e.g. "
                                 "--version 1.4.0", "set the contracts' version, or remove it for celery-bus's")}
        kind = fmt.value if fmt is not Format.auto else ("json" if target.endswith(".json") else "yaml")
        text = dump(document(found, **{k: v for k, v in info.items() if v is not None}), kind)
    else:
        text = markdown(found)
    if target == "-":
        sys.stdout.write(text)
        return
    path = Path(target)
    if check:
        current = path.read_text() if path.exists() else None
        if current != text:
            again = [*(["--asyncapi"] if asyncapi else []), *(["--title", title] if title is not None else []),
                     *(["--version", version] if version is not None else []),
                     *(["--output", output] if output is not None else [])]
            typer.echo(f"{path} is stale: run `{shlex.join(['bus', 'catalog', *again])}` and commit it", err=True)
            raise typer.Exit(1)
        typer.echo(f"{path} is up to date")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    typer.echo(f"wrote {path}")


def _info(flag: str | None, option: str, conf: Mapping[str, Any], key: str, flag_fix: str, key_fix: str) -> str | None:
    """The flag's value, else the configuration's `key`, else None (the document's default); refused when blank."""
    if flag is not None:
        if not flag.strip():
            fail(f"{option} is empty: {flag_fix}")
        return flag
    value = conf.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        fail(f"{key} (Celery configuration) is {value!r}, not a string: quote it, e.g. '{value}'")
    if not value.strip():
        fail(f"{key} (Celery configuration) is empty: {key_fix}")
    return value
