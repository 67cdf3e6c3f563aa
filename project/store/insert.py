"""INSERT .. ON CONFLICT DO NOTHING for the two dialects the bus runs on."""
from __future__ import annotations

from functools import cache

from sqlalchemy import Insert, Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session


def insert_ignore(session: Session, table: Table):
    """An insert into `table` that does nothing on a key conflict (one round trip)."""
    return dialect_module(session.bind.dialect.name).insert(table).on_conflict_do_nothing()


@cache
def claim_statement(dialect_name: str, table: Table, returning: str) -> Insert:
    """INSERT .. ON CONFLICT DO NOTHING RETURNING `returning`, built once per dialect and table.

    Executed with the row as parameters (named after the columns): a claim per message
    costs no statement building, and SQLAlchemy finds the compiled SQL in its cache.
    """
    return dialect_module(dialect_name).insert(table).on_conflict_do_nothing().returning(table.c[returning])


def dialect_module(name: str):
    """SQLAlchemy's dialect module of `name` (its `insert` has ON CONFLICT)."""
    return postgresql if name == "postgresql" else sqlite
