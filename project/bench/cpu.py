"""Per-message CPU in `bus bench`: how much CPU each process of a side spent on a phase's messages.

The figures come from /proc (Linux). For each process the bench reads utime + stime
from /proc/<pid>/stat. These are the totals of all of its threads, in clock ticks
(os.sysconf("SC_CLK_TCK"), usually 100 a second). A phase takes two snapshots of every
process on the machine, one before its first send and one once the bench has seen its
last completion (up to one 0.1 s poll later, so a little idle time counts too).
A column's CPU is the sum over its processes of (end - start), divided by the messages
the phase drained.

One tick is 10 ms, so at n=1,000 messages each process's figure is exact to about
10 µs a message; `resolution_us` in the report gives the exact value.

The columns (COLUMNS):
- main: the worker's main process. On Celery it runs the consumer, acks and remote
  control. On dramatiq and FastStream it is the supervisor of their worker processes.
- pool: every descendant of the worker's main process. On Celery these are the prefork
  pool processes. On dramatiq and FastStream they are the worker processes that consume.
- broker: the process listening on the broker's address, and its children (e.g. a
  BGSAVE fork). That is redis-server, RabbitMQ's beam.smp, or the embedded server on its
  unix socket. It is the whole server: results stored there count, and so does every
  other client of that server on this machine.
- database: PostgreSQL's listening process (the postmaster) and all of its children:
  every backend (this run's and anybody else's), the WAL writer, the checkpointer.
  SQLite runs inside the pool processes, so the column is 0, labelled "in pool". The
  peers use no database, so their column is 0, labelled "none".
- sender: the bench's sending process (project/bench/sender.py or peer_sender.py) and
  its children.

`total` is the sum of the columns. `machine` is all the non-idle CPU of the machine
(/proc/stat), across every CPU and every process, other users' included. `machine`
minus `total` is what ran beside the phase.

Not counted in any column:
- the bench's own process. It polls the worker's counters every 0.1 s. On Celery each
  poll is a remote-control message, and answering it is counted in the main and broker
  columns (`polls` says how many there were). The peers' counters are read from files;
- kernel work done outside these processes' own context, e.g. network interrupts.

A column whose processes cannot be found says n/a (None in JSON), never 0. That happens
when nothing on this machine listens on the address, when /proc/<pid>/fd cannot be read,
or when the worker is gone by the end.

Processes are keyed by PID and start time, so a PID reused during a phase is not taken
for the process it replaced. A process seen only at the end started during the phase
and counts whole. A process seen at the start but gone at the end counts nothing: its
CPU from the start snapshot until it exited is lost, and the column is a lower bound
(`exited` says how many processes this hit). Examples are a prefork child replaced under
max-tasks-per-child, or a PostgreSQL backend whose connection closed. Its parent's
cutime does hold that CPU, but mixed with everything the parent ever reaped. With the
bench's settings (no max-tasks-per-child, pooled connections kept open) no process
should exit mid-phase.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rich.console import Console
from rich.table import Table

from project.bench.common import fmt

PROC = Path("/proc")
COLUMNS = ("main", "pool", "broker", "database", "sender")
TITLES = {"main": "worker main", "pool": "worker children (pool)", "broker": "broker server",
          "database": "database server", "sender": "sender"}
#: what each column holds, printed under the table and recorded in the report
MEANING = {
    "main": "the worker's main process (Celery: consumer, acks, remote control; peers: their supervisor)",
    "pool": "its descendants (Celery: the prefork pool; dramatiq, FastStream: their worker processes)",
    "broker": "the process listening on the broker's address and its children, whole server (other clients too)",
    "database": "PostgreSQL: the listening postmaster and all its children, every database's backends; "
                "SQLite runs in the pool processes ('in pool'); the peers use none ('none')",
    "sender": "the bench's sending process",
    "total": "the sum of the columns",
    "machine": "all non-idle CPU of the machine (/proc/stat), every process, others' included",
}
DEFAULT_PORTS = {"redis": 6379, "rediss": 6379, "amqp": 5672, "amqps": 5671, "postgresql": 5432}
LOCAL_HOSTS = {"", "localhost", "127.0.0.1", "::1", "0.0.0.0"}
_LISTEN_TCP = "0A"
ROOT_GONE = "its process is not in /proc at the start or the end (gone, or no /proc on this machine)"
_ACCEPTING_UNIX = 0x10000  # __SO_ACCEPTCON in /proc/net/unix's Flags


# ---- reading /proc ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Stat:
    """What the bench uses of one /proc/<pid>/stat: parent, start time (ticks after boot), utime + stime (ticks)."""

    pid: int
    ppid: int
    started: int
    ticks: int


def parse_stat(text: str) -> Stat:
    """One /proc/<pid>/stat line. The command name is in parentheses and may itself hold spaces and ')'."""
    head, _, rest = text.rpartition(")")
    fields = rest.split()  # fields[0] is field 3 (state) of proc(5)
    return Stat(pid=int(head.split(" (", 1)[0]), ppid=int(fields[1]), started=int(fields[19]),
                ticks=int(fields[11]) + int(fields[12]))


def processes(proc: Path = PROC) -> dict[int, Stat]:
    """Every process on the machine. A process that ends while it is being read is left out."""
    found: dict[int, Stat] = {}
    try:
        entries = list(proc.iterdir())
    except OSError:  # no /proc here (not Linux): every column says n/a
        return found
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            found[int(entry.name)] = parse_stat((entry / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue
    return found


def machine_ticks(proc: Path = PROC) -> int | None:
    """Non-idle ticks of every CPU so far: user, nice, system, irq, softirq, steal (guest is inside user)."""
    try:
        first = (proc / "stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if first[0] != "cpu":
        return None
    values = [int(v) for v in first[1:9]] + [0] * (8 - len(first[1:9]))
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return user + nice + system + irq + softirq + steal


def descendants(table: dict[int, Stat], pid: int) -> set[int]:
    """The children of `pid`, their children, and so on, in `table`."""
    children: dict[int, list[int]] = {}
    for stat in table.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    found, todo = set(), list(children.get(pid, []))
    while todo:
        child = todo.pop()
        if child not in found:
            found.add(child)
            todo.extend(children.get(child, []))
    return found


# ---- who serves an address -------------------------------------------------------------------
def address(url: str) -> tuple[str, str | int] | None:
    """Where a server listens, from its URL: ("tcp", port) or ("unix", path). None if it is not on this machine."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0]
    if parts.scheme == "unix" or parts.scheme.endswith("+socket"):
        return ("unix", parts.path)
    if (parts.hostname or "") not in LOCAL_HOSTS:
        return None
    port = parts.port or DEFAULT_PORTS.get(scheme)
    return ("tcp", port) if port else None


def _socket_inodes(where: tuple[str, str | int], proc: Path) -> set[str]:
    kind, value = where
    inodes = set()
    if kind == "tcp":
        for name in ("tcp", "tcp6"):
            try:
                lines = (proc / "net" / name).read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                if len(fields) > 9 and fields[3] == _LISTEN_TCP and int(fields[1].rsplit(":", 1)[1], 16) == value:
                    inodes.add(fields[9])
    else:
        try:
            lines = (proc / "net" / "unix").read_text().splitlines()[1:]
        except OSError:
            return inodes
        for line in lines:
            fields = line.split()
            if len(fields) > 7 and fields[7] == str(value) and int(fields[3], 16) & _ACCEPTING_UNIX:
                inodes.add(fields[6])
    return inodes


def listeners(where: tuple[str, str | int], proc: Path = PROC) -> set[int]:
    """The processes holding the listening socket at `where` open, except those whose parent holds it too."""
    targets = {f"socket:[{inode}]" for inode in _socket_inodes(where, proc)}
    holders = set()
    for entry in proc.iterdir() if targets else ():
        if not entry.name.isdigit():
            continue
        try:
            links = {os.readlink(fd) for fd in (entry / "fd").iterdir()}
        except OSError:  # gone, or not ours to read
            continue
        if links & targets:
            holders.add(int(entry.name))
    table = processes(proc) if len(holders) > 1 else {}
    return {pid for pid in holders if pid not in table or table[pid].ppid not in holders}


# ---- what a column measures --------------------------------------------------------------------
@dataclass(frozen=True)
class Tree:
    """Processes of a column: `roots` themselves (`itself`) and/or everything below them (`below`)."""

    roots: frozenset[int]
    itself: bool = True
    below: bool = True
    how: str = ""

    def members(self, table: dict[int, Stat]) -> set[int] | None:
        """Its processes now; None if a root is gone."""
        if not self.roots <= table.keys():
            return None
        found: set[int] = set(self.roots) if self.itself else set()
        for root in self.roots if self.below else ():
            found |= descendants(table, root)
        return found


@dataclass(frozen=True)
class Fixed:
    """A column that is 0 by construction, shown as `label`: SQLite's work is in the pool column ("in pool"),
    a peer has no database ("none"); `note` says why."""

    label: str
    note: str


@dataclass(frozen=True)
class Unknown:
    """A column whose processes could not be found: n/a, never 0; `note` says why."""

    note: str


Source = Tree | Fixed | Unknown


def server(where: tuple[str, str | int] | None, name: str, proc: Path = PROC) -> Source:
    """The column of the server listening at `where`: its listening process and that process's children."""
    if where is None:
        return Unknown(f"{name} is not on this machine")
    pids = listeners(where, proc)
    shown = f"{where[0]} {where[1]}"
    if not pids:
        return Unknown(f"no process found listening on {shown} (or /proc/<pid>/fd not readable)")
    return Tree(frozenset(pids), how=f"listening on {shown}")


def worker(pid: int) -> dict[str, Source]:
    """The main and pool columns of the worker whose main process is `pid`."""
    return {"main": Tree(frozenset({pid}), below=False, how="the worker's main process"),
            "pool": Tree(frozenset({pid}), itself=False, how="descendants of the worker's main process")}


# ---- a phase -----------------------------------------------------------------------------------
@dataclass
class Snapshot:
    """CPU ticks so far of every column's processes, keyed (pid, start time); None where unknown."""

    at: float
    machine: int | None
    columns: dict[str, dict[tuple[int, int], int] | None]


def snapshot(sources: dict[str, Source], proc: Path = PROC) -> Snapshot:
    at = time.monotonic()
    table = processes(proc)
    columns: dict[str, dict[tuple[int, int], int] | None] = {}
    for name, source in sources.items():
        if isinstance(source, Tree):
            members = source.members(table)
            columns[name] = None if members is None else {(p, table[p].started): table[p].ticks for p in members}
        elif isinstance(source, Fixed):
            columns[name] = {}
        else:
            columns[name] = None
    return Snapshot(at, machine_ticks(proc), columns)


def breakdown(sources: dict[str, Source], start: Snapshot, end: Snapshot, messages: int,
              hz: int | None = None, polls: int = 0) -> dict[str, Any]:
    """Microseconds of CPU a message, per column, between two snapshots (module docstring)."""
    hz = hz or os.sysconf("SC_CLK_TCK")
    per = 1e6 / hz / messages if messages else math.nan  # µs a message per tick
    columns: dict[str, dict[str, Any]] = {}
    for name, source in sources.items():
        before, after = start.columns.get(name), end.columns.get(name)
        note = getattr(source, "note", None) or getattr(source, "how", "")
        if isinstance(source, Fixed):
            columns[name] = {"us": 0.0, "label": source.label, "note": note, "processes": 0, "exited": 0}
            continue
        if before is None or after is None or not messages:
            why = note if isinstance(source, Unknown) else ROOT_GONE if messages else "no messages"
            columns[name] = {"us": None, "note": why, "processes": 0, "exited": 0}
            continue
        ticks = sum(after[key] - before.get(key, 0) for key in after)
        gone = [key[0] for key in before if key not in after]
        columns[name] = {"us": ticks * per, "cpu_s": ticks / hz, "note": note, "processes": len(before.keys() | after.keys()),
                         "pids": sorted({key[0] for key in before.keys() | after.keys()}), "exited": len(gone)}
    machine = (end.machine - start.machine) * per if start.machine is not None and end.machine is not None else None
    return {"messages": messages, "resolution_us": per, "wall_s": end.at - start.at, "polls": polls,
            "columns": columns, "machine_us": machine, **total(columns)}


def total(columns: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The sum of the known columns, and which were unknown (the total is then a lower bound)."""
    unknown = [name for name, column in columns.items() if column["us"] is None]
    known = [column["us"] for column in columns.values() if column["us"] is not None]
    return {"total_us": sum(known) if known else None, "unknown": unknown}


def legend(servers: dict[str, Source]) -> dict[str, Any]:
    """What the breakdowns of a run measured (recorded in its report): the columns, the servers' processes, the tick."""
    found: dict[str, Any] = {}
    for name, source in servers.items():
        if isinstance(source, Tree):
            found[name] = {"pids": sorted(source.roots), "found": source.how, "with": "its descendants"}
        elif isinstance(source, Fixed):
            found[name] = {"label": source.label, "note": source.note}
        else:
            found[name] = {"n/a": source.note}
    return {"clock_ticks_per_s": os.sysconf("SC_CLK_TCK"), "columns": MEANING, "servers": found}


def median(breakdowns: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per column the median over repeats (n/a if any repeat had none); the total is the sum of those medians."""
    found = [b for b in breakdowns if b]
    if not found:
        return None
    columns = {}
    for name, first in found[0]["columns"].items():
        values = [b["columns"][name]["us"] for b in found]
        columns[name] = {**{k: v for k, v in first.items() if k in ("note", "label")},
                         "us": None if None in values else statistics.median(values),
                         "exited": max(b["columns"][name]["exited"] for b in found)}
    machines = [b["machine_us"] for b in found if b["machine_us"] is not None]
    return {"columns": columns, "machine_us": statistics.median(machines) if machines else None,
            "resolution_us": max(b["resolution_us"] for b in found), "repeats": len(found), **total(columns)}


# ---- the table -----------------------------------------------------------------------------------
def render(rows: list[tuple[str, dict[str, Any] | None]], console: Console, title: str,
           reference: tuple[str, str] | None = None) -> None:
    """One row per side (median breakdowns), then each other row minus the reference row.

    `reference` is (row name, why it is the reference); without one, or if that row was not
    measured, the reference is the row with the lowest total of those with no n/a column.
    """
    measured = [(name, b) for name, b in rows if b]
    named = {name: b for name, b in measured if b["total_us"] is not None}
    if not named:
        return
    complete = [name for name, b in named.items() if not b["unknown"]] or list(named)
    best_name, why = reference if reference and reference[0] in named else \
        (min(complete, key=lambda name: named[name]["total_us"]), "the lowest total")
    best = named[best_name]
    table = Table(title=title)
    table.add_column("side")
    for column in (*(TITLES[c] for c in COLUMNS), "total", "machine", "exited"):
        table.add_column(column, justify="right")

    def cell(value: float | None, label: str | None = None) -> str:
        return label or ("n/a" if value is None else fmt(value))

    for name, b in measured:
        cols = b["columns"]
        table.add_row(name, *(cell(cols[c]["us"], cols[c].get("label")) if c in cols else "-" for c in COLUMNS),
                      cell(b["total_us"]) if not b["unknown"] or b["total_us"] is None else f"≥ {fmt(b['total_us'])}",
                      cell(b["machine_us"]),
                      str(sum(c["exited"] for c in cols.values())))
    for name, b in measured:
        if b is best:
            continue
        diff = [_minus(b["columns"].get(c, {}).get("us"), best["columns"].get(c, {}).get("us")) for c in COLUMNS]
        table.add_row(f"{name} - {best_name}", *(cell(d) for d in diff),
                      cell(None if b["unknown"] or best["unknown"] else _minus(b["total_us"], best["total_us"])),
                      "", "")
    console.print(table)
    worst = max(b["resolution_us"] for _, b in measured)
    console.print(f"  µs of CPU a message: utime+stime of all threads (/proc), end of the phase - start; each "
                  f"process's figure is exact to a clock tick, {fmt(worst, 1)} µs a message; n/a: processes not "
                  "found; ≥: the total leaves the n/a columns out (its difference is n/a); exited: processes gone mid-phase (their CPU is "
                  f"lost); last rows: each side - {best_name} ({why}). Celery's main and broker "
                  "columns include the bench's polls of its counters (a remote-control message every 0.1 s, "
                  "`polls` in the JSON); the peers' are read from files")
    for column in (*COLUMNS, "total", "machine"):
        console.print(f"  {TITLES.get(column, column)}: {MEANING[column]}")


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b
