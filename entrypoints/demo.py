"""`bus demo`: the reference domain end to end on the embedded default (no servers).

Starts the embedded broker and real worker processes, sends commands (with duplicates,
a key conflict, a domain refusal, invalid and pickled messages), and shows both event
cycles: PlaceOrder -> OrderPlaced -> (charge, thank-you e-mail, fulfilment) and RegisterUser ->
UserAccountCreated -> (welcome e-mail, SMS, audit). Billing is offline while the orders
are placed (its events wait in its queue) and, once started, its payment gateway fails
twice per charge: billing retries alone, its siblings run once.

The fulfilment process manager (handlers/fulfilment.py) reserves each order's stock and
ships it once it is paid. Two more orders show its other ends: one whose 30-minute payment
timeout is made due at once (project/testing/timers.py `due_now`) while billing is
offline: cancelled, and its late charge refunded; one of a SKU with no stock: cancelled,
and its charge refunded. Every figure printed is read back from the bus's own records.
"""
from __future__ import annotations

import json
import uuid
from collections import Counter
from datetime import timedelta
from pathlib import Path

import typer
from kombu import Connection
from pydantic import ValidationError
from rich.table import Table
from sqlalchemy import func, select

from project.observe.console import make_console

console = make_console(stderr=True)
ITEMS = [{"sku": "book", "quantity": 2, "unit_price": "12.50"}, {"sku": "pen", "quantity": 1, "unit_price": "1.99"}]
#: what the shelves hold when the demo starts: no rare coins
SHELVES = {"book": 1000, "pen": 1000, "rare-coin": 0}
RARE = [{"sku": "rare-coin", "quantity": 1, "unit_price": "500.00"}]


def demo(as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary only.")) -> None:
    """Run a worker, send commands including duplicates and bad ones, print what happened."""
    from project import app, bus
    from project.store.migrate import upgrade
    from project.testing.processes import start_worker
    from project.transport import embedded

    settings = bus.settings
    started_broker = settings.embedded and embedded.ensure_running(settings.home)
    upgrade(settings.database_url)
    app.loader.import_default_modules()
    _restock(bus)
    logs = settings.home / "logs"
    workers = [start_worker(logdir=logs, name="demo", concurrency=2,
                            boundaries=["orders,accounts,notifications,audit,bus,fulfilment,inventory,shipping"])]
    try:
        say(as_json, f"worker {workers[0].hostname} starting on {settings.broker_kind}; billing is offline ...")
        workers[0].wait_ready(app)
        summary = run_scenario(app, bus, as_json)
        orders = fulfilment_orders(bus, summary["_run"], as_json)
        waiting = queue_length(app, "billing.charge_payment")
        say(as_json, f"{waiting} OrderPlaced event(s) wait in billing.charge_payment; starting billing, "
                     f"whose gateway fails twice per charge ...")
        workers.append(start_worker(logdir=logs, name="demo-billing", concurrency=1, boundaries=["billing"],
                                    env={"BUS_FAIL_PORTS": "gateway=2"}))
        workers[-1].wait_ready(app)
        summary.update(fulfilment=fulfilment_outcomes(bus, orders))
        summary.update(waiting_for_offline_billing=waiting, **events_summary(bus, summary.pop("_started"),
                                                                             settings.home))
    finally:
        for worker in workers:
            worker.stop()
        if started_broker:
            embedded.stop(settings.home)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        show(summary)


def run_scenario(app, bus, quiet: bool) -> dict:
    """Send the demo's commands and collect their outcomes."""
    from project.store.tables import utcnow
    from tasks.accounts import register_user
    from tasks.orders import place_order

    run, started = uuid.uuid4().hex[:6], utcnow()
    since = _dead_letter_ids(bus)
    results, outcomes, sent, caller_rejected = [], Counter(), 0, 0
    for n in range(5):
        fields = {"order_id": f"o-{run}-{n}", "customer_id": f"c-{n}", "items": ITEMS}
        for _ in range(2):  # every order is sent twice with the same key: once is executed
            results.append(place_order.delay(**fields, idempotency_key=f"checkout-{run}-{n}"))
            sent += 1
    results.append(place_order.delay(order_id=f"o-{run}-0", customer_id="someone-else", items=ITEMS,
                                     idempotency_key=f"checkout-{run}-0"))  # same key, other payload
    results.append(register_user.delay(user_id=f"u-{run}-1", email=f"ada-{run}@example.com", name="Ada"))
    results.append(register_user.delay(user_id=f"u-{run}-2", email=f"ada-{run}@example.com", name="Ada B"))
    sent += 3
    try:  # invalid in the caller: nothing is published
        place_order.delay(order_id=f"o-{run}-x", customer_id="", items=[])
    except ValidationError as exc:
        caller_rejected += 1
        say(quiet, f"caller refused an invalid PlaceOrder before publishing: {exc.error_count()} field error(s)")
    # a foreign sender without our contracts sends an invalid payload: the worker dead-letters it
    results.append(app.send_task("orders.place_order", kwargs={"order_id": f"o-{run}-y", "items": "none"}))
    sent += 1
    _send_pickle(app, f"o-{run}-p")
    sent += 1
    for result in results:
        try:
            result.get(timeout=30, propagate=True)
            outcomes["succeeded"] += 1
        except Exception as exc:  # noqa: BLE001 - every outcome class is counted and shown
            outcomes[type(exc).__name__] += 1
            say(quiet, f"{result.id[:8]} -> {type(exc).__name__}: {str(exc)[:110]}")
    dead = _wait_dead_letters(bus, since, expected=3)
    executions, absorbed = _claims_since(bus, started, [place_order.name, register_user.name])
    return {
        "broker": bus.settings.broker_kind,
        "commands_sent": sent + caller_rejected,
        "published": sent,
        "handler_executions": executions,
        "duplicates_absorbed": absorbed,
        "rejected_by_caller": caller_rejected,
        "dead_lettered": dict(dead),
        "rejected_messages": caller_rejected + sum(dead.values()),
        "outcomes": dict(outcomes),
        "first_order": results[0].id,  # its conversation: `bus trace <id>`
        "_started": started,
        "_run": run,
    }


def fulfilment_orders(bus, run: str, quiet: bool) -> dict[str, str]:
    """Place an order to time out and one out of stock; make the first one's payment timeout due now.

    {order id: what the demo means it to show}: the first order of the scenario, shipped, and these two.
    """
    from project.messaging.outbox import relay
    from project.testing.timers import due_now
    from tasks.orders import place_order
    late, rare = f"o-{run}-late", f"o-{run}-rare"
    for order_id, items in ((late, ITEMS), (rare, RARE)):
        place_order.delay(order_id=order_id, customer_id="c-demo", items=items).get(timeout=30)
    instance = _wait_instance(bus, late, lambda i: "payment" in i.timers)
    say(quiet, f"{late} waits for its payment (billing is offline): its 30-minute payment timeout is made due now")
    due_now(bus.engine(), instance.timers["payment"])
    relay(bus.wiring, grace=timedelta(seconds=5))  # what the workers' relay does at its next tick
    _wait_instance(bus, late, lambda i: i.state.cancelled is not None)
    _wait_instance(bus, rare, lambda i: i.state.cancelled is not None)
    return {f"o-{run}-0": "happy", late: "payment timed out", rare: "out of stock"}


def fulfilment_outcomes(bus, orders: dict[str, str], timeout: float = 60.0) -> dict[str, dict]:
    """Wait until every fulfilment instance of the demo's orders completed and the commands it sent took
    effect (shipments, cancellations, refunds: rows of the shop's tables); what became of each order."""
    import time

    from adapters.orm import order_cancellations, port_calls, shipments
    outcomes, charges = {}, []
    for order_id, meant in orders.items():
        state = _wait_instance(bus, order_id, lambda i: i.status == "completed", timeout).state
        outcomes[order_id] = {"meant": meant, "shipped": state.shipped, "cancelled": state.cancelled,
                              "refunded": state.refunded}
        charges += [state.charge_id] if state.refunded else []
    decided = {"shipments": sum(o["shipped"] for o in outcomes.values()), "refunds": len(charges),
               "cancellations": sum(o["cancelled"] is not None for o in outcomes.values())}
    deadline = time.monotonic() + timeout
    while True:
        with bus.engine().connect() as conn:
            effects = {name: conn.execute(select(func.count()).where(where)).scalar_one() for name, where in (
                ("shipments", shipments.c.order_id.in_(orders)),
                ("cancellations", order_cancellations.c.order_id.in_(orders)),
                ("refunds", (port_calls.c.port == "refund") & port_calls.c.target.in_(charges)))}
        if effects == decided or time.monotonic() > deadline:
            return {"orders": outcomes, **effects}
        time.sleep(0.2)


def _wait_instance(bus, order_id: str, done, timeout: float = 30.0):
    """The fulfilment instance of `order_id` once `done(instance)`; RuntimeError naming it after `timeout`."""
    import time
    manager, deadline = bus.process_managers["fulfilment"], time.monotonic() + timeout
    while True:
        with bus.engine().connect() as conn:
            instance = manager.instance(conn, order_id)
        if instance is not None and done(instance):
            return instance
        if time.monotonic() > deadline:
            raise RuntimeError(f"the fulfilment of {order_id} did not get there in {timeout:.0f}s (now: "
                               f"{instance}); the workers' logs under BUS_HOME/logs say why")
        time.sleep(0.2)


def _restock(bus) -> None:
    from adapters.repositories import restock
    with bus.engine().begin() as conn:
        restock(conn, SHELVES)


def queue_length(app, queue: str) -> int:
    """Messages ready in `queue` (a passive declare: works on Redis and RabbitMQ)."""
    with app.connection_for_read() as conn:
        return conn.default_channel.queue_declare(queue=queue, passive=True).message_count


def events_summary(bus, started, home: Path, expected: int = 5 * 2 + 3, timeout: float = 60.0) -> dict:
    """Wait until every subscriber handled its events; deliveries, effects and retries."""
    import time

    from adapters.orm import port_calls
    from project.store.tables import inbox, outbox
    deadline = time.monotonic() + timeout
    while True:
        with bus.engine().connect() as conn:
            deliveries = dict(conn.execute(select(inbox.c.subscriber, func.count())
                                           .where(inbox.c.processed_at >= started).group_by(inbox.c.subscriber)).all())
            published = conn.execute(select(func.count()).where(outbox.c.created_at >= started,
                                                                outbox.c.published_at.isnot(None))).scalar_one()
            effects = dict(conn.execute(select(port_calls.c.port, func.count())
                                        .where(port_calls.c.at >= started).group_by(port_calls.c.port)).all())
        if sum(deliveries.values()) >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    injected = sum(int(p.read_text() or 0) for p in (home / "injected-failures").glob("gateway-*"))
    return {"events_published": published, "deliveries_per_subscriber": deliveries,
            "port_effects": effects, "billing_retries": injected}


def _send_pickle(app, order_id: str) -> None:
    """A pickled task message, as an old or hostile sender would send it."""
    with Connection(app.conf.broker_url) as conn:
        conn.Producer().publish(
            {"order_id": order_id}, serializer="pickle", routing_key="orders.place_order",
            exchange="orders.place_order", headers={"task": "orders.place_order", "id": str(uuid.uuid4())})


def _claims_since(bus, started, tasks: list[str]) -> tuple[int, int]:
    """(handler executions, duplicates absorbed) of the commands `tasks` (those the demo sends itself, not
    those its handlers send) recorded by the idempotency claims."""
    from project.store.tables import commands
    with bus.engine().connect() as conn:
        row = conn.execute(select(func.count(), func.coalesce(func.sum(commands.c.duplicates), 0))
                           .where(commands.c.created_at >= started, commands.c.task.in_(tasks))).one()
    return row[0], row[1]


def _dead_letter_ids(bus) -> int:
    from project.store.tables import dead_letters
    with bus.engine().connect() as conn:
        return conn.execute(select(func.coalesce(func.max(dead_letters.c.id), 0))).scalar_one()


def _wait_dead_letters(bus, since: int, expected: int, timeout: float = 15.0) -> Counter:
    import time

    from project.store.tables import dead_letters
    deadline = time.monotonic() + timeout
    while True:
        with bus.engine().connect() as conn:
            rows = conn.execute(select(dead_letters.c.reason).where(dead_letters.c.id > since)).all()
        if len(rows) >= expected or time.monotonic() > deadline:
            return Counter(r.reason for r in rows)
        time.sleep(0.2)


def say(quiet: bool, text: str) -> None:
    if not quiet:
        console.print(text)


def show(summary: dict) -> None:
    table = Table(title=f"bus demo on the {summary['broker']} broker")
    table.add_column("what")
    table.add_column("count", justify="right")
    for key in ("commands_sent", "published", "handler_executions", "duplicates_absorbed",
                "rejected_by_caller", "rejected_messages", "events_published",
                "waiting_for_offline_billing", "billing_retries"):
        table.add_row(key.replace("_", " "), str(summary[key]))
    for reason, count in sorted(summary["dead_lettered"].items()):
        table.add_row(f"dead-lettered: {reason}", str(count))
    for subscriber, count in sorted(summary["deliveries_per_subscriber"].items()):
        table.add_row(f"events handled by {subscriber}", str(count))
    for port, count in sorted(summary["port_effects"].items()):
        table.add_row(f"effects on port: {port}", str(count))
    fulfilment = summary["fulfilment"]
    orders = Table(title="fulfilment (process manager): bus process show fulfilment <order>")
    for column in ("order", "shows", "shipped", "cancelled", "refunded"):
        orders.add_column(column)
    for order_id, what in fulfilment["orders"].items():
        orders.add_row(order_id, what["meant"], "yes" if what["shipped"] else "no", what["cancelled"] or "no",
                       "yes" if what["refunded"] else "no")
    out = make_console()
    out.print(table)
    out.print(orders)
    out.print(f"of these: {fulfilment['shipments']} shipment(s), {fulfilment['cancellations']} cancellation(s), "
              f"{fulfilment['refunds']} refund(s) recorded")
    out.print(f"the first order's conversation, with billing's retries: bus trace {summary['first_order']}")
