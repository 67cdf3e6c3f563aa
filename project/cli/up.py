"""`bus up`: the whole bus in one terminal, for development without Docker (Procfile-style).

Against the configured broker and database (CELERY_BROKER_URL / BUS_DATABASE_URL, the
embedded default when unset; migrations applied first) it starts, as child processes:
- one `celery -A project worker --boundary B` per boundary of the registry (`bus`, the
  maintenance boundary, included), or those of `--only`;
- `celery -A project beat` (the outbox relay and key purge schedule);
- `celery -A project flower` when FLOWER_BASIC_AUTH is set (Flower refuses to run
  without authentication); otherwise it is skipped with a hint;
- `bus api` when this CLI has it and the [api] extra is importable; otherwise skipped,
  saying why.

What it guarantees: every line a child prints is shown prefixed with the child's name.
Each child leads a process group of its own and is signalled by PID, never by name.
Ctrl-C or SIGTERM stops every child (SIGTERM to its main process, so a worker's warm
shutdown finishes its current messages; SIGKILL to its group after a grace period; a
second Ctrl-C kills at once), waits for all of them and exits 0. If a
child exits on its own, the others are stopped the same way and `bus up` exits 1
naming that child.
"""
from __future__ import annotations

import importlib.util
import itertools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Sequence

import click
import typer

#: seconds a child has between SIGTERM and SIGKILL (a worker finishes its current message)
GRACE = 10.0
COLOURS = ("36", "33", "32", "35", "34", "31", "96", "93", "92", "95", "94", "91")


@dataclass(frozen=True)
class Child:
    """One process of the Procfile: its name (the output prefix) and its command line."""

    name: str
    argv: list[str]


@dataclass(frozen=True)
class Plan:
    children: list[Child]
    #: one line per process that was left out, saying why and how to have it
    skipped: list[str] = field(default_factory=list)


def parse_only(value: str | None, known: Iterable[str]) -> list[str] | None:
    """The boundaries of `--only orders,billing`, checked against the registry; None: all."""
    if value is None:
        return None
    known = sorted(known)
    chosen = list(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))
    unknown = [name for name in chosen if name not in known]
    if unknown or not chosen:
        what = f"unknown boundary {', '.join(map(repr, unknown))}" if unknown else "no boundary given"
        raise typer.BadParameter(f"{what}; choose from {', '.join(known)} (comma-separated, e.g. --only orders,billing)",
                                 param_hint="--only")
    return chosen


def parse_concurrency(value: str) -> int:
    """`--concurrency N`: pool processes per worker, a whole number ≥ 1."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise typer.BadParameter(f"{value!r} is not a number of pool processes; give a whole number ≥ 1 "
                                 "(e.g. --concurrency 2)")
    return number


def plan(boundaries: Sequence[str], *, home: Path, concurrency: int = 1, beat: bool = True,
         flower: bool = True, flower_auth: str = "", flower_port: int = 5555, flower_missing: str | None = None,
         api: bool = True, api_port: int = 8000, api_command: Sequence[str] | None = None,
         api_missing: str | None = None) -> Plan:
    """The children `bus up` starts, and what it leaves out (with the reason)."""
    celery = [sys.executable, "-m", "celery", "-A", "project"]
    children = [Child(f"worker.{b}", [*celery, "worker", "--boundary", b, "-c", str(concurrency),
                                      "-n", f"{b}@%h", "-l", "info"]) for b in boundaries]
    skipped = []
    if beat:
        children.append(Child("beat", [*celery, "beat", "-l", "info", "-s", str(home / "celerybeat-schedule")]))
    if flower and flower_missing:
        skipped.append(f"flower skipped: {flower_missing}")
    elif flower and not flower_auth.strip():
        skipped.append("flower skipped: Flower refuses to start without authentication; set "
                       "FLOWER_BASIC_AUTH=user:password to run it here, or pass --no-flower to silence this")
    elif flower:
        children.append(Child("flower", [*celery, "flower", f"--port={flower_port}"]))
    if api and (api_missing or not api_command):
        skipped.append(f"api skipped: {api_missing or 'this command line has no `api` command'}")
    elif api:
        children.append(Child("api", [*api_command, "api", "--port", str(api_port)]))
    return Plan(children, skipped)


def why_no_flower() -> str | None:
    """Why Flower cannot run here, or None."""
    if importlib.util.find_spec("flower") is None:
        return "the flower package is not installed: pip install 'celery-bus[flower]'"
    return None


def why_no_api(root: click.Command) -> str | None:
    """Why `bus api` cannot run here, or None."""
    if "api" not in getattr(root, "commands", {}):
        return "this command line has no `api` command"
    absent = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if absent:
        return f"the [api] extra is not installed ({', '.join(absent)} missing): pip install 'celery-bus[api]'"
    return None


def this_command() -> list[str] | None:
    """How to run this very CLI again (for `bus api`): the script this process was started as."""
    script = Path(sys.argv[0])
    if script.name == "bus" and script.is_file():
        return [sys.executable, str(script.resolve())]
    found = shutil.which("bus")
    return [sys.executable, found] if found else None


# ---- the runner --------------------------------------------------------------------------
class Output:
    """Lines of several processes on one stream, each prefixed `name | ` (coloured on a terminal)."""

    def __init__(self, stream: IO[str], names: Sequence[str]) -> None:
        self.stream = stream
        self.width = max(len(n) for n in [*names, "up"])
        self.colour = dict(zip(names, itertools.cycle(COLOURS))) if _tty(stream) else {}
        self._lock = threading.Lock()

    def line(self, name: str, text: str) -> None:
        prefix = f"{name:<{self.width}} |"
        if name in self.colour:
            prefix = f"\x1b[{self.colour[name]}m{prefix}\x1b[0m"
        with self._lock:
            self.stream.write(f"{prefix} {text.rstrip()}\n")
            self.stream.flush()


class Running:
    """A started child: its process (leader of its own group) and the thread copying its output."""

    def __init__(self, child: Child, env: dict[str, str], cwd: Path | None, output: Output) -> None:
        self.child = child
        self.process = subprocess.Popen(child.argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.reader = threading.Thread(target=self._copy, args=(output,), daemon=True)
        self.reader.start()

    @property
    def name(self) -> str:
        return self.child.name

    def _copy(self, output: Output) -> None:
        for raw in self.process.stdout:
            output.line(self.name, raw.decode("utf-8", "replace"))

    def terminate(self) -> None:
        """SIGTERM the child's main process only: a worker's warm shutdown finishes and acks its current tasks."""
        try:
            os.kill(self.process.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass

    def signal(self, sig: int) -> None:
        """Signal the child's process group (its pool processes too); nothing if it is gone."""
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class Runner:
    """Start the children, watch them, stop them all (see the module docstring)."""

    def __init__(self, children: Sequence[Child], *, env: dict[str, str] | None = None, cwd: Path | None = None,
                 stream: IO[str] | None = None, grace: float = GRACE) -> None:
        self.children = list(children)
        self.env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
        self.cwd = cwd
        self.grace = grace
        self.output = Output(stream or sys.stdout, [c.name for c in self.children])
        self.stop_requested = threading.Event()
        self.signals = 0
        self.running: list[Running] = []
        #: the child that exited on its own, if one did
        self.failed: Running | None = None

    def say(self, text: str) -> None:
        self.output.line("up", text)

    def request_stop(self, signum: int | None = None, _frame: object = None) -> None:
        """What SIGINT and SIGTERM do: stop every child (a second one kills at once)."""
        self.signals += 1
        self.stop_requested.set()

    def run(self) -> int:
        """Start every child, wait for a stop request or for a child to exit; 0, or 1 if a child exited."""
        try:
            for child in self.children:
                if self.stop_requested.is_set():
                    break
                running = Running(child, self.env, self.cwd, self.output)
                self.running.append(running)
                self.say(f"started {child.name} (pid {running.process.pid}): {' '.join(child.argv)}")
            while not self.stop_requested.wait(0.2):
                self.failed = next((r for r in self.running if r.process.poll() is not None), None)
                if self.failed is not None:
                    self.say(f"{self.failed.name} exited with code {self.failed.process.returncode}; "
                             "stopping the others")
                    break
        finally:
            self.stop()
        return 1 if self.failed is not None else 0

    def stop(self) -> None:
        """SIGTERM every child, SIGKILL what is left of its group after the grace period; wait for all."""
        for running in self.running:
            if running.process.poll() is None:
                running.terminate()
        deadline = time.monotonic() + self.grace
        while any(r.process.poll() is None for r in self.running):
            if time.monotonic() > deadline or self.signals > 1:
                for running in self.running:
                    running.signal(signal.SIGKILL)
            time.sleep(0.1)
        for running in self.running:
            running.signal(signal.SIGKILL)  # pool processes the leader left behind, if any
            running.reader.join(5)
            self.say(f"{running.name} (pid {running.process.pid}) stopped, exit code {running.process.returncode}")


def run_children(children: Sequence[Child], *, grace: float = GRACE) -> Runner:
    """Run `children` in this terminal until Ctrl-C or SIGTERM (handlers restored after); the finished runner."""
    runner = Runner(children, grace=grace)
    previous = {sig: signal.signal(sig, runner.request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        runner.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return runner


def _tty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# ---- the command -------------------------------------------------------------------------
def up(
    ctx: typer.Context,
    only: str | None = typer.Option(None, "--only", metavar="B1,B2",
                                    help="Start workers for these boundaries only (comma-separated)."),
    concurrency: int = typer.Option(1, "--concurrency", "-c", metavar="N", parser=parse_concurrency,
                                    help="Pool processes of each worker."),
    no_beat: bool = typer.Option(False, "--no-beat", help="Do not start celery beat."),
    no_flower: bool = typer.Option(False, "--no-flower", help="Do not start Flower."),
    no_api: bool = typer.Option(False, "--no-api", help="Do not start `bus api`."),
    flower_port: int = typer.Option(5555, "--flower-port", min=1, max=65535, help="Flower's port."),
    api_port: int = typer.Option(8000, "--api-port", min=1, max=65535, help="The HTTP intake's port."),
) -> None:
    """Run the bus in this terminal: a worker per boundary, beat, Flower and the API (Ctrl-C stops all)."""
    from project.cli.common import loaded_bus
    from project.messaging.topology import Topology
    from project.store.migrate import upgrade
    from project.transport import embedded
    bus = loaded_bus()
    known = Topology(bus.registry).boundaries()
    boundaries = parse_only(only, known) or sorted(known)
    settings = bus.settings
    the_plan = plan(boundaries, home=settings.home, concurrency=concurrency, beat=not no_beat,
                    flower=not no_flower, flower_auth=os.environ.get("FLOWER_BASIC_AUTH", ""),
                    flower_port=flower_port, flower_missing=why_no_flower(),
                    api=not no_api, api_port=api_port, api_command=this_command(),
                    api_missing=why_no_api(ctx.find_root().command))
    for line in the_plan.skipped:
        typer.echo(f"bus up: {line}", err=True)
    settings.home.mkdir(parents=True, exist_ok=True)
    started_broker = settings.embedded and embedded.ensure_running(settings.home)
    try:
        upgrade(settings.database_url)
        typer.echo(f"bus up: {settings.broker_kind} broker, database migrated; Ctrl-C stops everything", err=True)
        failed = run_children(the_plan.children).failed
    finally:
        if started_broker:
            embedded.stop(settings.home)
    if failed is not None:
        typer.echo(f"error: bus up: {failed.name} exited on its own with code {failed.process.returncode}; "
                   "the others were stopped (its output is above)", err=True)
        raise typer.Exit(1)
