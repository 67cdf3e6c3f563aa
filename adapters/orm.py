"""Tables of the reference domain, on their own metadata: the shop's migrations (migrations/ in the
repository) create them, after the bus's (project/store/migrations) created the bus_* tables."""
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

