"""The post-commit outbox claim under PostgreSQL's generic plan: it touches the rows it claims, not every owed row.

psycopg prepares a statement it has run 5 times, and PostgreSQL may then plan it once for
any parameters (a generic plan). The claim of a committed execution's rows once ran, under
that plan, a scan of every owed outbox row with the subquery rerun for each: with a
30-minute payment timer pending per order, 0.5 s a claim at 620 timers. The claim is planned
here as a prepared statement with `plan_cache_mode = force_generic_plan`, beside a few
hundred pending timers, and the rows its plan reads from bus_outbox are counted (a count,
not a timing: it does not depend on the machine's load). Without fresh statistics the
planner still walks the owed rows once (the partial due_at index) rather than the primary
key: linear in the pending timers, no longer quadratic; once autovacuum has analyzed the
table, the plan reads the claimed rows only.
"""
from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import psycopg
import pytest
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Engine

from project.messaging.outbox import CLAIM_TTL, post_commit_claim
from project.store.engine import engine_for
from project.store.tables import outbox, utcnow
from tests.databases import migrated_database

pytestmark = pytest.mark.integration
PENDING_TIMERS = 400


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    with migrated_database("postgresql", tmp_path, prefix="bus_plan") as url:
        yield engine_for(url)


def rows_read(plan: dict[str, Any], table: str) -> int:
    """Rows the plan's nodes on `table` produced or filtered out, over all their loops."""
    own = 0
    if plan.get("Relation Name") == table:
        own = (plan.get("Actual Rows", 0) + plan.get("Rows Removed by Filter", 0)) * plan.get("Actual Loops", 1)
    return own + sum(rows_read(child, table) for child in plan.get("Plans", []))


def generic_plan(engine: Engine, statement: Any) -> dict[str, Any]:
    """EXPLAIN ANALYZE of `statement` run as a prepared statement under a generic plan (rolled back)."""
    compiled = statement.compile(dialect=postgresql.psycopg.dialect(paramstyle="numeric_dollar"),
                                 compile_kwargs={"render_postcompile": True})
    values = [compiled.params[name] for name in compiled.positiontup]
    with engine.connect() as conn:
        cursor = psycopg.ClientCursor(conn.connection.driver_connection)  # the EXECUTE's values as literals
        cursor.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        cursor.execute(f"PREPARE claim AS {compiled.string}")
        placeholders = ", ".join(["%s"] * len(values))
        cursor.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE claim({placeholders})", values)
        [[explained]] = cursor.fetchall()
        cursor.execute("DEALLOCATE claim")
        conn.rollback()
    explained = json.loads(explained) if isinstance(explained, str) else explained
    return explained[0]["Plan"]


def test_the_post_commit_claim_reads_its_own_rows_not_the_pending_timers(engine: Engine):
    # Given a few hundred timers pending in the outbox (due in 30 minutes), and one row an execution just committed,
    # with no statistics gathered since (as when the timers piled up faster than autovacuum analyzes the table)
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(outbox.insert(), [
            {"id": f"timer-{n}", "kind": "command", "name": "fulfilment.payment_timeout", "payload": {"n": n},
             "created_at": now, "due_at": now + timedelta(minutes=30)} for n in range(PENDING_TIMERS)])
        conn.execute(outbox.insert().values(id="just-committed", kind="event", name="events.order_placed",
                                            payload={"order_id": "o-1"}, created_at=now))

    # When the claim of that row is planned once for any parameters (a generic plan) and run
    plan = generic_plan(engine, post_commit_claim(["just-committed"], now, now + CLAIM_TTL, timedelta(seconds=30)))

    # Then it was a generic plan (its parameters unresolved), it claimed the one row,
    assert re.search(r"\$\d", json.dumps(plan))
    assert plan["Actual Rows"] == 1
    # ... and it read each outbox row at most twice (the claim's UPDATE and its SKIP LOCKED subquery), where the
    # subquery rerun per owed row read PENDING_TIMERS ** 2 (161,203 here before the fix)
    assert rows_read(plan, "bus_outbox") <= 2 * (PENDING_TIMERS + 1) + 2, json.dumps(plan, indent=1)
