"""The fault-injection suite: real workers, real brokers, processes SIGKILLed during the run.

    python bench/faults.py --broker redis|amqp|amqp-quorum|embedded [--db sqlite|postgresql]
                           --commands N --kills K [--json] [--broker-outage] [--db-outage]

What it does, on an installation of its own (a fresh Redis database, RabbitMQ vhost or
embedded server, and a fresh SQLite file or PostgreSQL database, as the integration
tests make them; everything is removed at the end):
- starts three workers (2 pool processes each) for the reference domain's boundaries:
  orders+accounts (commands), billing+audit and notifications+bus (subscribers), and an
  outbox relay (the beat task's work, in this process);
- sends N commands, PlaceOrder and RegisterUser, with a share of them sent again with
  the same idempotency key (duplicates); each PlaceOrder publishes OrderPlaced to 2
  subscribers, each RegisterUser UserAccountCreated to 3;
- SIGKILLs a random pool process of a random worker K times, spread evenly over the
  run's progress (the worker forks a new one; the killed message is redelivered);
- optionally cuts the broker (--broker-outage: restarts the embedded server, or drops
  every client connection of the run's Redis database / RabbitMQ vhost, shared servers
  being left running) and the database (--db-outage: terminates the run's PostgreSQL
  connections for 3 s, or holds SQLite's write lock for 3 s) once, halfway. A Redis
  server that goes down takes the worker's attempt to give its reserved messages back
  with it: they stay in Redis' unacked hash until the visibility timeout, so with
  --broker-outage on Redis the workers run with a 30 s visibility timeout unless told;
- waits for quiescence: every expected effect there, the queues empty and the outbox
  published; it gives up after --timeout, or when nothing moved for --stall seconds
  while nothing waits in the broker;
- reports what the database holds. Lost (a unique command without its effect, an event
  without a subscriber's inbox claim) or duplicated (an effect twice: an order or a user,
  an event per command, a charge, a mail, an SMS, an audit entry) above 0: exit 1.
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
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.integration.scenarios import PG_ADMIN_URL, Scenario, open_scenario  # noqa: E402

ITEMS = [{"sku": "book", "quantity": 2, "unit_price": "12.50"}, {"sku": "pen", "quantity": 1, "unit_price": "1.99"}]
WORKERS = (("orders", "accounts"), ("billing", "audit"), ("notifications", "bus"))
ORDER_PLACED, USER_CREATED, PAYMENT = "events.order_placed", "events.user_account_created", "events.payment_processed"


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
    parser.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")
    parser.add_argument("--stall", type=float, default=30.0,
                        help="give up when nothing moved this long and nothing waits in the broker")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="where the run's files and logs go")
    parser.add_argument("--json", action="store_true", help="print the report as JSON only")
    args = parser.parse_args(argv)
    if args.commands < 1 or args.kills < 0 or not 0 <= args.duplicates < 1:
        parser.error("--commands >= 1, --kills >= 0, 0 <= --duplicates < 1")
    return args


def say(args: argparse.Namespace, message: str) -> None:
    if not args.json:
        print(message, file=sys.stderr, flush=True)


# ---- the plan ----------------------------------------------------------------------------------
def plan(n: int, duplicates: float, rng: random.Random) -> list[tuple[str, dict[str, Any], str]]:
    """N sends: (task, fields, idempotency key); about `duplicates` of them repeat an earlier send."""
    sends: list[tuple[str, dict[str, Any], str]] = []
    run = f"{rng.getrandbits(32):08x}"
    for i in range(n):
        if sends and rng.random() < duplicates:
            sends.append(rng.choice(sends))
            continue
        if rng.random() < 0.6:
            fields = {"order_id": f"o-{run}-{i}", "customer_id": f"c-{run}-{i}", "items": ITEMS}
            sends.append(("orders.place_order", fields, f"checkout-{run}-{i}"))
        else:
            fields = {"user_id": f"u-{run}-{i}", "email": f"u-{run}-{i}@example.com", "name": f"User {i}"}
            sends.append(("accounts.register_user", fields, f"signup-{run}-{i}"))
    return sends


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
        from project import embedded
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


def progress(scenario: Scenario) -> int:
    """Executions committed so far: commands finished + subscriber inbox claims."""
    return (scalar(scenario, "SELECT count(*) FROM bus_commands WHERE status <> 'running'")
            + scalar(scenario, "SELECT count(*) FROM bus_inbox"))


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


def report(scenario: Scenario, sends: list, subscribers: dict[str, list[str]]) -> dict[str, Any]:
    """The figures, read back from the run's database."""
    unique = {(task, key): fields for task, fields, key in sends}
    orders = {f["order_id"] for (task, _), f in unique.items() if task == "orders.place_order"}
    users = {f["user_id"] for (task, _), f in unique.items() if task == "accounts.register_user"}
    order_rows = Counter(r.order_id for r in scenario.rows("SELECT order_id FROM orders"))
    user_rows = Counter(r.user_id for r in scenario.rows("SELECT user_id FROM users"))
    events = scenario.rows("SELECT id, name, payload, published_at FROM bus_outbox WHERE kind = 'event'")
    per_command = Counter()
    for e in events:
        payload = json.loads(e.payload) if isinstance(e.payload, str) else e.payload
        per_command[(e.name, payload.get("order_id") if e.name != USER_CREATED else payload.get("user_id"))] += 1
    published = Counter(e.name for e in events if e.published_at is not None)
    event_ids = {name: {e.id for e in events if e.name == name} for name in subscribers}
    claims = scenario.rows("SELECT event_id, subscriber FROM bus_inbox")
    deliveries = {name: {s: sum(1 for c in claims if c.subscriber == s and c.event_id in event_ids[name])
                         for s in subs} for name, subs in subscribers.items()}
    lost_deliveries = sum(len(event_ids[name]) - n for name, subs in deliveries.items() for n in subs.values())

    def repeated(sql: str) -> int:
        return sum(max(0, r[1] - 1) for r in scenario.rows(sql))

    duplicated_subscriber = {
        "gateway charges": repeated("SELECT key, count(*) FROM port_calls WHERE port = 'gateway' GROUP BY key"),
        "mails": repeated("SELECT target, count(*) FROM port_calls WHERE port = 'mail' GROUP BY target"),
        "sms": repeated("SELECT target, count(*) FROM port_calls WHERE port = 'sms' GROUP BY target"),
        "audit entries": repeated("SELECT subject, count(*) FROM audit_log GROUP BY subject"),
    }
    effects = sum(1 for o in orders if order_rows[o]) + sum(1 for u in users if user_rows[u])
    duplicated = (sum(max(0, n - 1) for n in order_rows.values()) + sum(max(0, n - 1) for n in user_rows.values())
                  + sum(max(0, n - 1) for n in per_command.values()))
    return {
        "commands_sent": len(sends),
        "unique_commands": len(unique),
        "handler_effects_committed": effects,
        "lost_commands": len(unique) - effects,
        "duplicated_effects": duplicated,
        "duplicates_absorbed": {
            "commands": scalar(scenario, "SELECT sum(duplicates) FROM bus_commands"),
            "subscriber deliveries": scalar(scenario, "SELECT sum(duplicates) FROM bus_inbox")},
        "events_published": {name: published[name] for name in (ORDER_PLACED, USER_CREATED, PAYMENT)},
        "deliveries": deliveries,
        "lost_deliveries": lost_deliveries,
        "duplicated_subscriber_effects": sum(duplicated_subscriber.values()),
        "duplicated_subscriber_effects_by_kind": duplicated_subscriber,
        "gateway_charges": scalar(scenario, "SELECT count(*) FROM port_calls WHERE port = 'gateway'"),
        "dead_letters": {r.reason: r[1] for r in scenario.rows(
            "SELECT reason, count(*) FROM bus_dead_letters GROUP BY reason")},
        "unpublished_outbox_rows": scalar(scenario, "SELECT count(*) FROM bus_outbox WHERE published_at IS NULL"),
    }


# ---- the run -----------------------------------------------------------------------------------
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
        os.environ.update(scenario.env)
        from project import app, bus
        from project.outbox import relay
        app.loader.import_default_modules()
        subscribers = {name: sorted(q.name for q in bus.topology.subscriber_queues(name))
                       for name in (ORDER_PLACED, USER_CREATED)}
        queues = [q.name for q in bus.topology.queues()]

        say(args, f"starting {len(WORKERS)} workers on {args.broker}/{args.db} ...")
        workers = [scenario.start_worker(boundaries=[",".join(b)], concurrency=args.concurrency,
                                         name=f"faults-{b[0]}", wait=False) for b in WORKERS]
        for worker in workers:
            worker.wait_ready(scenario.control, timeout=120)

        def relay_loop() -> None:  # beat's bus.relay_outbox, every second
            while not relay_stop.wait(1.0):
                try:
                    relay(bus, grace=timedelta(seconds=3))
                except Exception as exc:  # noqa: BLE001 - an outage; the next round retries
                    say(args, f"relay: {exc!r}")
        threading.Thread(target=relay_loop, daemon=True).start()

        sends = plan(args.commands, args.duplicates, rng)
        unique = {(t, k): f for t, f, k in sends}
        expected = len(unique) + sum(2 if t == "orders.place_order" else 3 for t, _ in unique)
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
            done = progress(scenario)
            if done != last_value:
                last_value, last_move = done, time.monotonic()
            while kills < args.kills and done >= expected * (kills + 1) / (args.kills + 1):
                pid = kill_one(workers, rng)
                if pid is None:
                    break
                kills += 1
                killed.append(pid)
            if outage_due and done >= expected / 2:
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
                if done >= expected and kills >= args.kills and waiting == 0 and not scalar(
                        scenario, "SELECT count(*) FROM bus_outbox WHERE published_at IS NULL"):
                    break
                if (waiting == 0 and time.monotonic() - last_move > args.stall) or time.monotonic() - started > timeout:
                    say(args, f"not quiescent: {done} of {expected} executions; giving up")
                    break
            time.sleep(0.2)
        quiesced = time.monotonic()
        time.sleep(2.0)  # anything that should not come (a duplicate) comes now
        figures = report(scenario, sends, subscribers)
        figures["waiting_in_broker"] = queued(scenario, queues)
        figures.update(
            broker=args.broker, db=args.db, kills=kills, kills_asked=args.kills, faults=faults,
            send_errors=len(send_errors), workers=len(workers), pool_processes_per_worker=args.concurrency,
            seconds_to_send=round(sent_at - started, 1), seconds_to_quiesce=round(quiesced - sent_at, 1),
            seconds_total=round(quiesced - started, 1), expected_executions=expected,
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
                                                        "duplicated_subscriber_effects", "send_errors")
               if figures[name]]
    if figures["kills"] < figures["kills_asked"]:
        reasons.append(f"only {figures['kills']} of {figures['kills_asked']} kills done")
    return reasons


def show(figures: dict[str, Any]) -> None:
    rows = [
        ("broker / database", f"{figures['broker']} / {figures['db']}"),
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
        ("dead letters by reason", json.dumps(figures["dead_letters"]) if figures["dead_letters"] else "none"),
        ("seconds to send / to quiesce / total",
         f"{figures['seconds_to_send']} / {figures['seconds_to_quiesce']} / {figures['seconds_total']}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
