"""One process-manager instance as the command line shows it: `bus process show` and `bus trace <instance id>`."""
from __future__ import annotations

from typing import Any

from rich.table import Table

from project.cli.common import ago, console


def instance_json(engine: Any, declared: Any, instance: Any) -> dict[str, Any]:
    """One instance as `bus process show --json` and `bus trace <instance id> --json` print it."""
    from project.observe.processes import history, timers
    return {**row(instance), "state": instance.state.model_dump(mode="json"), "timers": timers(engine, instance),
            "history": [vars(step) for step in history(engine, declared, instance)]}


def print_instance(engine: Any, declared: Any, instance: Any) -> None:
    """One instance as `bus process show` and `bus trace <instance id>` print it: status, timeouts, state, history."""
    from project.observe.processes import history, timers
    from project.store.tables import utcnow
    pending, steps = timers(engine, instance), history(engine, declared, instance)
    now = utcnow()
    console.print(f"{instance.manager} {instance.instance_id}: {instance.status}, version {instance.version}, started "
                  f"{instance.started_at:%Y-%m-%d %H:%M:%S}, updated {instance.updated_at:%Y-%m-%d %H:%M:%S}"
                  + (f", completed {instance.completed_at:%Y-%m-%d %H:%M:%S}" if instance.completed_at else ""),
                  highlight=False)
    for name, timer in sorted(pending.items()):
        when = timer["due_at"]
        console.print(f"pending timeout {name}: timer {timer['timer_id']}, "
                      + ("not in the outbox (purged?)" if when is None else
                         f"due {when:%Y-%m-%d %H:%M:%S} ({'in ' + ago(when - now) if when > now else 'due now'}"
                         f"{', published: its delivery is on the way' if timer['published'] else ''})"),
                      highlight=False)
    console.print(f"state: {instance.state.model_dump_json()}", highlight=False)
    table = Table(title=f"history: {len(steps)} step(s) in the execution log")
    for column in ("started", "message", "task", "state", "attempts", "trace"):
        table.add_column(column, overflow="fold")
    for step in steps:
        table.add_row(f"{step.started_at:%Y-%m-%d %H:%M:%S}", step.message, step.task, step.state,
                      str(step.attempts), f"bus trace {step.correlation_id}" if step.correlation_id else "-")
    console.print(table)


def row(instance: Any) -> dict[str, Any]:
    """An instance's fields as `bus process list --json` prints them."""
    return {"manager": instance.manager, "instance_id": instance.instance_id, "status": instance.status,
            "version": instance.version, "pending_timeouts": sorted(instance.timers),
            "started_at": instance.started_at, "updated_at": instance.updated_at,
            "completed_at": instance.completed_at}
