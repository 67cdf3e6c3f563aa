"""An application's own `bus` commands, named by its Celery config module.

The config module the bus uses (project/settings.py `config_module`: BUS_CONFIG_MODULE,
else a celeryconfig.py in the working directory, else project.config) may name a function
that adds commands to the `bus` Typer app:

    bus_cli = "entrypoints.cli:register"        # def register(cli: typer.Typer) -> None

This repository's celeryconfig.py adds `bus demo` and `bus api` so. Only the config module
and that function's module are imported: no app, no connection, so `bus --help` answers
anywhere (with no configuration: the generic commands alone).
"""
from __future__ import annotations

import importlib

import typer

from project.errors import ConfigurationError
from project.settings import config_module

SETTING = "bus_cli"


def extend(cli: typer.Typer) -> None:
    """Add the commands of the function the config module names in `bus_cli`, if it names one."""
    module = config_module()
    named = getattr(importlib.import_module(module), SETTING, None)
    if named:
        register(cli, named, module)


def register(cli: typer.Typer, named: str, module: str) -> None:
    """Call `named` ("package.module:function") with `cli`; a name that does not resolve is a ConfigurationError."""
    path, _, function = str(named).partition(":")
    fix = f"{SETTING} = {named!r} in {module}: name a function as 'package.module:function'"
    if not path or not function:
        raise ConfigurationError(fix)
    try:
        target = getattr(importlib.import_module(path), function)
    except ModuleNotFoundError as exc:
        if exc.name is None or not f"{path}.".startswith(f"{exc.name}."):
            raise  # the module exists, one of its own imports is missing: its traceback says which
        raise ConfigurationError(f"{fix} (no module {exc.name!r} on sys.path)") from None
    except AttributeError:
        raise ConfigurationError(f"{fix} ({path} has no {function!r})") from None
    target(cli)
