"""`bus check`, broker side: the declared topology against what the live broker holds.

What is compared (project/messaging/topology.py declares it):
- every command queue, subscriber queue and the maintenance queue: does it exist, and
  is it bound to its exchange (a command queue to its own direct exchange, a subscriber
  queue to its event's fanout exchange)?
- every binding that touches a bus exchange (the declared ones and any `events.*`) or a
  bus queue: is it declared? A binding nobody declared is *extra*: e.g. the queue of a
  removed or renamed subscriber still collecting every event, or a queue bound to a
  command's exchange, which would copy commands;
- on RabbitMQ, whether each exchange exists with the declared type;
- which queues no running worker consumes (the workers' `active_queues` replies).

How the broker is read:
- RabbitMQ: existence by passive declares (`queue_declare(passive=True)`,
  `exchange_declare(passive=True)`) over the bus's own AMQP connection: no extra rights,
  works against a remote broker, creates nothing. AMQP cannot list bindings, and the
  management API is not assumed to be enabled, so bindings and exchange types come from
  `rabbitmqctl list_bindings` / `list_exchanges` for the connection's vhost: by default
  when the broker is on this host and rabbitmqctl is on PATH, or through the command
  given with `--rabbitmqctl` (e.g. `docker compose exec -T rabbitmq rabbitmqctl`).
  Without it the bindings are reported as not checked (not as drift).
- Redis: kombu keeps each exchange's bindings in the set `_kombu.binding.<exchange>`
  (members `routing_key␆␖pattern␆␖queue`), which is also what the bus's durable fan-out
  reads when it publishes (project/transport/redis_transport.py); they are read with SCAN and
  SMEMBERS. A queue is a list that exists only while it holds messages, and exchanges
  are not stored at all, so on Redis a queue counts as present when it is consumed,
  bound or non-empty, and exchange types are not checked.

Drift (exit 1): a missing or extra binding, a missing exchange or one of another type,
a queue that a worker consumes but RabbitMQ no longer has. Warnings (exit 0 unless
`--strict`): a queue no worker consumes, and a queue that was never declared (no worker
of its boundary has started yet; the first one declares it). The owner check (one
handler per command queue) is project/observe/cluster.py's.
"""
from __future__ import annotations

import json
import logging
import shlex
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from project.messaging.topology import MAINTENANCE_BOUNDARY, MAINTENANCE_QUEUE, Topology
from project.transport import quorum

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger(__name__)
EVENT_EXCHANGE_PREFIX = "events."
#: Snapshot.exchanges says this of an exchange the broker does not have
MISSING = "missing"
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", ""}


@dataclass(frozen=True, order=True)
class Binding:
    """Queue `queue` bound to `exchange`; the routing key is "" for a fanout exchange."""

    exchange: str
    queue: str
    routing_key: str = ""


@dataclass(frozen=True)
class Finding:
    kind: str  # missing-queue, missing-exchange, exchange-type, missing-binding, extra-binding, undeclared, unconsumed
    subject: str
    message: str
    drift: bool


@dataclass
class Declared:
    """What the topology declares: queues (with boundary and kind), exchanges (with type), bindings."""

    boundaries: dict[str, str] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    exchanges: dict[str, str] = field(default_factory=dict)
    bindings: set[Binding] = field(default_factory=set)

    def ours(self, binding: Binding) -> bool:
        """Whether a live binding touches a bus exchange or queue (the default exchange never does)."""
        return bool(binding.exchange) and (binding.exchange in self.exchanges or binding.queue in self.kinds
                                           or binding.exchange.startswith(EVENT_EXCHANGE_PREFIX))

    def normal(self, binding: Binding, live_types: dict[str, str] | None = None) -> Binding:
        """`binding` with the routing key dropped where it means nothing (fanout exchanges)."""
        kind = self.exchanges.get(binding.exchange) or (live_types or {}).get(binding.exchange)
        if kind == "fanout" or (kind is None and binding.exchange.startswith(EVENT_EXCHANGE_PREFIX)):
            return Binding(binding.exchange, binding.queue)
        return binding


def declared(topology: Topology) -> Declared:
    """The queues, exchanges and bindings of every boundary (project/messaging/topology.py)."""
    found = Declared()
    commands, subscribers = topology.registry.commands, topology.registry.subscribers
    for queue in topology.queues():
        if queue.name in commands:
            found.boundaries[queue.name], found.kinds[queue.name] = commands[queue.name].boundary, "command"
        elif queue.name in subscribers:
            found.boundaries[queue.name], found.kinds[queue.name] = subscribers[queue.name].boundary, "subscriber"
        else:
            found.boundaries[queue.name], found.kinds[queue.name] = MAINTENANCE_BOUNDARY, "maintenance"
        for exchange, routing_key in quorum.routes(queue):
            found.exchanges[exchange.name] = exchange.type
            found.bindings.add(found.normal(Binding(exchange.name, queue.name, routing_key or "")))
    return found


@dataclass
class Snapshot:
    """What the broker holds, read once: the answers `compare` needs."""

    where: str
    #: True on RabbitMQ (a declared queue exists even when empty); False on Redis
    empty_queues_exist: bool
    #: declared queue -> does the broker have it (on Redis: does its list hold messages)
    queues: dict[str, bool]
    #: declared exchange -> its type on the broker, MISSING, or None when the broker cannot tell
    exchanges: dict[str, str | None]
    #: every queue binding of the namespace, or None when they cannot be listed (and why)
    bindings: set[Binding] | None
    unchecked: str | None = None
    #: every exchange's type, when the broker lists them (RabbitMQ with rabbitmqctl)
    types: dict[str, str] | None = None


def compare(want: Declared, broker: Snapshot, consumed: Iterable[str]) -> list[Finding]:
    """Drift and warnings, drift first."""
    consumed = set(consumed)
    bound = {want.normal(b, broker.types) for b in broker.bindings} if broker.bindings is not None else set()
    findings: list[Finding] = []
    present = set()
    for queue in sorted(want.kinds):
        if broker.queues.get(queue) or (not broker.empty_queues_exist and (
                queue in consumed or any(b.queue == queue for b in bound))):
            present.add(queue)
        elif queue in consumed:
            findings.append(Finding("missing-queue", queue, f"missing queue: {_what(want, queue)} is consumed by a "
                                    f"worker but {broker.where} has no such queue: it was deleted under the worker, "
                                    f"which now receives nothing; restart the workers of boundary "
                                    f"{want.boundaries[queue]} (they declare it)", True))
        else:
            findings.append(Finding("undeclared", queue, f"{_what(want, queue)} does not exist on {broker.where} "
                                    f"yet: no worker of its boundary has declared it; start one: "
                                    f"{_start(want.boundaries[queue])}", False))
    missing_exchanges = set()
    for exchange, kind in sorted(want.exchanges.items()):
        if not any(b.exchange == exchange and b.queue in present for b in want.bindings):
            continue  # nothing that should be bound to it exists yet
        actual = broker.exchanges.get(exchange)
        if actual == MISSING:
            missing_exchanges.add(exchange)
            findings.append(Finding("missing-exchange", exchange, f"missing exchange: {exchange} does not exist on "
                                    f"{broker.where}, though its queues do: nothing sent to it arrives; restart a "
                                    f"worker that consumes its queues (it declares the exchange)", True))
        elif actual is not None and actual != kind:
            findings.append(Finding("exchange-type", exchange, f"exchange {exchange} is {actual} on {broker.where}, "
                                    f"declared {kind}: delete it (drained) and restart the workers, which "
                                    f"declare it again", True))
    if broker.bindings is not None:
        for binding in sorted(want.bindings - bound):
            if binding.queue in present and binding.exchange not in missing_exchanges:
                findings.append(Finding("missing-binding", f"{binding.exchange} -> {binding.queue}",
                                        f"missing binding: {_what(want, binding.queue)} is not bound to "
                                        f"{binding.exchange}: {_loss(want, binding.queue)}; restart a worker of "
                                        f"boundary {want.boundaries[binding.queue]} (it binds its queues) or bind it",
                                        True))
        for binding in sorted(b for b in bound - want.bindings if want.ours(b)):
            findings.append(Finding("extra-binding", f"{binding.exchange} -> {binding.queue}",
                                    f"extra binding: queue {binding.queue} is bound to {binding.exchange}"
                                    f"{_key(binding)}, which the topology does not declare: "
                                    f"{_extra(want, binding)}", True))
    for queue in sorted(present - consumed):
        if want.kinds[queue] != "command":  # command queues: project/observe/cluster.py's survey says it
            findings.append(Finding("unconsumed", queue, f"{_what(want, queue)} has no running worker; its "
                                    f"messages wait in the queue; start one: {_start(want.boundaries[queue])}",
                                    False))
    return sorted(findings, key=lambda f: not f.drift)


def _what(want: Declared, queue: str) -> str:
    if queue == MAINTENANCE_QUEUE:
        return f"the bus's maintenance queue {queue}"
    return f"{want.kinds[queue]} queue {queue}"


def _loss(want: Declared, queue: str) -> str:
    if want.kinds[queue] == "subscriber":
        return "the events published there do not reach it"
    return "what is sent to that exchange does not reach it"


def _extra(want: Declared, binding: Binding) -> str:
    """What an undeclared binding does, and the fix."""
    if want.kinds.get(binding.exchange) == "command":
        return ("the commands sent there are copied into it, and a command has exactly one queue "
                "and one handler; unbind it")
    if want.kinds.get(binding.exchange) == "maintenance":
        return "the bus's housekeeping sent there is copied into it; unbind it"
    if binding.exchange in want.exchanges or binding.exchange.startswith(EVENT_EXCHANGE_PREFIX):
        return ("it gets a copy of every message published there. A leftover of a removed or renamed "
                "subscriber? Unbind it, or delete the queue once drained")
    return f"its {want.kinds[binding.queue]}'s handler gets whatever is sent there too; unbind it"


def _key(binding: Binding) -> str:
    return f" (routing key {binding.routing_key})" if binding.routing_key else ""


def _start(boundary: str) -> str:
    return f"celery -A project worker --boundary {boundary}"


# ---- reading the brokers -----------------------------------------------------------------------
def read_broker(connection: Any, want: Declared, rabbitmqctl: str | None = None) -> Snapshot:
    """A Snapshot of the broker behind `connection` (RabbitMQ or Redis)."""
    driver = connection.transport.driver_type
    if driver == "amqp":
        return _read_rabbitmq(connection, want, rabbitmqctl)
    if driver == "redis":
        return _read_redis(connection, want)
    raise NotImplementedError(f"comparing the topology with a {driver} broker is not supported (RabbitMQ, Redis)")


class _Passive:
    """Existence by passive declares; a failed one closes an AMQP channel, so each failure gets a new one."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.channel = connection.channel()

    def exists(self, declare: str, **arguments: Any) -> bool:
        try:
            getattr(self.channel, declare)(passive=True, **arguments)
            return True
        except self.connection.channel_errors as exc:
            if getattr(exc, "code", None) != 404 and "NOT_FOUND" not in str(exc):
                raise
            self.close()
            self.channel = self.connection.channel()
            return False

    def close(self) -> None:
        try:
            self.channel.close()
        except Exception:  # noqa: BLE001 - the broker closed it already
            pass


def _read_rabbitmq(connection: Any, want: Declared, rabbitmqctl: str | None) -> Snapshot:
    vhost = connection.virtual_host or "/"
    ctl, unchecked = (shlex.split(rabbitmqctl), None) if rabbitmqctl else default_rabbitmqctl(connection.hostname)
    types = bindings = None
    if ctl:
        try:
            types = {row["name"]: row["type"] for row in _rabbitmqctl(ctl, "list_exchanges", vhost, "name", "type")}
            bindings = {Binding(row["source_name"], row["destination_name"], row["routing_key"])
                        for row in _rabbitmqctl(ctl, "list_bindings", vhost, "source_name", "destination_name",
                                                "destination_kind", "routing_key")
                        if row["destination_kind"] == "queue"}
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            types = bindings = None
            unchecked = f"`{shlex.join(ctl)}` failed: {(str(exc).strip().splitlines() or ['?'])[0]}"
    passive = _Passive(connection)
    try:
        queues = {q: passive.exists("queue_declare", queue=q) for q in want.kinds}
        if types is not None:
            exchanges = {x: types.get(x, MISSING) for x in want.exchanges}
        else:  # a passive declare does not check the type
            exchanges = {x: None if passive.exists("exchange_declare", exchange=x, type="direct") else MISSING
                         for x in want.exchanges}
    finally:
        passive.close()
    return Snapshot(f"RabbitMQ vhost {vhost}", True, queues, exchanges, bindings, unchecked, types)


def _rabbitmqctl(ctl: list[str], what: str, vhost: str, *columns: str) -> list[dict[str, Any]]:
    done = subprocess.run([*ctl, "-q", what, "-p", vhost, *columns, "--formatter", "json"],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise subprocess.SubprocessError((done.stderr or done.stdout or f"exit {done.returncode}").strip())
    return json.loads(done.stdout or "[]")


def _read_redis(connection: Any, want: Declared) -> Snapshot:
    passive = _Passive(connection)
    channel = passive.channel
    try:
        prefix = (channel.global_keyprefix or "") + channel.keyprefix_queue % ""
        bindings = set()
        with channel.conn_or_acquire() as client:
            # SCAN is not among the commands kombu's prefixed client prefixes: the pattern carries it.
            keys = list(client.scan_iter(match=_glob_escape(prefix) + "*", count=1000))
        for key in keys:
            exchange = (key.decode() if isinstance(key, bytes) else key)[len(prefix):]
            bindings |= {Binding(exchange, queue, routing_key) for routing_key, _, queue in channel.get_table(exchange)}
        queues = {q: passive.exists("queue_declare", queue=q) for q in want.kinds}
    finally:
        passive.close()
    uri = connection.as_uri()
    where = f"Redis {uri if connection.password else uri.replace(':**@', '')}"
    return Snapshot(where, False, queues, {x: None for x in want.exchanges}, bindings)


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def default_rabbitmqctl(hostname: str | None) -> tuple[list[str] | None, str | None]:
    """rabbitmqctl when the broker runs on this host; else (None, why bindings go unchecked)."""
    local = LOCAL_HOSTS | {socket.gethostname(), socket.getfqdn()}
    if (hostname or "") not in local:
        return None, (f"the broker runs on {hostname}, not here: AMQP cannot list bindings; pass "
                      f"--rabbitmqctl 'COMMAND' (e.g. docker compose exec -T rabbitmq rabbitmqctl)")
    path = shutil.which("rabbitmqctl")
    if path is None:
        return None, "rabbitmqctl is not on PATH: AMQP cannot list bindings; pass --rabbitmqctl 'COMMAND'"
    return [path], None


# ---- the check -------------------------------------------------------------------------------
@dataclass
class Report:
    where: str
    findings: list[Finding]
    unchecked: str | None = None
    error: str | None = None

    @property
    def drift(self) -> list[Finding]:
        return [f for f in self.findings if f.drift]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if not f.drift]

    def ok(self, strict: bool = False) -> bool:
        """No drift and the broker was read (and, if `strict`, no warning either)."""
        return self.error is None and not self.drift and not (strict and self.warnings)

    def print(self, console: Any) -> None:
        """One line per finding, then what was compared, for `bus check`."""
        from rich.markup import escape
        if self.error is not None:
            console.print(f"[red]broker[/red]: cannot read the broker to compare it with the topology: "
                          f"{escape(self.error)}")
            return
        for finding in self.findings:
            label = "[red]drift[/red]" if finding.drift else f"[yellow]{finding.kind}[/yellow]"
            console.print(f"{label}: {escape(finding.message)}")
        if self.unchecked:
            console.print(f"[yellow]note[/yellow]: bindings not checked: {escape(self.unchecked)}")
        console.print(f"{escape(self.where)}: {len(self.drift)} drift(s) from the declared topology; "
                      f"{len(self.warnings)} warning(s)")


def consumed_queues(app: "Celery", timeout: float) -> set[str]:
    """Every queue a running worker consumes (remote control `active_queues`)."""
    replies = app.control.inspect(timeout=timeout).active_queues() or {}
    return {q["name"] for queues in replies.values() if isinstance(queues, list) for q in queues
            if isinstance(q, dict) and "name" in q}


def examine(app: "Celery", topology: Topology, timeout: float, rabbitmqctl: str | None = None) -> Report:
    """Read `app`'s broker (on a thread of its own) while its workers say what they consume; compare with `topology`."""
    want = declared(topology)
    read: dict[str, Any] = {}

    def reader() -> None:
        try:
            with app.connection_for_read() as connection:
                connection.ensure_connection(max_retries=1)
                read["snapshot"] = read_broker(connection, want, rabbitmqctl)
        except Exception as exc:  # noqa: BLE001 - reported; the owner check still counts
            logger.debug("reading the broker failed", exc_info=True)
            read["error"] = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=reader, name="bus-check-broker", daemon=True)
    thread.start()
    consumed = consumed_queues(app, timeout)
    thread.join(timeout=120)
    snapshot = read.get("snapshot")
    if snapshot is None:
        return Report("the broker", [], error=read.get("error", "reading the broker took over 120 s"))
    return Report(snapshot.where, compare(want, snapshot, consumed), unchecked=snapshot.unchecked)
