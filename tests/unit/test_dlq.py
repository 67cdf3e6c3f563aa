"""`bus dlq` against a real SQLite store, the dead-letter exchange settings, foreign Redis items.

Replay itself needs a broker: tests/integration/test_failures.py. Here: listing,
showing and purging, and every refusal of bad input (status 2, nothing changed).
"""
from __future__ import annotations

import base64
import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from typer.testing import CliRunner

from project.cli.main import cli
from project.dead_letters import admin as dlq
from project.dead_letters import dlx
from project.dead_letters import store as deadletters
from project.settings import load
from project.store.engine import engine_for
from project.store.migrate import upgrade
from project.store.tables import dead_letters, utcnow
from project.transport.redis_transport import NOT_A_MESSAGE, _parse

BINARY = bytes(range(256))


@pytest.fixture
def store(tmp_path: Path):
    """A migrated SQLite store with four dead letters; (engine, CLI environment)."""
    url = f"sqlite:///{tmp_path}/bus.db"
    upgrade(url)
    engine = engine_for(url)
    letters = [("m-1", "orders.place_order", "invalid", b'{"order_id": "o-1"}'),
               ("m-2", "orders.place_order", "unknown-task", BINARY),
               ("m-3", "billing.charge_payment", "retries-exhausted", b'{"_event_id": "e-1"}'),
               ("m-4", "billing.charge_payment", "too-large", b"x" * 10)]
    for message_id, queue, reason, body in letters:
        deadletters.record(engine, reason=reason, message_id=message_id, task=queue, queue=queue,
                           error=f"{reason} error", body=body, content_type="application/json",
                           content_encoding="utf-8", headers={"id": message_id})
    yield engine, {"BUS_DATABASE_URL": url, "BUS_HOME": str(tmp_path), "COLUMNS": "300"}
    engine.dispose()


def run(env: dict, *args: str):
    return CliRunner().invoke(cli, ["dlq", *args], env=env)


def listed(env: dict, *args: str) -> list[dict]:
    done = run(env, "list", "--json", *args)
    assert done.exit_code == 0, done.output
    return json.loads(done.output)


def message_ids(engine) -> set[str]:
    with engine.connect() as conn:
        return {r.message_id for r in conn.execute(select(dead_letters.c.message_id))}


# ---- list / show ----------------------------------------------------------------------------
def test_list_filters_by_queue_and_reason(store):
    # Given four dead letters in two queues
    _, env = store
    # When they are listed by queue, by reason, and by both
    # Then each filter keeps exactly the matching ones, oldest first
    assert [r["message_id"] for r in listed(env)] == ["m-1", "m-2", "m-3", "m-4"]
    assert [r["message_id"] for r in listed(env, "--queue", "billing.charge_payment")] == ["m-3", "m-4"]
    assert [r["message_id"] for r in listed(env, "--reason", "unknown-task")] == ["m-2"]
    assert listed(env, "--queue", "billing.charge_payment", "--reason", "invalid") == []


def test_list_pending_leaves_out_replayed_entries_until_they_fail_again(store):
    # Given m-1 was replayed
    engine, env = store
    with engine.begin() as conn:
        conn.execute(update(dead_letters).where(dead_letters.c.message_id == "m-1")
                     .values(replays=1, replayed_at=utcnow()))
    # Then --pending leaves it out, and the full list shows it as replayed once
    assert "m-1" not in [r["message_id"] for r in listed(env, "--pending")]
    [row] = [r for r in listed(env) if r["message_id"] == "m-1"]
    assert row["replays"] == 1 and row["replayed_at"] is not None
    # When the replayed message fails again (the same message, task and reason)
    deadletters.record(engine, reason="invalid", message_id="m-1", task="orders.place_order",
                       queue="orders.place_order", error="still invalid")
    # Then it is pending again, on the same row, with one more attempt
    [again] = [r for r in listed(env, "--pending") if r["message_id"] == "m-1"]
    assert (again["id"], again["attempts"], again["replays"], again["error"]) == (row["id"], 2, 1, "still invalid")


def test_show_gives_the_body_byte_for_byte(store):
    # Given a dead letter whose body is not text
    engine, env = store
    [row] = dlq.find(engine, dlq.Selection(reason="unknown-task"))
    # When it is shown as JSON
    done = run(env, "show", str(row.id), "--json")
    # Then the body comes back exactly, as base64, with headers and error
    assert done.exit_code == 0, done.output
    view = json.loads(done.output)
    assert base64.b64decode(view["body_base64"]) == BINARY
    assert (view["body_size"], view["body_text"], view["headers"]) == (256, None, {"id": "m-2"})
    assert view["error"] == "unknown-task error"
    # and as text, it says the body is binary
    shown = run(env, "show", str(row.id))
    assert shown.exit_code == 0 and "(binary, base64)" in shown.output


# ---- bad input: status 2, a message that says what to do, nothing changed ------------------------
@pytest.mark.parametrize("args, says", [
    (["show", "999"], "no dead letter with id 999"),
    (["list", "--reason", "exploded"], "unknown reason 'exploded'; the reasons are: invalid, conflict"),
    (["replay"], "give the ids to replay"),
    (["replay", "1", "--queue", "orders.place_order"], "ids or --queue, not both"),
    (["replay", "1", "--all"], "--reason and --all go with --queue"),
    (["replay", "998", "1", "999"], "no dead letter with id 998, 999"),
    (["replay", "--queue", "orders.place_order", "--reason", "exploded"], "unknown reason 'exploded'"),
    (["purge"], "say what to purge"),
    (["purge", "--all", "--queue", "orders.place_order"], "--all purges every dead letter"),
    (["purge", "--older-than", "soon"], "--older-than 'soon'"),
    (["purge", "--reason", "exploded"], "unknown reason 'exploded'"),
], ids=["show-unknown-id", "list-unknown-reason", "replay-nothing", "replay-ids-and-queue", "replay-ids-and-all",
        "replay-unknown-ids", "replay-unknown-reason", "purge-nothing", "purge-all-and-filter",
        "purge-bad-age", "purge-unknown-reason"])
def test_bad_input_is_refused_with_a_reason_and_changes_nothing(store, args, says):
    # Given four dead letters, none replayed
    engine, env = store
    # When the command is given bad input
    done = run(env, *args)
    # Then it exits with status 2 and says what is wrong
    assert done.exit_code == 2, done.output
    assert says in " ".join(done.output.split()), done.output
    # and nothing was purged or marked replayed
    assert message_ids(engine) == {"m-1", "m-2", "m-3", "m-4"}
    assert [r["replays"] for r in listed(env)] == [0, 0, 0, 0]


# ---- purge ------------------------------------------------------------------------------------
def test_purge_deletes_only_what_the_filters_match(store):
    engine, env = store
    # When purging one reason of one queue
    done = run(env, "purge", "--queue", "billing.charge_payment", "--reason", "too-large")
    # Then exactly that entry is gone
    assert done.exit_code == 0 and "purged 1 dead letter(s)" in done.output
    assert message_ids(engine) == {"m-1", "m-2", "m-3"}
    # When purging what is older than a day (nothing: they failed just now)
    assert "purged 0" in run(env, "purge", "--older-than", "1d").output
    # ... and what was replayed (nothing yet), then m-2 after it is marked replayed
    assert "purged 0" in run(env, "purge", "--replayed").output
    with engine.begin() as conn:
        conn.execute(update(dead_letters).where(dead_letters.c.message_id == "m-2").values(replayed_at=utcnow()))
    assert "purged 1" in run(env, "purge", "--replayed").output
    assert message_ids(engine) == {"m-1", "m-3"}
    # When entries are backdated two days, --older-than 1d takes them; --all takes the rest
    with engine.begin() as conn:
        conn.execute(update(dead_letters).where(dead_letters.c.message_id == "m-1")
                     .values(last_failed_at=utcnow() - timedelta(days=2)))
    assert "purged 1" in run(env, "purge", "--older-than", "1d").output
    assert "purged 1" in run(env, "purge", "--all").output
    assert message_ids(engine) == set()


# ---- RabbitMQ dead-lettering settings ---------------------------------------------------------
def test_dead_letter_mode_is_off_unless_chosen_and_refuses_unknown_values():
    assert dlx.mode(load({})) == "off"
    assert dlx.mode(load({"BUS_RABBITMQ_DEAD_LETTERS": "arguments"})) == "arguments"
    with pytest.raises(Exception, match="use one of off, arguments, policy"):
        load({"BUS_RABBITMQ_DEAD_LETTERS": "yes"})


def test_queues_carry_the_dead_letter_exchange_only_in_arguments_mode(monkeypatch):
    from project import settings
    from project.messaging.topology import named_command_queue
    monkeypatch.setattr(settings, "_current", settings.load({}))
    assert named_command_queue("orders.place_order").queue_arguments is None
    monkeypatch.setattr(settings, "_current", settings.load({"BUS_RABBITMQ_DEAD_LETTERS": "arguments"}))
    assert named_command_queue("orders.place_order").queue_arguments == {"x-dead-letter-exchange": "bus.dead_letter"}
    monkeypatch.setattr(settings, "_current", settings.load({"BUS_RABBITMQ_DEAD_LETTERS": "policy"}))
    assert named_command_queue("orders.place_order").queue_arguments is None


# ---- foreign items in a Redis list --------------------------------------------------------------
@pytest.mark.parametrize("item", [b"garbage", b"\xff\xfe not utf-8", b'{"hello": "world"}', b'"just a string"'])
def test_a_redis_list_item_that_is_not_a_kombu_message_is_delivered_as_its_bytes(item):
    # When the transport parses an item nobody's kombu wrote
    message = _parse(item, "orders.place_order")
    # Then it is a message of the NOT_A_MESSAGE type whose body is the item, byte for byte
    assert message["content-type"] == NOT_A_MESSAGE
    assert base64.b64decode(message["body"]) == item
    assert message["properties"]["delivery_info"]["queue"] == "orders.place_order"
    assert message["properties"]["delivery_tag"]


def test_a_kombu_message_in_a_redis_list_is_left_as_it_is():
    payload = {"body": "e30=", "headers": {"id": "x"}, "properties": {"delivery_tag": "t", "delivery_info": {}}}
    assert _parse(json.dumps(payload).encode(), "q") == payload


# ---- the store down when a message must be dead-lettered ----------------------------------------
def test_a_message_whose_dead_letter_cannot_be_stored_is_retried_not_dropped(bus_harness, monkeypatch):
    from sqlalchemy.exc import OperationalError

    from handlers.messages import PlaceOrder
    from project.messaging.execution import STORE_RETRY_DELAY

    # Given a payment gateway that always fails (billing gives up after its 8 retries),
    # and a dead-letter store that is down for its first 2 writes
    bus_harness.fail("gateway", times=1000)
    down = {"writes": 2}
    record = deadletters.record

    def flaky_record(*args, **kwargs):
        if down["writes"]:
            down["writes"] -= 1
            raise OperationalError("INSERT INTO bus_dead_letters", {}, Exception("connection refused"))
        return record(*args, **kwargs)
    monkeypatch.setattr(deadletters, "record", flaky_record)

    # When an order is placed and billing exhausts its policy
    bus_harness.send(PlaceOrder(order_id="o-1", customer_id="c-1",
                                items=[{"sku": "book", "quantity": 1, "unit_price": "1.00"}]))
    bus_harness.run_until_idle()

    # Then the copy is not acked without its record: it runs again, STORE_RETRY_DELAY apart,
    # until the store takes the dead letter (8 policy retries + 2 while the store was down)
    runs = [r for r in bus_harness.runs if r.name == "billing.charge_payment"]
    assert [r.outcome for r in runs] == ["retried"] * 10 + ["dead-lettered"]
    assert runs[-1].at - runs[-2].at == pytest.approx(STORE_RETRY_DELAY)
    [letter] = bus_harness.dead_letters("billing.charge_payment")
    assert letter.reason == "retries-exhausted"
