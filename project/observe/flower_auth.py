"""Flower for the bus: authentication required, and a task list that shows the contract.

`celery -A project flower` loads the app, which (through `install()`) points Flower at
project/observe/flower_config.py unless FLOWER_CONF or `--conf` names another file. That file
calls `configure()`, which refuses to start Flower without authentication:
- `FLOWER_BASIC_AUTH=user:password` (or `--basic_auth=...`; several users comma-separated),
- or Flower's OAuth (`--auth=<email regexp>` with FLOWER_OAUTH2_* settings),
- or, for local development only, an explicit `--unauthenticated`.
Flower does not know `--unauthenticated` and silently drops options it does not know
(it filters its command line before parsing), so the flag is read from `sys.argv`.

The task list shows each message's contract fields (`kwargs`) and result; task names
are the command and subscriber names already (the bus's task = queue naming).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Sequence

logger = logging.getLogger(__name__)
UNAUTHENTICATED = "--unauthenticated"
CONFIG_FILE = Path(__file__).with_name("flower_config.py")
#: columns of Flower's tasks page (FLOWER_TASKS_COLUMNS or --tasks_columns override it)
TASKS_COLUMNS = "name,uuid,state,kwargs,result,retries,received,runtime,worker"


class FlowerAuthMissing(SystemExit):
    """Flower would serve the bus's messages to anyone: it is not started (exit status 1, the message on stderr)."""


def require_auth(basic_auth: Sequence[str] | None, oauth: str, argv: Sequence[str]) -> str:
    """How Flower authenticates: `basic`, `oauth` or `none` (explicit); raise if it would not."""
    if UNAUTHENTICATED in argv[1:]:
        return "none"
    if oauth:
        return "oauth"
    entries = [entry for entry in (basic_auth or []) if entry]
    if not entries:
        raise FlowerAuthMissing(
            "Flower refuses to start without authentication: set FLOWER_BASIC_AUTH=user:password "
            "(or --basic_auth=user:password; several users comma-separated), or configure OAuth with --auth. "
            f"For local development only, start it with {UNAUTHENTICATED} explicitly.")
    for entry in entries:
        user, colon, password = entry.partition(":")
        if not (user and colon and password):
            raise FlowerAuthMissing(f"FLOWER_BASIC_AUTH entry {user!r} has no password: write user:password "
                                    "(several users comma-separated)")
    return "basic"


def configure(argv: Sequence[str] | None = None) -> None:
    """Check Flower's parsed options (environment and command line); called by the config file."""
    from tornado.options import options
    mode = require_auth(options.basic_auth, options.auth, sys.argv if argv is None else argv)
    if mode == "none":
        logger.warning("Flower runs WITHOUT authentication (%s): anyone who reaches its port sees every "
                       "message and can revoke tasks. Local development only.", UNAUTHENTICATED)


def install(argv: Sequence[str] | None = None) -> None:
    """In a `celery ... flower` process, make Flower read the bus's configuration file."""
    if "flower" in (sys.argv if argv is None else argv)[1:]:
        os.environ.setdefault("FLOWER_CONF", str(CONFIG_FILE))
