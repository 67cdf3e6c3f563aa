"""Tables of the reference domain, on their own metadata: the shop's migrations (migrations/ in the
repository) create them, after the bus's (project/store/migrations) created the bus_* tables.

The effects of the fulfilment flow are rows too (a reservation, a shipment, a cancellation;
a refund is a `port_calls` row of port `refund`), so that tests, the demo and the fault
suite count them."""
from __future__ import annotations

from sqlalchemy import JSON, Column, DateTime, Integer, MetaData, String, Table

from project.store.tables import utcnow

metadata = MetaData()

orders = Table(
    "orders", metadata,
    Column("order_id", String(100), primary_key=True),
    Column("customer_id", String(100), nullable=False),
    Column("lines", JSON, nullable=False),
    Column("total", String(30), nullable=False),
    Column("placed_at", DateTime(timezone=True), nullable=False, default=utcnow),
)

users = Table(
    "users", metadata,
    Column("user_id", String(100), primary_key=True),
    Column("email", String(320), nullable=False, unique=True),
    Column("name", String(200), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, default=utcnow),
)

audit_log = Table(
    "audit_log", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("what", String(100), nullable=False),
    Column("subject", String(200), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False, default=utcnow),
)

#: what the recording fakes of the external ports were asked to do (mail, SMS, payments)
port_calls = Table(
    "port_calls", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("port", String(30), nullable=False, index=True),
    Column("target", String(320), nullable=False),
    Column("key", String(300)),
    Column("payload", JSON, nullable=False),
    Column("at", DateTime(timezone=True), nullable=False, default=utcnow),
)


#: stock on hand per SKU (a SKU without a row has none)
stock = Table(
    "stock", metadata,
    Column("sku", String(100), primary_key=True),
    Column("available", Integer, nullable=False),
)

#: the units set aside for an order, per SKU (one row per order: all its units, or no row)
stock_reservations = Table(
    "stock_reservations", metadata,
    Column("order_id", String(100), primary_key=True),
    Column("quantities", JSON, nullable=False),
    Column("at", DateTime(timezone=True), nullable=False, default=utcnow),
)

shipments = Table(
    "shipments", metadata,
    Column("order_id", String(100), primary_key=True),
    Column("at", DateTime(timezone=True), nullable=False, default=utcnow),
)

order_cancellations = Table(
    "order_cancellations", metadata,
    Column("order_id", String(100), primary_key=True),
    Column("reason", String(300), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False, default=utcnow),
)
