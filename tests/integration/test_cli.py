"""The `bus` command line and the configuration, run as a user runs them (subprocesses)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert, select

from project.contracts import snake_case
from project.store.tables import commands, utcnow
from project.testing.isolation import alive
from tests.conftest import REPO
from tests.integration.conftest import opened

pytestmark = pytest.mark.integration
BUS = str(Path(sys.executable).with_name("bus"))

#: the command tasks Celery would run, read from Celery's task registry in a fresh process
LIST_COMMAND_TASKS = """
import json
from project import app
from project.messaging.commands import CommandTask
app.loader.import_default_modules()
print(json.dumps({name: {"command": task.binding.contract.__name__, "boundary": task.binding.contract.boundary,
                         "handler": task.binding.handler.__module__ + "." + task.binding.handler.__qualname__}
                  for name, task in app.tasks.items() if isinstance(task, CommandTask)}))
"""


def run(args: list[str], home: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """Run with no bus settings but BUS_HOME (the embedded default) plus `env`."""
    full = {**os.environ, "BUS_HOME": str(home), "COLUMNS": "300", **env}
    return subprocess.run(args, env=full, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_topology_json_lists_every_command_with_task_queue_boundary_and_handler(tmp_path):
    # Given the default configuration (every tasks module)
    # When `bus topology --json` runs
    done = run([BUS, "topology", "--json"], tmp_path)
    assert done.returncode == 0, done.stderr
    catalog = {c["task"]: c for c in json.loads(done.stdout)["commands"]}

    # Then it lists exactly the command tasks Celery knows, each under the naming rule
    # task == queue == <boundary>.<snake_command> (a process manager's timeouts:
    # <boundary>.<manager>.timeout), with the handler that serves it
    tasks = run([sys.executable, "-c", LIST_COMMAND_TASKS], tmp_path)
    assert tasks.returncode == 0, tasks.stderr
    celery_commands = json.loads(tasks.stdout)
    assert set(catalog) == set(celery_commands)
    for task, entry in catalog.items():
        timeout = entry["handler"].startswith("project.process.runtime.TimeoutStep.")
        manager = entry["handler"].rsplit(".", 1)[1]
        name = f"{manager}.timeout" if timeout else snake_case(entry["command"])
        assert entry["queue"] == task == f"{entry['boundary']}.{name}"
        assert {k: entry[k] for k in ("command", "boundary", "handler")} == celery_commands[task]
    # including the reference domain's two commands
    assert catalog["orders.place_order"]["handler"] == "handlers.orders.place_order"
    assert catalog["accounts.register_user"]["handler"] == "handlers.accounts.register_user"
    # and the fulfilment process manager's timeout command
    assert catalog["fulfilment.fulfilment.timeout"]["command"] == "FulfilmentTimeout"


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_purge_keys_forgets_keys_older_than_the_given_age(tmp_path_factory, database):
    with opened("embedded", database, tmp_path_factory, "purge") as scenario:
        # Given a key claimed two days ago and one claimed now
        row = {"task": "orders.place_order", "payload_hash": "0" * 64, "payload": {}, "status": "succeeded",
               "message_id": "m", "duplicates": 0}
        with scenario.engine().begin() as conn:
            conn.execute(insert(commands), [{**row, "key": "old", "created_at": utcnow() - timedelta(days=2)},
                                            {**row, "key": "new", "created_at": utcnow()}])

        def keys() -> set[str]:
            with scenario.engine().connect() as conn:
                return set(conn.execute(select(commands.c.key)).scalars())

        # When keys older than a day are purged
        day = scenario.bus("purge-keys", "--older-than", "1d")
        # Then only the old one is forgotten
        assert day.returncode == 0, day.stderr
        assert "forgot 1 idempotency key(s) older than 1d" in day.stdout
        assert keys() == {"new"}

        # When keys older than 0s are purged
        now = scenario.bus("purge-keys", "--older-than", "0s")
        # Then every key is forgotten
        assert now.returncode == 0, now.stderr
        assert "forgot 1 idempotency key(s) older than 0s" in now.stdout
        assert keys() == set()


@pytest.mark.parametrize("value", ["banana", "7", "-5d", "7w", "1.5h", ""])
def test_purge_keys_with_a_bad_duration_exits_non_zero_with_the_accepted_forms(tmp_path, value):
    # Given a duration the operator mistyped
    # When `bus purge-keys --older-than <it>` runs
    done = run([BUS, "purge-keys", "--older-than", value], tmp_path)
    # Then it exits 2 (usage error) saying what is accepted, and touches nothing
    assert done.returncode == 2
    assert f"Invalid value for --older-than: {value!r} is not a duration; write a whole number and a unit: " \
           "90s, 15m, 12h or 7d" in done.stderr
    assert not (tmp_path / "bus.db").exists()


@pytest.mark.parametrize("variable, value, message", [
    ("CELERY_BROKER_URL", "ftp://x", "CELERY_BROKER_URL='ftp://x' is not a broker the bus supports; use "
                                     "redis://host:6379/0 or amqp://user:pass@host:5672/vhost"),
    ("BUS_DATABASE_URL", "mysql://u@h/db", "BUS_DATABASE_URL='mysql://u@h/db' is not supported; use "
                                           "postgresql+psycopg://user@host:5432/db or sqlite:///path/to/bus.db"),
])
def test_bad_configuration_stops_cli_and_worker_with_the_accepted_forms(tmp_path, variable, value, message):
    # Given a malformed setting in the environment
    # When the CLI or a worker starts
    cli = run([BUS, "topology"], tmp_path, **{variable: value})
    worker = run([sys.executable, "-m", "celery", "-A", "project", "worker", "--without-mingle"], tmp_path,
                 timeout=60, **{variable: value})
    # Then both exit non-zero with the value and the accepted forms
    for done in (cli, worker):
        assert done.returncode != 0
        assert message in " ".join((done.stdout + done.stderr).split())


@pytest.mark.parametrize("variable", ["BUS_PREFETCH", "BUS_CONCURRENCY", "BUS_VISIBILITY_TIMEOUT", "BUS_KEY_RETENTION",
                                      "BUS_MAX_MESSAGE_BYTES"])
def test_bad_setting_stops_the_cli_naming_the_variable(tmp_path, variable):
    # Given a setting whose value has the wrong form
    # When the CLI starts
    done = run([BUS, "topology"], tmp_path, **{variable: "abc"})
    # Then it exits non-zero naming the variable and its value
    assert done.returncode != 0
    assert f"{variable}='abc'" in " ".join(done.stderr.split())


def test_demo_from_a_clean_home_reports_executions_duplicates_and_rejections(tmp_path):
    # Given a clean BUS_HOME and no servers configured (the embedded default)
    home = tmp_path / "home"
    # When `bus demo --json` runs
    done = run([BUS, "demo", "--json"], home, timeout=300)
    # Then it exits 0 with a machine-readable summary of what happened
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout)
    assert summary["broker"] == "embedded"
    assert summary["handler_executions"] > 0
    assert summary["duplicates_absorbed"] > 0
    assert summary["rejected_messages"] > 0
    assert summary["commands_sent"] >= summary["handler_executions"] + summary["duplicates_absorbed"]
    # and fulfilment shipped the happy order, cancelled the timed-out and the out-of-stock ones and refunded both
    outcomes = {what["meant"]: (what["shipped"], bool(what["cancelled"]), what["refunded"])
                for what in summary["fulfilment"]["orders"].values()}
    assert outcomes == {"happy": (True, False, False), "payment timed out": (False, True, True),
                        "out of stock": (False, True, True)}
    assert [summary["fulfilment"][n] for n in ("shipments", "cancellations", "refunds")] == [1, 2, 2]
    # and `bus trace` of its first order shows the command, its event, both subscribers (billing
    # after the two failures the demo injects) and billing's PaymentProcessed follow-up
    traced = run([BUS, "trace", summary["first_order"], "--json"], home)
    assert traced.returncode == 0, traced.stdout + traced.stderr
    root = json.loads(traced.stdout)["root"]
    assert (root["name"], root["state"]) == ("orders.place_order", "succeeded")
    [placed] = root["children"]
    runs = {s["name"]: s for s in placed["children"]}
    assert (placed["name"], set(runs)) == ("events.order_placed", {"billing.charge_payment",
                                                                  "notifications.send_order_confirmation",
                                                                  "fulfilment.fulfilment.order_placed"})
    assert (runs["billing.charge_payment"]["state"], runs["billing.charge_payment"]["attempts"]) == ("succeeded", 3)
    assert [e["name"] for e in runs["billing.charge_payment"]["children"]] == ["events.payment_processed"]
    # and leaves no embedded broker running behind it
    assert not (home / "redis.pid").exists() or not alive(int((home / "redis.pid").read_text()))
