"""The fault-injection suite: real workers, real brokers, processes SIGKILLed during the run.

    python bench/faults.py --broker redis|amqp|amqp-quorum|embedded [--db sqlite|postgresql]
                           --commands N --kills K [--json] [--broker-outage] [--db-outage]
                           [--edges [--gateway-failures 4]]

What it does, on an installation of its own (a fresh Redis database, RabbitMQ vhost or
embedded server, and a fresh SQLite file or PostgreSQL database, as the integration
tests make them; everything is removed at the end):
- starts three workers (2 pool processes each) for the reference domain's boundaries:
  orders+accounts+inventory, billing+audit+shipping and notifications+bus+fulfilment, and
  an outbox relay (the beat task's work, in this process);
- sends N commands, PlaceOrder and RegisterUser, with a share of them sent again with
  the same idempotency key (duplicates); each PlaceOrder publishes OrderPlaced to 3
  subscribers (billing, notifications, the fulfilment process manager), each RegisterUser
  UserAccountCreated to 3;
- runs the fulfilment flow of every order (handlers/fulfilment.py): ReserveStock, the
  charge's PaymentProcessed, then ShipOrder, or CancelOrder and RefundPayment: the shelves
  hold books for about FILLED of the orders, so the rest run out of stock, before or after
  their payment;
- SIGKILLs a random pool process of a random worker K times, spread evenly over the
  run's progress (the worker forks a new one; the killed message is redelivered);
- optionally cuts the broker (--broker-outage: restarts the embedded server, or drops
  every client connection of the run's Redis database / RabbitMQ vhost, shared servers
  being left running) and the database (--db-outage: terminates the run's PostgreSQL
  connections for 3 s, or holds SQLite's write lock for 3 s) once, halfway. A Redis
  server that goes down takes the worker's attempt to give its reserved messages back
  with it: they stay in Redis' unacked hash until the visibility timeout, so with
  --broker-outage on Redis the workers run with a 30 s visibility timeout unless told;
- with --edges, in the same run, the edges of the promises (see EDGE_* below):
  the payment gateway fails the first --gateway-failures (4) calls of every charge, so
  each charge succeeds only after more than three retries; the SMS port fails every call
  for a share of the users (a marker in their id), so their welcome SMS exhausts its
  policy and must be dead-lettered (`retries-exhausted`, no inbox claim); a share of the
  registrations reuse an e-mail address registered earlier under a new user and key, to
  be refused (EmailAlreadyRegistered, stored with the key); a share of new commands go
  out 2-3 times back to back (same key and payload: handled at once by different pool
  processes), and a share are followed at once by the same key with another payload
  (a conflict: refused, dead-lettered as `conflict`, the stored payload's effect only);
- waits for quiescence: every command finished, every event's delivery handled (or
  dead-lettered), the queues empty and the outbox published; it gives up after --timeout,
  or when nothing moved for --stall seconds while nothing waits in the broker;
- reports what the database holds. Exit 1 when any of these is above 0: lost (a command
  whose key holds neither its effect nor a refusal it deserved, an event without a
  subscriber's inbox claim or expected dead letter), duplicated (an effect twice: an order
  or a user, an event per command, a charge, a mail, an SMS, an audit entry), fewer kills
  than asked, a send that failed; with --edges also: a conflicting payload applied or not refused, an e-mail registered
  twice, a refusal not stored, a refused command whose duplicate ran the handler again
  instead of getting the stored refusal, an exhausted delivery not dead-lettered, or
  dead-lettered before its policy's limit, or handled; and for fulfilment: an order whose
  instance did not complete, that was shipped and cancelled, shipped without its stock or
  payment, cancelled without a refund of its charge, or a command the manager sent twice.
  (Its 30-minute payment timers are not due during a run: they are left waiting.)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.integration.support.scenarios import PG_ADMIN_URL, Scenario, open_scenario  # noqa: E402

ITEMS = [{"sku": "book", "quantity": 2, "unit_price": "12.50"}, {"sku": "pen", "quantity": 1, "unit_price": "1.99"}]
WORKERS = (("orders", "accounts", "inventory"), ("billing", "audit", "shipping"), ("notifications", "bus", "fulfilment"))
ORDER_PLACED, USER_CREATED, PAYMENT = "events.order_placed", "events.user_account_created", "events.payment_processed"
STOCK_EVENTS = ("events.stock_reserved", "events.out_of_stock")
#: the share of the orders the shelves hold books for (every order takes ITEMS: 2 books, 1 pen)
FILLED = 0.75
PLACE_ORDER, REGISTER_USER = "orders.place_order", "accounts.register_user"
CHARGE, WELCOME_SMS = "billing.charge_payment", "notifications.send_welcome_sms"
#: the field that names a command's effect (its row in `orders` / `users`)
ENTITY = {PLACE_ORDER: "order_id", REGISTER_USER: "user_id"}
SUBSCRIBERS_PER_COMMAND = {PLACE_ORDER: 3, REGISTER_USER: 3}
REFUSED = "handlers.accounts.EmailAlreadyRegistered"

# --edges: shares of the new commands in the plan, and the failures injected into the workers
#: sent 2-3 times back to back (same key, same payload)
EDGE_BURSTS = 0.15
#: followed at once by the same key with another payload (new order / user id and e-mail)
EDGE_CONFLICTS = 0.05
#: of the registrations: an e-mail registered at least REUSE_GAP sends earlier, new user and key
EDGE_REUSED_EMAILS = 0.25
#: sends between a registration and one that reuses its e-mail: two keys with one e-mail handled
#: at the same instant race in the handler's check-then-insert (the unique index refuses the
#: second with an IntegrityError), which is the domain's business, not the bus's promise
REUSE_GAP = 10
#: of the registrations: users whose every SMS fails (BUS_FAIL_PORTS sms=always:UNREACHABLE)
EDGE_UNREACHABLE = 0.2
UNREACHABLE = "-unreachable"
GATEWAY_FAILURES = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", choices=("redis", "amqp", "amqp-quorum", "embedded"), required=True,
                        help="amqp-quorum: RabbitMQ with BUS_RABBITMQ_QUEUE_TYPE=quorum")
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--commands", type=int, default=200, help="commands sent, duplicates included")
    parser.add_argument("--kills", type=int, default=5, help="pool processes SIGKILLed during the run")
    parser.add_argument("--duplicates", type=float, default=0.1, help="share of sends that repeat an earlier one")
    parser.add_argument("--concurrency", type=int, default=2, help="pool processes per worker")
    parser.add_argument("--broker-outage", action="store_true", help="cut the broker once, halfway")
    parser.add_argument("--db-outage", action="store_true", help="cut the database for 3 s, halfway")
    parser.add_argument("--visibility-timeout", type=int, default=None,
                        help="Redis: BUS_VISIBILITY_TIMEOUT of the workers (default: celeryconfig's; 30 with "
                             "--broker-outage, see below)")
    parser.add_argument("--batch-max", type=int, default=None,
                        help="BUS_BATCH_MAX of the workers (batched execution; default: the bus's, on with a Redis "
                             "result backend; 0: off); above 1 on RabbitMQ the results go to a Redis database of this "
                             "run (batching needs a Redis result backend)")
    parser.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")
    parser.add_argument("--stall", type=float, default=30.0,
                        help="give up when nothing moved this long and nothing waits in the broker")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="where the run's files and logs go")
    parser.add_argument("--json", action="store_true", help="print the report as JSON only")
    parser.add_argument("--edges", action="store_true",
                        help="add charges failing past three retries, exhausted SMS, refused registrations, "
                             "concurrent duplicates and conflicting payloads to the run")
    parser.add_argument("--gateway-failures", type=int, default=None,
                        help=f"with --edges: the gateway's injected failures per charge (default {GATEWAY_FAILURES})")
    args = parser.parse_args(argv)
    if args.commands < 1 or args.kills < 0 or not 0 <= args.duplicates < 1:
        parser.error("--commands >= 1, --kills >= 0, 0 <= --duplicates < 1")
    if args.gateway_failures is not None and not args.edges:
        parser.error("--gateway-failures goes with --edges; add --edges or leave it out")
    if args.gateway_failures is not None and args.gateway_failures < 0:
        parser.error(f"--gateway-failures {args.gateway_failures}: give a count >= 0")
    if args.edges and args.gateway_failures is None:
        args.gateway_failures = GATEWAY_FAILURES
    return args


def say(args: argparse.Namespace, message: str) -> None:
    if not args.json:
        print(message, file=sys.stderr, flush=True)


# ---- the plan ----------------------------------------------------------------------------------
class Send(NamedTuple):
    task: str
    fields: dict[str, Any]
    key: str


def plan(n: int, duplicates: float, rng: random.Random, edges: bool = False) -> list[Send]:
    """N sends; about `duplicates` of them repeat an earlier send; with `edges`, the EDGE_* shares too."""
    sends: list[Send] = []
    fresh_emails: list[tuple[int, str]] = []  # (position in sends, e-mail) of registrations with a new e-mail
    run = f"{rng.getrandbits(32):08x}"
    i = 0
    while len(sends) < n:
        if sends and rng.random() < duplicates:
            sends.append(rng.choice(sends))
        elif rng.random() < 0.6:
            fields = {"order_id": f"o-{run}-{i}", "customer_id": f"c-{run}-{i}", "items": ITEMS}
            sends += with_edges(Send(PLACE_ORDER, fields, f"checkout-{run}-{i}"), edges, rng)
        else:
            user, email = f"u-{run}-{i}", f"u-{run}-{i}@example.com"
            if edges:
                user += UNREACHABLE if rng.random() < EDGE_UNREACHABLE else ""
                earlier = [e for at, e in fresh_emails if at <= len(sends) - REUSE_GAP]
                if earlier and rng.random() < EDGE_REUSED_EMAILS:
                    email = rng.choice(earlier)
                else:
                    fresh_emails.append((len(sends), email))
            fields = {"user_id": user, "email": email, "name": f"User {i}"}
            sends += with_edges(Send(REGISTER_USER, fields, f"signup-{run}-{i}"), edges, rng)
        i += 1
    return sends[:n]


def with_edges(send: Send, edges: bool, rng: random.Random) -> list[Send]:
    """`send`, and with `edges` maybe its burst of identical copies or a conflicting payload right after it."""
    if not edges:
        return [send]
    draw = rng.random()
    if draw < EDGE_BURSTS:
        return [send] * rng.randint(2, 3)
    if draw < EDGE_BURSTS + EDGE_CONFLICTS:
        other = {name: f"{value}-b" for name, value in send.fields.items() if name.endswith("_id")}
        if "email" in send.fields:
            other["email"] = f"{send.key}-b@example.com"
        return [send, send._replace(fields={**send.fields, **other})]
    return [send]


def estimated_executions(sends: list[Send]) -> int:
    """A lower bound of the executions the run will commit (to spread the kills over): claims and deliveries.

    Every key ends as one claim; every order key publishes one OrderPlaced, whichever payload
    wins; every e-mail of a registration key without a conflicting payload is registered once.
    """
    payloads: dict[tuple[str, str], set[str]] = {}
    for send in sends:
        payloads.setdefault((send.task, send.key), set()).add(send.fields[ENTITY[send.task]])
    emails = {s.fields["email"] for s in sends if s.task == REGISTER_USER and len(payloads[(s.task, s.key)]) == 1}
    orders = sum(1 for task, _ in payloads if task == PLACE_ORDER)
    return (len(payloads) + SUBSCRIBERS_PER_COMMAND[PLACE_ORDER] * orders
            + SUBSCRIBERS_PER_COMMAND[REGISTER_USER] * len(emails))


# ---- faults ------------------------------------------------------------------------------------
def pool_children(pid: int) -> list[int]:
    """The pool processes of the worker whose main process is `pid`."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return found


def kill_one(workers: list, rng: random.Random) -> int | None:
    """SIGKILL a random pool process of a random worker; its PID, or None if none was found."""
    for worker in rng.sample(workers, len(workers)):
        pids = pool_children(worker.pid)
        if pids:
            pid = rng.choice(pids)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            return pid
    return None


def broker_outage(scenario: Scenario) -> str:
    """Cut every connection of this run to its broker, leaving shared servers running."""
    if scenario.broker == "embedded":
        from project.transport import embedded
        embedded.stop(scenario.home)
        time.sleep(1)
        embedded.ensure_running(scenario.home)
        return "embedded server restarted"
    if scenario.broker == "redis":
        import redis
        client = redis.Redis.from_url(scenario.broker_url)
        db = int(scenario.broker_url.rsplit("/", 1)[1])
        mine = client.client_id()
        ids = [c["id"] for c in client.client_list() if int(c["db"]) == db and int(c["id"]) != mine]
        for client_id in ids:
            client.client_kill_filter(_id=client_id)
        client.close()
        return f"{len(ids)} Redis client connection(s) killed"
    vhost = scenario.broker_url.rsplit("/", 1)[1]
    done = subprocess.run(["rabbitmqctl", "-q", "close_all_connections", "-p", vhost, "fault injection"],
                          capture_output=True, text=True, timeout=60)
    return f"RabbitMQ connections of {vhost} closed" + ("" if done.returncode == 0 else f" (failed: {done.stderr})")


def db_outage(scenario: Scenario, seconds: float = 3.0) -> str:
    """PostgreSQL: terminate the run's connections for `seconds`; SQLite: hold the write lock that long."""
    from sqlalchemy import create_engine, text
    if scenario.database == "postgresql":
        name = scenario.database_url.rsplit("/", 1)[1]
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        cut = 0
        deadline = time.monotonic() + seconds
        with admin.connect() as conn:
            while time.monotonic() < deadline:
                cut += sum(conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                             "WHERE datname = :d AND pid <> pg_backend_pid()"), {"d": name}).scalars())
                time.sleep(0.2)
        admin.dispose()
        return f"{cut} PostgreSQL connection(s) terminated over {seconds:.0f}s"
    import sqlite3
    conn = sqlite3.connect(scenario.database_url.split("sqlite:///", 1)[1], timeout=60, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    time.sleep(seconds)
    conn.execute("ROLLBACK")
    conn.close()
    return f"SQLite write lock held {seconds:.0f}s"


# ---- measuring ---------------------------------------------------------------------------------
def scalar(scenario: Scenario, sql: str, **params: Any) -> int:
    return int(scenario.rows(sql, **params)[0][0] or 0)


def progress(scenario: Scenario, subscribers: dict[str, list[str]]) -> int:
    """Executions ended so far: commands finished, subscriber inbox claims, deliveries given up (dead-lettered)."""
    given_up = scenario.rows("SELECT task, count(*) FROM bus_dead_letters WHERE reason = 'retries-exhausted' "
                             "GROUP BY task")
    handlers = {s for subs in subscribers.values() for s in subs}
    return (scalar(scenario, "SELECT count(*) FROM bus_commands WHERE status <> 'running'")
            + scalar(scenario, "SELECT count(*) FROM bus_inbox")
            + sum(n for task, n in given_up if task in handlers))


def expected_executions(scenario: Scenario, keys: int, subscribers: dict[str, list[str]]) -> int:
    """Executions the run ends with, given what was committed so far: one per key, one per command a handler
    sent (not the timers: not due during the run), one per (event, subscriber)."""
    events = scenario.rows("SELECT name, count(*) FROM bus_outbox WHERE kind = 'event' GROUP BY name")
    sent = scalar(scenario, "SELECT count(*) FROM bus_outbox WHERE kind = 'command' AND due_at IS NULL")
    return keys + sent + sum(n * len(subscribers.get(name, ())) for name, n in events)


def owed(scenario: Scenario) -> int:
    """Outbox rows owed to the broker: not published, and not a timer that is not due yet (or cancelled)."""
    from sqlalchemy import func, or_, select

    from project.store.tables import outbox, utcnow
    with scenario.engine().connect() as conn:
        return conn.execute(select(func.count()).select_from(outbox).where(
            outbox.c.published_at.is_(None), outbox.c.cancelled_at.is_(None),
            or_(outbox.c.due_at.is_(None), outbox.c.due_at <= utcnow()))).scalar_one()


def restock(bus: Any, sends: list[Send]) -> dict[str, int]:
    """Fill the shelves: pens for every order, books for FILLED of them; the levels."""
    from adapters.repositories import restock as fill
    orders = len({send.key for send in sends if send.task == PLACE_ORDER})
    levels = {"book": 2 * int(orders * FILLED), "pen": orders}
    with bus.engine().begin() as conn:
        fill(conn, levels)
    return levels


def queued(scenario: Scenario, queues: list[str]) -> int:
    """Messages waiting in the bus's queues (Redis: unacked ones too)."""
    if scenario.rabbitmq:
        from kombu import Connection
        total = 0
        with Connection(scenario.broker_url) as conn:
            channel = conn.default_channel
            for queue in queues:
                total += channel.queue_declare(queue=queue, passive=True).message_count
        return total
    import redis
    client = (redis.Redis(unix_socket_path=str(scenario.settings.socket_path)) if scenario.broker == "embedded"
              else redis.Redis.from_url(scenario.broker_url))
    try:
        return sum(client.llen(q) for q in queues) + client.hlen("unacked")
    finally:
        client.close()


def as_json(value: Any) -> Any:
    """A JSON column or body as Python data (SQLite hands back text, a body is bytes); None if it is not JSON."""
    if isinstance(value, (bytes, str)):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value


class DeadLetters(NamedTuple):
    """The dead letters the checks look for, read from their bodies."""

    conflicts: set[tuple[str, str, str]]  # (task, key, order or user id) of payloads refused as a conflict
    exhausted: dict[tuple[str, str], int]  # (subscriber, event id) given up on -> attempts made
    by_reason: dict[str, int]


def dead_letters(scenario: Scenario) -> DeadLetters:
    from project.contracts import IDEMPOTENCY_KEY
    from project.headers import EVENT_ID
    conflicts, exhausted, by_reason = set(), {}, Counter()
    for row in scenario.rows("SELECT task, reason, body, headers FROM bus_dead_letters"):
        by_reason[row.reason] += 1
        body, headers = as_json(row.body) or {}, as_json(row.headers) or {}
        if row.reason == "conflict" and row.task in ENTITY:
            conflicts.add((row.task, body.get(IDEMPOTENCY_KEY), body.get(ENTITY[row.task])))
        elif row.reason == "retries-exhausted" and EVENT_ID in body:
            exhausted[(row.task, body[EVENT_ID])] = int(headers.get("retries", 0)) + 1
    return DeadLetters(conflicts, exhausted, dict(by_reason))


#: keys named per failing figure in the report's `examples`
EXAMPLES = 5


def command_figures(scenario: Scenario, sends: list[Send], dead: DeadLetters) -> tuple[Counter, dict[str, list]]:
    """Each key against what the database holds: its effect, a refusal it deserved, or lost; conflicts; reruns.

    Also a few keys of each failing figure, to look them up in the workers' logs.
    """
    payloads: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}  # (task, key) -> {entity id: fields}
    for send in sends:
        payloads.setdefault((send.task, send.key), {}).setdefault(send.fields[ENTITY[send.task]], send.fields)
    sent = Counter((send.task, send.key, send.fields[ENTITY[send.task]]) for send in sends)
    claims = {(r.task, r.key): r for r in scenario.rows(
        "SELECT task, key, payload, status, error_type, duplicates FROM bus_commands")}
    made = {PLACE_ORDER: Counter(r.order_id for r in scenario.rows("SELECT order_id FROM orders")),
            REGISTER_USER: Counter(r.user_id for r in scenario.rows("SELECT user_id FROM users"))}
    owner = {r.email: r.user_id for r in scenario.rows("SELECT email, user_id FROM users")}
    figures, registered, examples = Counter(), Counter(), {}

    def failing(what: str, n: int, key: str) -> None:
        figures[what] += n
        if n and len(examples.setdefault(what, [])) < EXAMPLES:
            examples[what].append(key)

    for (task, key), options in payloads.items():
        claim = claims.get((task, key))
        stored = as_json(claim.payload) if claim else next(iter(options.values()))
        held = stored[ENTITY[task]]  # the payload the key holds (the first sent, if it holds none)
        applied = [entity for entity in options if made[task][entity]]
        # a registration deserves a refusal when another user holds its e-mail address
        taken = task == REGISTER_USER and owner.get(stored["email"]) not in (None, held)
        if claim and claim.status == "succeeded" and held in applied:
            figures["effects"] += 1
            if task == REGISTER_USER:
                registered[stored["email"]] += 1
        elif claim and claim.status == "failed" and claim.error_type == REFUSED and taken:
            figures["refused"] += 1
            # every send of the refused payload but the one that ran is absorbed, unless the handler ran
            # again (a refusal that let go of its key). Not checked for successes: Celery acks a killed
            # duplicate unrun when the result backend already holds SUCCESS for its id (the same id)
            failing("refusals_run_again", max(0, sent[(task, key, held)] - 1 - claim.duplicates), key)
        else:
            failing("lost", 1, key)
            failing("refusals_not_stored", int(taken), key)
        figures["conflicting_keys"] += len(options) > 1
        failing("conflicts_applied", sum(1 for entity in applied if entity != held), key)
        failing("conflicts_not_refused", sum(1 for entity in options
                                             if entity != held and (task, key, entity) not in dead.conflicts), key)
    figures["keys"] = len(payloads)
    figures["emails_registered_twice"] = sum(n - 1 for n in registered.values())
    return figures, examples


def report(scenario: Scenario, sends: list[Send], subscribers: dict[str, list[str]],
           edges: dict[str, Any] | None) -> dict[str, Any]:
    """The figures, read back from the run's database; `edges`: the --edges injection, if on."""
    dead = dead_letters(scenario)
    commands, examples = command_figures(scenario, sends, dead)
    events = scenario.rows("SELECT id, name, payload, published_at FROM bus_outbox WHERE kind = 'event'")
    per_command = Counter()
    must_give_up: set[tuple[str, str]] = set()  # (subscriber, event id) whose policy must run out
    for e in events:
        payload = as_json(e.payload)
        per_command[(e.name, payload.get("order_id") if e.name != USER_CREATED else payload.get("user_id"))] += 1
        if edges and e.name == USER_CREATED and UNREACHABLE in payload["user_id"]:
            must_give_up.add((WELCOME_SMS, e.id))
    published = Counter(e.name for e in events if e.published_at is not None)
    event_ids = {name: {e.id for e in events if e.name == name} for name in subscribers}
    claimed = {(c.subscriber, c.event_id) for c in scenario.rows("SELECT event_id, subscriber FROM bus_inbox")}
    deliveries = {name: {s: sum(1 for e in event_ids[name] if (s, e) in claimed) for s in subs}
                  for name, subs in subscribers.items()}
    given_up = must_give_up & set(dead.exhausted)
    lost_deliveries = sum(1 for name, subs in subscribers.items() for s in subs for e in event_ids[name]
                          if (s, e) not in claimed and (s, e) not in given_up)

    def repeated(sql: str) -> int:
        return sum(max(0, r[1] - 1) for r in scenario.rows(sql))

    duplicated_subscriber = {
        "gateway charges": repeated("SELECT key, count(*) FROM port_calls WHERE port = 'gateway' GROUP BY key"),
        "refunds": repeated("SELECT key, count(*) FROM port_calls WHERE port = 'refund' GROUP BY key"),
        "mails": repeated("SELECT target, count(*) FROM port_calls WHERE port = 'mail' GROUP BY target"),
        "sms": repeated("SELECT target, count(*) FROM port_calls WHERE port = 'sms' GROUP BY target"),
        "audit entries": repeated("SELECT subject, count(*) FROM audit_log GROUP BY subject"),
    }
    duplicated = (repeated("SELECT order_id, count(*) FROM orders GROUP BY order_id")
                  + repeated("SELECT user_id, count(*) FROM users GROUP BY user_id")
                  + sum(max(0, n - 1) for n in per_command.values()))
    figures = {
        "commands_sent": len(sends),
        "unique_commands": commands["keys"],
        "handler_effects_committed": commands["effects"],
        "refused_commands": commands["refused"],
        "lost_commands": commands["lost"],
        "duplicated_effects": duplicated,
        "duplicates_absorbed": {
            "commands": scalar(scenario, "SELECT sum(duplicates) FROM bus_commands"),
            "subscriber deliveries": scalar(scenario, "SELECT sum(duplicates) FROM bus_inbox")},
        "events_published": {name: published[name] for name in (ORDER_PLACED, USER_CREATED, PAYMENT, *STOCK_EVENTS)},
        "deliveries": deliveries,
        "lost_deliveries": lost_deliveries,
        "duplicated_subscriber_effects": sum(duplicated_subscriber.values()),
        "duplicated_subscriber_effects_by_kind": duplicated_subscriber,
        "gateway_charges": scalar(scenario, "SELECT count(*) FROM port_calls WHERE port = 'gateway'"),
        "dead_letters": dead.by_reason,
        "unpublished_outbox_rows": owed(scenario),
        "examples": examples,
    }
    if edges:
        figures["edges"] = edge_figures(scenario, commands, dead, must_give_up, claimed, edges)
    return figures


def edge_figures(scenario: Scenario, commands: Counter, dead: DeadLetters, must_give_up: set[tuple[str, str]],
                 claimed: set[tuple[str, str]], edges: dict[str, Any]) -> dict[str, Any]:
    """The --edges figures: charges past three retries, exhausted deliveries, refusals, conflicts.

    A charge's attempts are those of the delivery that charged: a second copy of an event
    (redelivered, or relayed while the first hand-off was under way) counts its own, so a
    few charge after fewer attempts than the gateway's injected failures.
    """
    attempts = {int(n): count for n, count in scenario.rows(
        "SELECT attempts, count(*) FROM bus_executions WHERE task = :task AND state = 'succeeded' "
        "GROUP BY attempts", task=CHARGE)}
    given_up = {d: dead.exhausted[d] for d in must_give_up if d in dead.exhausted}
    return {
        "injected": edges,
        "charges_by_attempts": dict(sorted(attempts.items())),
        "charges_past_three_retries": sum(n for made, n in attempts.items() if made > 4),
        "exhausted": {
            "subscriber": WELCOME_SMS,
            "policy_attempts": edges["sms_attempts"],
            "expected": len(must_give_up),
            "dead_lettered": len(given_up),
            "not_dead_lettered": len(must_give_up - set(given_up)),
            "dead_lettered_early": sum(1 for n in given_up.values() if n < edges["sms_attempts"]),
            "with_inbox_claim": len(must_give_up & claimed),
            "by_attempts": dict(sorted(Counter(given_up.values()).items())),
        },
        "refusals_not_stored": commands["refusals_not_stored"],
        "refusals_run_again": commands["refusals_run_again"],
        "emails_registered_twice": commands["emails_registered_twice"],
        "conflicting_keys": commands["conflicting_keys"],
        "conflicts_dead_lettered": len(dead.conflicts),
        "conflicts_not_refused": commands["conflicts_not_refused"],
        "conflicts_applied": commands["conflicts_applied"],
    }


def fulfilment_figures(scenario: Scenario, shelves: dict[str, int]) -> dict[str, Any]:
    """Every placed order's fulfilment against the effects in the shop's tables (see the module docstring)."""
    placed = {r.order_id for r in scenario.rows("SELECT order_id FROM orders")}
    instances = {r.instance_id: (r.status, as_json(r.state)) for r in scenario.rows(
        "SELECT instance_id, status, state FROM bus_process_instances WHERE manager = 'fulfilment'")}
    shipped = {r.order_id for r in scenario.rows("SELECT order_id FROM shipments")}
    cancelled = {r.order_id for r in scenario.rows("SELECT order_id FROM order_cancellations")}
    reserved = {r.order_id for r in scenario.rows("SELECT order_id FROM stock_reservations")}
    refunded = Counter(r.target for r in scenario.rows("SELECT target FROM port_calls WHERE port = 'refund'"))
    charged = {payload["charge_id"] for payload in (as_json(r.payload) for r in scenario.rows(
        "SELECT payload FROM port_calls WHERE port = 'gateway'"))}
    paid = {order for order, (_, state) in instances.items() if state.get("paid")}
    charge_of = {order: state.get("charge_id") for order, (_, state) in instances.items()}
    commands = Counter((r.name, as_json(r.payload).get("order_id")) for r in scenario.rows(
        "SELECT name, payload FROM bus_outbox WHERE kind = 'command' AND due_at IS NULL "
        "AND name IN ('inventory.reserve_stock', 'shipping.ship_order', 'orders.cancel_order', "
        "'billing.refund_payment')"))
    left = scalar(scenario, "SELECT available FROM stock WHERE sku = 'book'")
    return {
        "shelves": shelves,
        "orders": len(placed),
        "shipped": len(shipped),
        "cancelled": len(cancelled),
        "refunded": sum(refunded.values()),
        "not_completed": sorted(o for o in placed if instances.get(o, ("", {}))[0] != "completed")[:EXAMPLES],
        "not_completed_count": sum(1 for o in placed if instances.get(o, ("", {}))[0] != "completed"),
        "shipped_and_cancelled": len(shipped & cancelled),
        "shipped_unreserved_or_unpaid": len(shipped - (reserved & paid)),
        "cancelled_charge_not_refunded": sum(1 for o in cancelled if charge_of.get(o) in charged
                                             and not refunded[charge_of[o]]),
        "commands_sent_twice": sum(n - 1 for n in commands.values() if n > 1),
        "books_reserved_vs_taken": f"{2 * len(reserved)} / {shelves['book'] - left}",
        "books_miscounted": abs(2 * len(reserved) - (shelves["book"] - left)),
    }


# ---- the run -----------------------------------------------------------------------------------
def injected_edges(args: argparse.Namespace, app: Any) -> dict[str, Any]:
    """The failures --edges injects into the workers, checked against the subscribers' policies."""
    charge_retries = app.tasks[CHARGE].binding.retry.max_retries
    if args.gateway_failures > charge_retries:
        raise SystemExit(f"--gateway-failures {args.gateway_failures}: {CHARGE} gives up after {charge_retries} "
                         f"retries, so no charge would succeed; ask for at most {charge_retries}")
    return {"BUS_FAIL_PORTS": f"gateway={args.gateway_failures},sms=always:{UNREACHABLE}",
            "gateway_failures": args.gateway_failures, "charge_max_retries": charge_retries,
            "sms_attempts": app.tasks[WELCOME_SMS].binding.retry.max_retries + 1}


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="faults-"))
    home = workdir / f"{args.broker}-{args.db}-{os.getpid()}"
    scenario = open_scenario(args.broker, args.db, home)
    relay_stop = threading.Event()
    try:
        visibility = args.visibility_timeout or (30 if args.broker_outage and not scenario.rabbitmq else None)
        if visibility:
            scenario.env["BUS_VISIBILITY_TIMEOUT"] = str(visibility)
        if args.batch_max is not None:
            scenario.env["BUS_BATCH_MAX"] = str(args.batch_max)
        if (args.batch_max or 0) > 1:
            if not scenario.env.get("CELERY_RESULT_BACKEND", "").startswith("redis"):
                from project.testing.isolation import claim_redis_db
                number = claim_redis_db(scenario._cleanups)
                scenario.env["CELERY_RESULT_BACKEND"] = f"redis://127.0.0.1:6379/{number}"
        os.environ.update(scenario.env)
        from project import app, bus
        from project.messaging.outbox import relay
        app.loader.import_default_modules()
        subscribers = {name: sorted(q.name for q in bus.topology.subscriber_queues(name))
                       for name in (ORDER_PLACED, USER_CREATED, PAYMENT, *STOCK_EVENTS)}
        queues = [q.name for q in bus.topology.queues()]
        edges = injected_edges(args, app) if args.edges else None

        say(args, f"starting {len(WORKERS)} workers on {args.broker}/{args.db} ...")
        worker_env = {"BUS_FAIL_PORTS": edges["BUS_FAIL_PORTS"]} if edges else {}
        workers = [scenario.start_worker(boundaries=[",".join(b)], concurrency=args.concurrency,
                                         name=f"faults-{b[0]}", wait=False, env=worker_env) for b in WORKERS]
        for worker in workers:
            worker.wait_ready(scenario.control, timeout=120)

        def relay_loop() -> None:  # beat's bus.relay_outbox, every second
            while not relay_stop.wait(1.0):
                try:
                    relay(bus.wiring, grace=timedelta(seconds=3))
                except Exception as exc:  # noqa: BLE001 - an outage; the next round retries
                    say(args, f"relay: {exc!r}")
        threading.Thread(target=relay_loop, daemon=True).start()

        sends = plan(args.commands, args.duplicates, rng, edges=args.edges)
        shelves = restock(bus, sends)
        keys = len({(send.task, send.key) for send in sends})
        estimate = estimated_executions(sends)
        send_errors: list[str] = []

        def send_all() -> None:
            for task, fields, key in sends:
                for attempt in range(30):  # a send during a broker outage waits for the broker
                    try:
                        app.tasks[task].delay(**fields, idempotency_key=key)
                        break
                    except Exception as exc:  # noqa: BLE001
                        if attempt == 29:
                            send_errors.append(repr(exc))
                        time.sleep(1)

        started = time.monotonic()
        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        kills, killed, faults = 0, [], []
        outage_due = (args.broker_outage or args.db_outage)
        timeout = args.timeout or 120 + args.commands * 0.1 + (visibility or 0)
        last_value, last_move = -1, time.monotonic()
        sent_at: float | None = None
        while True:
            done = progress(scenario, subscribers)
            if done != last_value:
                last_value, last_move = done, time.monotonic()
            while kills < args.kills and done >= estimate * (kills + 1) / (args.kills + 1):
                pid = kill_one(workers, rng)
                if pid is None:
                    break
                kills += 1
                killed.append(pid)
            if outage_due and done >= estimate / 2:
                outage_due = False
                if args.broker_outage:
                    faults.append(broker_outage(scenario))
                if args.db_outage:
                    faults.append(db_outage(scenario))
                say(args, "faults: " + "; ".join(faults))
            if not sender.is_alive():
                if sent_at is None:
                    sent_at = time.monotonic()
                    say(args, f"sent {len(sends)} commands in {sent_at - started:.1f}s; waiting for quiescence")
                waiting = queued(scenario, queues)
                expected = expected_executions(scenario, keys, subscribers)
                unpublished = owed(scenario)
                if done >= expected and kills >= args.kills and waiting == 0 and not unpublished:
                    break
                # a publisher killed mid-publish holds its rows until its claim expires (outbox.CLAIM_TTL):
                # they are owed, like messages waiting in the broker, so the stall rule waits for them too
                stalled = waiting == 0 and not unpublished and time.monotonic() - last_move > args.stall
                if stalled or time.monotonic() - started > timeout:
                    say(args, f"not quiescent: {done} of {expected} executions; giving up")
                    break
            time.sleep(0.2)
        quiesced = time.monotonic()
        time.sleep(2.0)  # anything that should not come (a duplicate) comes now
        figures = report(scenario, sends, subscribers, edges)
        figures["fulfilment"] = fulfilment_figures(scenario, shelves)
        figures["waiting_in_broker"] = queued(scenario, queues)
        figures.update(
            broker=args.broker, db=args.db, batch_max=int(app.conf.get("bus_batch_max") or 0),
            kills=kills, kills_asked=args.kills, faults=faults,
            send_errors=len(send_errors), workers=len(workers), pool_processes_per_worker=args.concurrency,
            seconds_to_send=round(sent_at - started, 1), seconds_to_quiesce=round(quiesced - sent_at, 1),
            seconds_total=round(quiesced - started, 1),
            expected_executions=expected_executions(scenario, keys, subscribers),
            settings={"task_acks_late": app.conf.task_acks_late,
                      "task_reject_on_worker_lost": app.conf.task_reject_on_worker_lost,
                      "worker_prefetch_multiplier": app.conf.worker_prefetch_multiplier,
                      **{k: v for k, v in app.conf.broker_transport_options.items()
                         if not scenario.rabbitmq}},
            workers_alive=sum(1 for w in workers if w.process.poll() is None))
        return figures
    finally:
        relay_stop.set()
        scenario.close()


def failed(figures: dict[str, Any]) -> list[str]:
    """The reasons the run failed (empty: it passed)."""
    reasons = [f"{name} = {figures[name]}" for name in ("lost_commands", "lost_deliveries", "duplicated_effects",
                                                        "duplicated_subscriber_effects", "send_errors",
                                                        "unpublished_outbox_rows")
               if figures[name]]
    reasons += [f"fulfilment {name} = {figures['fulfilment'][name]}"
                for name in ("not_completed_count", "shipped_and_cancelled", "shipped_unreserved_or_unpaid",
                             "cancelled_charge_not_refunded", "commands_sent_twice", "books_miscounted")
                if figures["fulfilment"][name]]
    if figures["kills"] < figures["kills_asked"]:
        reasons.append(f"only {figures['kills']} of {figures['kills_asked']} kills done")
    edges = figures.get("edges")
    if edges:
        checks = {f"exhausted {name}": edges["exhausted"][name]
                  for name in ("not_dead_lettered", "dead_lettered_early", "with_inbox_claim")}
        checks.update((name, edges[name]) for name in ("emails_registered_twice", "refusals_not_stored",
                                                       "refusals_run_again", "conflicts_not_refused",
                                                       "conflicts_applied"))
        reasons += [f"{name} = {value}" for name, value in checks.items() if value]
    return reasons


def show(figures: dict[str, Any]) -> None:
    rows = [
        ("broker / database", f"{figures['broker']} / {figures['db']}"
                                + f" (batches of up to {max(figures.get('batch_max') or 1, 1)})"),
        ("workers x pool processes", f"{figures['workers']} x {figures['pool_processes_per_worker']}"),
        ("pool processes SIGKILLed", figures["kills"]),
        ("other faults", "; ".join(figures["faults"]) or "-"),
        ("commands sent", figures["commands_sent"]),
        ("unique commands", figures["unique_commands"]),
        ("handler effects committed", figures["handler_effects_committed"]),
        ("lost commands", figures["lost_commands"]),
        ("duplicated effects", figures["duplicated_effects"]),
        ("duplicates absorbed", json.dumps(figures["duplicates_absorbed"])),
        ("events published", json.dumps(figures["events_published"])),
        ("deliveries per subscriber", json.dumps(figures["deliveries"])),
        ("lost deliveries", figures["lost_deliveries"]),
        ("still waiting in the broker", figures["waiting_in_broker"]),
        ("duplicated subscriber effects", json.dumps(figures["duplicated_subscriber_effects_by_kind"])),
        ("gateway charges", figures["gateway_charges"]),
        ("fulfilment: orders / shipped / cancelled / refunded",
         " / ".join(str(figures["fulfilment"][n]) for n in ("orders", "shipped", "cancelled", "refunded"))),
        ("fulfilment: not completed / shipped and cancelled / shipped unready / charge kept / sent twice",
         " / ".join(str(figures["fulfilment"][n]) for n in (
             "not_completed_count", "shipped_and_cancelled", "shipped_unreserved_or_unpaid",
             "cancelled_charge_not_refunded", "commands_sent_twice"))),
        ("fulfilment: books reserved / taken from the shelves", figures["fulfilment"]["books_reserved_vs_taken"]),
        ("dead letters by reason", json.dumps(figures["dead_letters"]) if figures["dead_letters"] else "none"),
        ("keys of failing figures", json.dumps(figures["examples"]) if figures["examples"] else "none"),
        ("seconds to send / to quiesce / total",
         f"{figures['seconds_to_send']} / {figures['seconds_to_quiesce']} / {figures['seconds_total']}"),
    ]
    edges = figures.get("edges")
    if edges:
        exhausted = edges["exhausted"]
        rows += [
            ("injected failures", edges["injected"]["BUS_FAIL_PORTS"]),
            ("charges by attempts", json.dumps(edges["charges_by_attempts"])),
            ("charges past three retries", edges["charges_past_three_retries"]),
            (f"exhausted {exhausted['subscriber']}: expected / dead-lettered",
             f"{exhausted['expected']} / {exhausted['dead_lettered']}"),
            ("... not dead-lettered / early / with inbox claim",
             " / ".join(str(exhausted[n]) for n in ("not_dead_lettered", "dead_lettered_early", "with_inbox_claim"))),
            (f"... dead-lettered by attempts (policy: {exhausted['policy_attempts']})",
             json.dumps(exhausted["by_attempts"])),
            ("refused commands / refusals not stored / run again",
             f"{figures['refused_commands']} / {edges['refusals_not_stored']} / {edges['refusals_run_again']}"),
            ("e-mails registered twice", edges["emails_registered_twice"]),
            ("conflicting keys / dead-lettered as conflict",
             f"{edges['conflicting_keys']} / {edges['conflicts_dead_lettered']}"),
            ("conflicts not refused / applied", f"{edges['conflicts_not_refused']} / {edges['conflicts_applied']}"),
        ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    """SIGTERM (a caller's timeout) unwinds like Ctrl-C: the `finally` blocks stop the workers started."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    figures = run(args)
    reasons = failed(figures)
    figures["passed"] = not reasons
    figures["failures"] = reasons
    if args.json:
        print(json.dumps(figures, indent=2, default=str))
    else:
        show(figures)
        print("PASS" if not reasons else "FAIL: " + "; ".join(reasons))
    return 0 if not reasons else 1


if __name__ == "__main__":
    sys.exit(main())
