"""The shop's fulfilment flow in the in-process harness: the real shop, its adapters on SQLite, a fake clock.

PlaceOrder -> OrderPlaced -> billing charges (PaymentProcessed) and fulfilment sends
ReserveStock -> inventory (StockReserved / OutOfStock) -> fulfilment ships, cancels or
refunds (handlers/fulfilment.py; docs/process-managers.md has the orderings table). The
order of the two awaited events is steered by making one side's port fail a few times:
its retries wait on the fake clock while the other side goes ahead. Effects are counted
in the shop's tables.
"""
from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from sqlalchemy import func, select

from adapters.orm import (
    order_cancellations,
    port_calls,
    shipments,
    stock,
    stock_reservations,
)
from adapters.repositories import restock
from handlers.messages import (
    CancelOrder,
    OutOfStock,
    PaymentProcessed,
    PlaceOrder,
    RefundPayment,
    ReserveStock,
    ShipOrder,
    StockReserved,
)

ITEMS = [{"sku": "book", "quantity": 2, "unit_price": "12.50"}, {"sku": "pen", "quantity": 1, "unit_price": "1.99"}]
RARE = [{"sku": "rare-coin", "quantity": 1, "unit_price": "500.00"}]
PAYMENT, PLACED = "fulfilment.fulfilment.payment_processed", "fulfilment.fulfilment.order_placed"
RESERVED = "fulfilment.fulfilment.stock_reserved"


@pytest.fixture
def shop(bus_harness):
    """The harness with books and pens on the shelves (no rare coins)."""
    with bus_harness.bus.engine().begin() as conn:
        restock(conn, {"book": 100, "pen": 100})
    return bus_harness


def count(harness, table, **where) -> int:
    query = select(func.count()).select_from(table)
    for column, value in where.items():
        query = query.where(table.c[column] == value)
    with harness.bus.engine().connect() as conn:
        return conn.execute(query).scalar_one()


def effects(harness, order_id: str) -> dict[str, int]:
    """What the flow did to `order_id`, counted in the shop's tables."""
    return {"reserved": count(harness, stock_reservations, order_id=order_id),
            "shipped": count(harness, shipments, order_id=order_id),
            "cancelled": count(harness, order_cancellations, order_id=order_id),
            "charged": count(harness, port_calls, port="gateway"),
            "refunded": count(harness, port_calls, port="refund")}


def fail_every_charge(harness) -> None:
    """Make the gateway fail every attempt billing makes at the next charge: it dead-letters it."""
    harness.fail("gateway", times=harness.bus.app.tasks["billing.charge_payment"].binding.retry.max_retries + 1)


def place(harness, order_id: str, items=ITEMS) -> None:
    harness.send(PlaceOrder(order_id=order_id, customer_id="c-1", items=items))


def first_run(runs, *names: str) -> str:
    """Which of the subscribers `names` ran (to commit) first."""
    return next(r.name for r in runs if r.name in names and r.outcome == "ran")


# ---- the three outcomes the demo shows -----------------------------------------------------------
@pytest.mark.parametrize("slow, first", [("gateway", RESERVED), ("stock", PAYMENT)],
                         ids=["stock-first", "payment-first"])
def test_a_paid_reserved_order_ships_once_in_either_order(shop, slow, first):
    # Given an order whose payment (or stock reservation) is slowed by a failing port
    shop.fail(slow, times=3)
    # When it is placed and the bus runs until idle
    place(shop, "o-1")
    runs = shop.run_until_idle()
    # Then the awaited events came in the order steered, and the order shipped once; nothing cancelled
    assert first_run(runs, RESERVED, PAYMENT) == first
    assert shop.sent(ShipOrder) == [ShipOrder(order_id="o-1")]
    assert shop.sent(ReserveStock) == [ReserveStock(order_id="o-1", quantities={"book": 2, "pen": 1})]
    assert effects(shop, "o-1") == {"reserved": 1, "shipped": 1, "cancelled": 0, "charged": 1, "refunded": 0}
    instance = shop.process("fulfilment", "o-1")
    assert instance.status == "completed" and instance.timers == {}
    assert instance.state.shipped and instance.state.paid and instance.state.reserved
    assert count(shop, stock, sku="book", available=98) == 1


def test_no_payment_within_30_minutes_cancels_and_a_late_charge_is_refunded(shop):
    # Given an order whose charge keeps failing until billing gives up (no PaymentProcessed)
    fail_every_charge(shop)
    place(shop, "o-2")
    shop.run_until_idle()
    assert shop.outcomes("billing.charge_payment")[-1] == "dead-lettered"
    instance = shop.process("fulfilment", "o-2")
    assert instance.state.reserved and set(instance.timers) == {"payment"}
    # When 31 minutes pass
    shop.advance(timedelta(minutes=31))
    shop.run_until_idle()
    # Then the order is cancelled (not shipped), and the instance waits for a late charge
    assert shop.sent(CancelOrder) == [CancelOrder(order_id="o-2", reason="no payment within 0:30:00")]
    assert shop.sent(ShipOrder) == []
    instance = shop.process("fulfilment", "o-2")
    assert (instance.status, set(instance.timers)) == ("running", {"late_payment"})
    # ... and when the charge comes after all (its dead letter replayed), it is given back, once
    shop.deliver(PaymentProcessed(order_id="o-2", amount=Decimal("26.99"), charge_id="ch-late"))
    shop.run_until_idle()
    assert shop.sent(RefundPayment) == [RefundPayment(order_id="o-2", charge_id="ch-late", amount=Decimal("26.99"))]
    assert effects(shop, "o-2") == {"reserved": 1, "shipped": 0, "cancelled": 1, "charged": 0, "refunded": 1}
    assert shop.process("fulfilment", "o-2").status == "completed"


def test_a_cancelled_order_never_charged_completes_after_the_late_payment_window(shop):
    # Given an order cancelled for want of payment
    fail_every_charge(shop)
    place(shop, "o-3")
    shop.run_until_idle()
    shop.advance(timedelta(minutes=31))
    shop.run_until_idle()
    # When a day passes without a charge
    shop.advance(timedelta(days=1))
    shop.run_until_idle()
    # Then the instance completes with nothing to refund
    assert shop.process("fulfilment", "o-3").status == "completed"
    assert shop.sent(RefundPayment) == [] and len(shop.sent(CancelOrder)) == 1


def test_out_of_stock_after_payment_refunds_and_cancels(shop):
    # Given an order of a SKU nobody has, whose stock answer is slowed (the charge comes first)
    shop.fail("stock", times=3)
    # When it is placed
    place(shop, "o-4", RARE)
    runs = shop.run_until_idle()
    # Then the payment was applied first, and OutOfStock refunded it and cancelled the order
    assert first_run(runs, "fulfilment.fulfilment.out_of_stock", PAYMENT) == PAYMENT
    assert shop.published(OutOfStock) == [OutOfStock(order_id="o-4", skus=["rare-coin"])]
    [refund] = shop.sent(RefundPayment)
    assert (refund.order_id, refund.amount) == ("o-4", Decimal("500.00"))
    assert shop.sent(CancelOrder) == [CancelOrder(order_id="o-4", reason="out of stock: rare-coin")]
    assert effects(shop, "o-4") == {"reserved": 0, "shipped": 0, "cancelled": 1, "charged": 1, "refunded": 1}
    assert shop.process("fulfilment", "o-4").status == "completed"


def test_out_of_stock_before_payment_cancels_then_refunds_the_charge_when_it_comes(shop):
    # Given an order of a SKU nobody has, whose charge is slowed (the stock answer comes first)
    shop.fail("gateway", times=3)
    # When it is placed
    place(shop, "o-5", RARE)
    runs = shop.run_until_idle()
    # Then OutOfStock cancelled it first, and the charge that came later was refunded, once
    assert first_run(runs, "fulfilment.fulfilment.out_of_stock", PAYMENT) == "fulfilment.fulfilment.out_of_stock"
    assert len(shop.sent(CancelOrder)) == 1 and len(shop.sent(RefundPayment)) == 1
    assert effects(shop, "o-5") == {"reserved": 0, "shipped": 0, "cancelled": 1, "charged": 1, "refunded": 1}
    assert shop.process("fulfilment", "o-5").status == "completed"
    # ... and nothing of the shelves was taken
    assert count(shop, stock, sku="rare-coin") == 0


def test_a_mixed_order_short_of_one_line_takes_nothing_from_the_shelves(shop):
    # Given books on the shelves, and an order of books and a rare coin
    # When it is placed
    place(shop, "o-6", ITEMS + RARE)
    shop.run_until_idle()
    # Then it is out of stock, and the books it would have taken are still there
    assert shop.published(OutOfStock) == [OutOfStock(order_id="o-6", skus=["rare-coin"])]
    assert count(shop, stock, sku="book", available=100) == 1


# ---- duplicates and the payment arriving before the order ---------------------------------------
def test_duplicated_events_and_commands_ship_once(shop):
    # Given an order sent twice with one key, whose events are then each delivered again
    place(shop, "o-7")
    place(shop, "o-7")
    shop.run_until_idle()
    paid = shop.published(PaymentProcessed)[0]
    # When PaymentProcessed and StockReserved arrive again (new event ids: a second publish)
    shop.deliver(paid)
    shop.deliver(StockReserved(order_id="o-7"))
    shop.run_until_idle()
    # Then the copy of PlaceOrder was absorbed, the late copies did nothing, and the order shipped once
    assert shop.outcomes("orders.place_order") == ["ran", "duplicate"]
    assert shop.outcomes(PLACED) == ["ran"]
    assert shop.sent(ShipOrder) == [ShipOrder(order_id="o-7")]
    assert effects(shop, "o-7") == {"reserved": 1, "shipped": 1, "cancelled": 0, "charged": 1, "refunded": 0}


def test_a_redelivered_event_is_applied_once(shop):
    # Given a payment that starts an instance before its order is placed
    charge = PaymentProcessed(order_id="o-8", amount=Decimal("26.99"), charge_id="ch-8")
    event_id = shop.deliver(charge)
    # When the broker delivers it again (the same event id)
    shop.deliver(charge, event_id=event_id)
    shop.run_until_idle()
    # Then it was applied once, and the instance waits, paid, with no payment timeout
    assert shop.outcomes(PAYMENT) == ["ran", "duplicate"]
    instance = shop.process("fulfilment", "o-8")
    assert (instance.version, instance.state.paid, instance.timers) == (1, True, {})
    # ... and once the order is placed and reserved, it ships (billing's own charge of it then does nothing)
    place(shop, "o-8")
    shop.run_until_idle()
    assert shop.sent(ShipOrder) == [ShipOrder(order_id="o-8")]
    assert shop.outcomes(PAYMENT) == ["ran", "duplicate", "ran"]
    assert shop.process("fulfilment", "o-8").status == "completed"


def test_the_state_diagram_in_the_docs_is_the_generated_one(bus_harness):
    # Given docs/process-managers.md; Then its Mermaid block is `bus process diagram fulfilment` of today's code
    from project.observe.process_diagram import state_diagram
    from tests.conftest import REPO
    text = (REPO / "docs/process-managers.md").read_text()
    generated = state_diagram(bus_harness.bus.process_managers["fulfilment"])
    assert f"```mermaid\n{generated}```" in text, "docs/process-managers.md is stale: paste in " \
                                                  "`bus process diagram fulfilment`"
