"""A child process spoken to in JSON lines: a request per line on its stdin, a reply per line on its stdout.

`bus bench` drives its senders this way (project/bench/sender.py), and the integration
tests their driver client (tests/integration/support/clients/driver.py). A reply is
`{"value": ...}` or `{"error": ...}`; the child's stderr goes to a log file. The child
runs in its own session, so `close()` can kill it and what it started by its process
group, never by name.
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
from pathlib import Path
from typing import Any


class ChildError(Exception):
    """The child did not answer."""


class ChildTimeout(ChildError, TimeoutError):
    """No reply within the timeout."""


class ChildExited(ChildError, RuntimeError):
    """The child exited instead of replying."""


class LineChild:
    """One child process; `request` writes a line, `reply` reads the next one."""

    name = "child"

    def __init__(self, argv: list[str], *, env: dict[str, str], cwd: Path, logfile: Path) -> None:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        with open(logfile, "wb") as err:
            self.process = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=err, text=True, bufsize=1, start_new_session=True)
        self.logfile = logfile
        self._replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._replies.put(json.loads(line))
        self._replies.put(None)

    def request(self, op: str, **arguments: Any) -> None:
        self.process.stdin.write(json.dumps({"op": op, **arguments}) + "\n")
        self.process.stdin.flush()

    def done(self) -> bool:
        """Whether a reply (or the child's exit) is waiting to be read."""
        return not self._replies.empty()

    def reply(self, timeout: float) -> dict[str, Any]:
        """The next reply as sent, `{"value": ...}` or `{"error": ...}`."""
        try:
            reply = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise ChildTimeout(f"the {self.name} gave no reply within {timeout}s; log {self.logfile}:\n"
                               f"{self.log()}") from None
        if reply is None:
            raise ChildExited(f"the {self.name} exited with {self.process.wait()}; log {self.logfile}:\n{self.log()}")
        return reply

    def log(self, chars: int = 4000) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def close(self, grace: float = 10) -> None:
        """Close its stdin (it exits when its input ends); kill its process group after `grace` seconds."""
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait(5)
