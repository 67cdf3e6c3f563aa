"""The bus apart from its application: the generic `bus`, a worker and the test kit in a
directory with no configuration, and an application's own `bus` commands (`bus_cli`).

Each case runs a fresh process in a temporary directory with no BUS_/CELERY_ variables: what
the installed bus finds in a service that has not configured it yet.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from celery import Celery

from project.cli.application import register
from project.core import Bus
from project.errors import ConfigurationError
from project.settings import NO_TASK_MODULES
from project.testing.harness import BusHarness
from tests.conftest import REPO

BUS = str(Path(sys.executable).with_name("bus"))
NO_CONFIGURATION = {k: v for k, v in os.environ.items() if not k.startswith(("BUS_", "CELERY_", "PYTHONPATH"))}


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**NO_CONFIGURATION, "BUS_HOME": str(cwd / ".bus"), "COLUMNS": "200", **env}
    return subprocess.run(args, cwd=cwd, env=full, capture_output=True, text=True, timeout=120)


def commands(help_text: str) -> set[str]:
    """The command names in `bus --help`'s Commands panel."""
    return set(re.findall(r"^│ ([a-z][a-z-]*) ", help_text, flags=re.MULTILINE))


def service(tmp_path: Path, config: str) -> Path:
    """A service directory: its celeryconfig.py and a package `myservice` with a `bus` command."""
    (tmp_path / "myservice").mkdir()
    (tmp_path / "myservice" / "__init__.py").write_text("")
    (tmp_path / "myservice" / "cli.py").write_text(textwrap.dedent('''\
        import typer


        def register(cli: typer.Typer) -> None:
            @cli.command()
            def hello(name: str = "world") -> None:
                """Greet (the service's own command)."""
                typer.echo(f"hello {name}")
    '''))
    (tmp_path / "celeryconfig.py").write_text(textwrap.dedent(config))
    return tmp_path


# ---- the generic `bus` ---------------------------------------------------------------------------------
def test_bus_help_answers_in_a_directory_with_no_configuration(tmp_path):
    # When `bus --help` runs where nothing is configured
    done = run([BUS, "--help"], tmp_path)
    # Then it lists the bus's own commands, and none of this repository's shop
    assert done.returncode == 0, done.stderr
    assert {"topology", "check", "db", "dlq", "relay"} <= commands(done.stdout)
    assert not {"demo", "api"} & commands(done.stdout)
    # And it started nothing
    assert not (tmp_path / ".bus").exists()


@pytest.mark.parametrize("args", [["topology"], ["catalog", "--output", "-"]])
def test_a_command_that_needs_the_registry_stops_with_one_line_naming_bus_task_modules(tmp_path, args):
    # Given no task modules configured; When a command that reads the registry runs
    done = run([BUS, *args], tmp_path)
    # Then it exits 2 with one line naming the setting, no traceback
    assert (done.returncode, done.stderr) == (2, f"error: {NO_TASK_MODULES}\n")


@pytest.mark.parametrize("modules", ["inventory.tasks", "tasks_of_nobody"])
def test_a_task_module_that_cannot_be_found_is_one_line_naming_it(tmp_path, modules):
    # Given BUS_TASK_MODULES naming a module that is not on the path from here
    # When a command that reads the registry runs
    done = run([BUS, "topology"], tmp_path, BUS_TASK_MODULES=modules)
    # Then it exits 2 with one line that names the module, the setting and the fix, no traceback
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert modules in done.stderr and "BUS_TASK_MODULES" in done.stderr and "PYTHONPATH" in done.stderr


def test_an_import_error_inside_a_task_module_keeps_its_traceback(tmp_path):
    # Given a task module that exists but imports something missing (the service's own bug)
    (tmp_path / "broken_tasks.py").write_text("import not_installed_anywhere\n")
    # When a command that reads the registry runs
    done = run([BUS, "topology"], tmp_path, BUS_TASK_MODULES="broken_tasks")
    # Then the error is the module's own, with the line that raised it
    assert done.returncode != 0
    assert "not_installed_anywhere" in done.stderr and "broken_tasks.py" in done.stderr, done.stderr


def test_the_repositorys_bus_has_the_shops_commands():
    # Given this repository's celeryconfig.py (bus_cli = "entrypoints.cli:register")
    done = run([BUS, "--help"], REPO)
    # Then `bus` run from its root adds `bus demo` and `bus api`
    assert done.returncode == 0, done.stderr
    assert {"demo", "api", "topology"} <= commands(done.stdout)


def test_a_service_adds_its_own_commands_with_bus_cli(tmp_path):
    # Given a service whose celeryconfig.py names its task modules and its `bus` commands
    root = service(tmp_path, '''\
        from project.config import *  # noqa: F401,F403
        include = ["myservice.tasks"]
        bus_cli = "myservice.cli:register"
    ''')
    # When `bus hello` runs in its directory
    done = run([BUS, "hello", "--name", "bus"], root)
    # Then the service's command answers beside the bus's own
    assert (done.returncode, done.stdout) == (0, "hello bus\n"), done.stderr
    assert {"hello", "topology"} <= commands(run([BUS, "--help"], root).stdout)


@pytest.mark.parametrize("named, why", [
    ("myservice.cli", "name a function as 'package.module:function'"),
    ("myservice.cli:nope", "name a function as 'package.module:function' (myservice.cli has no 'nope')"),
    ("myservise.cli:register", "name a function as 'package.module:function' (no module 'myservise' on sys.path)"),
])
def test_a_bus_cli_that_does_not_resolve_is_one_line_naming_the_setting(tmp_path, named, why):
    root = service(tmp_path, f'''\
        from project.config import *  # noqa: F401,F403
        bus_cli = {named!r}
    ''')
    done = run([BUS, "--help"], root)
    assert (done.returncode, done.stderr) == (2, f"error: bus_cli = {named!r} in celeryconfig: {why}\n")


def test_a_bad_setting_read_when_the_config_is_imported_is_one_line_too(tmp_path):
    # Given a malformed setting that project/config.py checks at import
    done = run([BUS, "--help"], tmp_path, BUS_KEY_RETENTION="a week")
    # Then the CLI prints it as one line and exits 2
    assert done.returncode == 2
    assert done.stderr.startswith("error: BUS_KEY_RETENTION='a week' is not valid") and done.stderr.count("\n") == 1


def test_register_refuses_a_name_without_a_function():
    with pytest.raises(ConfigurationError, match=r"^bus_cli = 'x' in celeryconfig: name a function as"):
        register(None, "x", "celeryconfig")


# ---- the worker and the test kit -------------------------------------------------------------------------
def test_a_worker_without_task_modules_stops_with_one_line_in_its_log(tmp_path):
    # Given no task modules configured
    log = tmp_path / "worker.log"
    # When a worker starts
    done = run([sys.executable, "-m", "celery", "-A", "project", "worker", "--logfile", str(log), "-l", "info"],
               tmp_path)
    # Then it exits non-zero, its log saying why in one line and no traceback
    assert done.returncode == 2, done.stderr
    text = log.read_text()
    assert re.search(rf"CRITICAL/MainProcess\] {re.escape(NO_TASK_MODULES)}$", text, flags=re.MULTILINE), text
    assert "Traceback" not in text + done.stderr
    # And it started nothing (not even the embedded broker)
    assert not (tmp_path / ".bus" / "redis.sock").exists()


def test_the_harness_refuses_a_bus_without_task_modules(tmp_path):
    # Given a bus whose Celery app names no task modules
    bus = Bus(Celery("no-tasks", set_as_current=False))
    # When the harness is built on it, Then the error names the setting
    with pytest.raises(ConfigurationError) as error:
        BusHarness(bus, f"sqlite:///{tmp_path}/bus.db")
    assert str(error.value) == NO_TASK_MODULES


def test_the_bus_harness_fixture_fails_with_one_line_without_task_modules(tmp_path):
    # Given a service's test using the plugin's bus_harness, and no task modules configured
    (tmp_path / "test_service.py").write_text("def test_it(bus_harness):\n    pass\n")
    # When pytest runs it
    done = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_service.py"], tmp_path)
    # Then the test errors with the one line, not a traceback into the bus
    assert done.returncode == 1, done.stdout + done.stderr
    assert NO_TASK_MODULES in done.stdout
    assert "project/settings.py" not in done.stdout and "raise ConfigurationError" not in done.stdout
