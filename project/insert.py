"""INSERT .. ON CONFLICT DO NOTHING for the two dialects the bus runs on."""
from __future__ import annotations

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session


def insert_ignore(session: Session, table: Table):
    """An insert into `table` that does nothing on a key conflict (one round trip)."""
    dialect = postgresql if session.bind.dialect.name == "postgresql" else sqlite
    return dialect.insert(table).on_conflict_do_nothing()
