"""Tables of the reference domain, on the bus's metadata (so one migration history holds all)."""
from __future__ import annotations

from sqlalchemy import JSON, Column, DateTime, String, Table

from project.db import metadata, utcnow

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
