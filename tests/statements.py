"""Which statements an engine sends: `statements(engine)` records them as `VERB table` labels.

Shared by tests/unit/test_statements.py (SQLite) and tests/integration/test_round_trips.py
(PostgreSQL), which pin how many statements (round trips) one delivery costs.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

from sqlalchemy import event


def label(sql: str) -> str:
    """`INSERT bus_commands`, `SELECT users`, `UPDATE bus_commands + INSERT bus_executions` (a WITH), `BEGIN ...`, `SAVEPOINT`."""
    sql = " ".join(sql.split())
    if sql.startswith(("BEGIN", "SAVEPOINT", "ROLLBACK TO", "RELEASE")):
        return sql.split(" sa_savepoint")[0]
    if sql.startswith("SELECT"):
        return "SELECT " + re.search(r" FROM (\w+)", sql).group(1)
    writes = re.findall(r"\b(INSERT INTO|(?<!DO )UPDATE|DELETE FROM) (\w+)", sql)
    return " + ".join(f"{verb.split()[0]} {table}" for verb, table in writes)


@contextmanager
def statements(engine) -> Iterator[list[str]]:
    """The labels of the statements `engine` executes inside the block, and `COMMIT` for each commit."""
    seen: list[str] = []

    def executed(_conn, _cursor, sql: str, *_args) -> None:
        seen.append(label(sql))

    def committed(_conn) -> None:
        seen.append("COMMIT")

    event.listen(engine, "before_cursor_execute", executed)
    event.listen(engine, "commit", committed)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", executed)
        event.remove(engine, "commit", committed)


def until_commit(seen: list[str]) -> list[str]:
    """The statements of the first transaction."""
    return seen[:seen.index("COMMIT") + 1]
