"""Broker namespaces and databases of one run only, for the test suite and `bus bench`.

Each function creates one resource nobody else uses and appends the step that removes
it to the caller's `cleanups` list; the caller runs that list in reverse at the end.
- `claim_redis_db`: a Redis database number that was empty, marked with REDIS_MARK and
  the claiming PID (a mark whose process is dead may be reclaimed); flushed at the end.
  The tests and the bench set the same mark, so the two never share a database.
- `rabbitmq_vhost`: a RabbitMQ vhost of its own (rabbitmqctl), deleted at the end.
- `postgres_database`: a fresh PostgreSQL database, dropped (WITH FORCE) at the end.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from typing import Any, Callable

#: set on every Redis database number claimed here, with the claiming process's PID
REDIS_MARK = "celery-bus-tests:owner"

Cleanups = list[Callable[[], Any]]


class IsolationError(RuntimeError):
    """A resource of this run could not be made; the message says what to do."""


def alive(pid: int) -> bool:
    """True if a process with this PID exists (also one of another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_redis_db(cleanups: Cleanups, redis_url: str = "redis://127.0.0.1:6379") -> int:
    """An empty database number (15 down to 1) of the Redis at `redis_url`, or one a dead run left behind."""
    import redis
    for number in range(15, 0, -1):
        client = redis.Redis.from_url(f"{redis_url.rstrip('/')}/{number}")
        owner = client.get(REDIS_MARK)
        stale = owner is not None and not alive(int(owner))
        if _others_connected(client, number):
            client.close()  # an orphaned worker of an earlier run still consumes here: it would take our messages
            continue
        if stale or (client.dbsize() == 0 and client.set(REDIS_MARK, os.getpid(), nx=True)):
            client.flushdb()
            client.set(REDIS_MARK, os.getpid())

            def release(client=client) -> None:
                client.flushdb()
                client.close()
            cleanups.append(release)
            return number
        client.close()
    raise IsolationError(f"no empty Redis database (1-15) at {redis_url} without clients; FLUSHDB one you do not "
                         f"need, and stop the processes `redis-cli CLIENT LIST` shows on it")


def _others_connected(client, number: int) -> bool:
    """Whether another process has a connection with database `number` selected.

    Connections of this process (pools of its earlier scenarios) do not count: only another
    process, such as an orphaned worker, can consume there behind our back.
    """
    mine = _own_ports()
    return any(int(c.get("db", -1)) == number and int(c.get("addr", ":0").rpartition(":")[2]) not in mine
               for c in client.client_list())


def _own_ports() -> set[int]:
    """The local TCP ports of this process's sockets (Linux /proc; elsewhere none are known)."""
    inodes = set()
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return set()
    for fd in fds:
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own descriptor, closed by now
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(table) as lines:
                rows = lines.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rpartition(":")[2], 16))
    return ports


def rabbitmqctl(*args: str) -> str:
    """Run `rabbitmqctl -q ARGS`; its output, or IsolationError with what it said."""
    if shutil.which("rabbitmqctl") is None:
        raise IsolationError("rabbitmqctl is not on PATH: a vhost of this run's own is made with it; "
                             "run on the RabbitMQ host or add its sbin directory to PATH")
    done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise IsolationError(f"rabbitmqctl {' '.join(args)} failed: {done.stderr or done.stdout}")
    return done.stdout.strip()


def rabbitmq_vhost(cleanups: Cleanups, prefix: str = "bus-test", user: str = "guest") -> str:
    """A new vhost `<prefix>-<random>` on the local RabbitMQ, `user` allowed everything in it."""
    vhost = f"{prefix}-{uuid.uuid4().hex[:10]}"
    rabbitmqctl("add_vhost", vhost)
    cleanups.append(lambda: rabbitmqctl("delete_vhost", vhost))
    rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    return vhost


def postgres_database(cleanups: Cleanups, admin_url: str, prefix: str = "bus_test") -> str:
    """A new database `<prefix>_<random>` beside the one `admin_url` names; its SQLAlchemy URL."""
    from sqlalchemy import create_engine, text
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    base, _, _ = admin_url.rpartition("/")
    url = f"{base}/{name}"

    def drop() -> None:
        from project.store.engine import dispose
        dispose(url)  # this process's pooled connections first
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    cleanups.append(drop)
    return url
