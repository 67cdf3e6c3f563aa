"""Batched fetch and batched acks on Redis (issue 15): project/transport/redis_fetch.py, on real servers.

A BRPOP takes one item; one script takes up to BUS_FETCH_MAX - 1 more from the same list and
records them as unacked; a worker sends its acks once per event-loop tick. First with a
kombu consumer of the bus's transport (what the script records, foreign items, a delivery
that raises), then with real `celery worker` processes (a drained backlog, a SIGKILLed
worker, a warm stop with acks kept). The worker tests run `batchlab.note`
(tests/integration/support/batch_tasks.py), which leaves a marker file per handler run.
"""
from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections import Counter
from typing import Any, Iterator

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

from project.transport import redis_fetch, redis_transport
from project.transport.redis_transport import NOT_A_MESSAGE
from tests.integration.conftest import opened
from tests.integration.support.scenarios import Scenario

pytestmark = pytest.mark.integration

NOTE = "batchlab.note"
WORKER_ENV = {"BUS_TASK_MODULES": "tests.integration.support.batch_tasks", "BUS_RELAY_INTERVAL": "0",
              "BUS_PREFETCH": "8", "BUS_FETCH_MAX": "16"}  # 2 processes x 8: a fetch may take 16


def broker_redis(scenario: Scenario) -> redis.Redis:
    if scenario.broker == "embedded":
        return redis.Redis(unix_socket_path=str(scenario.settings.socket_path))
    return redis.Redis.from_url(scenario.broker_url)


def unacked(client: redis.Redis) -> tuple[int, int]:
    """Entries in kombu's unacked hash and index."""
    return client.hlen("unacked"), client.zcard("unacked_index")


def handler_runs(scenario: Scenario) -> Counter:
    """Runs of each job of `batchlab.note` (its marker files `<job>.<attempt>.<pid>.<batch>.<ns>`)."""
    return Counter(path.name.rsplit(".", 4)[0] for path in (scenario.home / "batchlab").glob("*.*"))


def duplicates(scenario: Scenario) -> int:
    """Deliveries of a `batchlab.note` command that its claim absorbed."""
    return scenario.rows("SELECT coalesce(sum(duplicates), 0) FROM bus_commands WHERE task = :t", t=NOTE)[0][0]


# ---- a kombu consumer of the bus's transport ------------------------------------------------------------
@pytest.fixture(scope="module")
def redis_scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    """A Redis database of its own (no worker)."""
    with opened("redis", "sqlite", tmp_path_factory, "fetch") as scenario:
        yield scenario


@pytest.fixture
def kombu(redis_scenario: Scenario) -> Iterator[tuple[redis.Redis, Connection, str]]:
    """A client of the claimed database, a kombu connection with the bus's transport, and a fresh queue name."""
    redis_transport.install()
    client = broker_redis(redis_scenario)
    with Connection(redis_scenario.broker_url) as connection:
        yield client, connection, f"fetch.{uuid.uuid4().hex[:8]}"
    client.close()


def publish(connection: Connection, queue: str, n: int) -> Queue:
    """`queue` declared, and n JSON messages {"n": i} sent to it."""
    declared = Queue(queue, Exchange(queue, type="direct"), routing_key=queue)
    declared(connection.default_channel).declare()
    producer = Producer(connection.default_channel, exchange=declared.exchange, routing_key=queue, serializer="json")
    for n_ in range(n):
        producer.publish({"n": n_})
    return declared


def consumer(connection: Connection, queue: Queue, prefetch: int, got: list, no_ack: bool = False,
             fail_at: int | None = None) -> Consumer:
    """A consumer on a channel of its own with `prefetch`, appending each message to `got` (raising at `fail_at`)."""
    channel = connection.channel()
    channel.basic_qos(0, prefetch, False)

    def received(body: Any, message: Any) -> None:
        got.append(message)
        if fail_at is not None and len(got) == fail_at:
            raise RuntimeError("the consumer's callback fails")
    return Consumer(channel, [queue], callbacks=[received], no_ack=no_ack, accept=["json", NOT_A_MESSAGE])


def test_one_fetch_takes_a_prefetch_window_and_records_each_message_as_kombu_does(kombu):
    client, connection, name = kombu
    # Given 30 messages waiting, and a consumer that may hold 10
    queue = publish(connection, name, 30)
    waiting = {json.loads(item)["properties"]["delivery_tag"]: json.loads(item) for item in client.lrange(name, 0, -1)}
    got: list = []
    with consumer(connection, queue, prefetch=10, got=got):
        # When it drains once
        connection.drain_events(timeout=5)
        # Then it got 10 messages, in the order sent (one BRPOP, then one script for 9)
        assert [m.payload["n"] for m in got] == list(range(10))
        assert client.llen(name) == 20
        # ... each recorded as unacked as kombu records it: [payload, exchange, routing key], indexed by time
        assert unacked(client) == (10, 10)
        for message in got:
            assert json.loads(client.hget("unacked", message.delivery_tag)) == [waiting[message.delivery_tag], name, name]
        # When they are acked (no event loop here: at once), Then no record is left
        for message in got:
            message.ack()
        assert unacked(client) == (0, 0)


def test_fetch_max_1_takes_one_message_per_brpop(kombu, redis_scenario: Scenario):
    client, _, name = kombu
    with Connection(redis_scenario.broker_url, transport_options={"fetch_max": 1}) as connection:
        queue = publish(connection, name, 5)
        got: list = []
        with consumer(connection, queue, prefetch=10, got=got):
            connection.drain_events(timeout=5)
            assert len(got) == 1 and client.llen(name) == 4


def test_a_no_ack_consumer_gets_a_batch_with_no_unacked_records(kombu):
    client, connection, name = kombu
    queue = publish(connection, name, 8)
    got: list = []
    with consumer(connection, queue, prefetch=0, got=got, no_ack=True):
        connection.drain_events(timeout=5)
    assert len(got) == 8 and unacked(client) == (0, 0)


def test_foreign_items_among_fetched_items_are_delivered_as_their_bytes_and_leave_no_record(kombu):
    client, connection, name = kombu
    # Given a queue holding messages and, between them, items nobody's kombu wrote: bytes that are
    # not JSON, and a kombu envelope with a hexadecimal number (Redis's JSON takes it, Python's not)
    queue = publish(connection, name, 1)
    client.lpush(name, b"\xff\xfe not json")
    envelope = json.loads(client.lindex(name, -1))
    envelope["properties"]["delivery_tag"] = "hex-tag"
    hexed = json.dumps(envelope)[:-1].encode() + b', "junk": 0x1F}'
    client.lpush(name, hexed)
    publish(connection, name, 1)
    got: list = []
    with consumer(connection, queue, prefetch=10, got=got):
        # When one fetch takes all four
        connection.drain_events(timeout=5)
        # Then the foreign ones arrive as NOT_A_MESSAGE with their bytes as body, between the others
        assert [m.content_type for m in got] == ["application/json", NOT_A_MESSAGE, NOT_A_MESSAGE, "application/json"]
        assert [base64.b64decode(m._raw["body"]) for m in got[1:3]] == [b"\xff\xfe not json", hexed]
        # ... the one the script recorded keeps the script's tag
        assert got[2].delivery_tag == "hex-tag"
        # ... and once acked (as the bus's consumer acks what it dead-letters), nothing stays unacked
        for message in got:
            message.ack()
        assert unacked(client) == (0, 0)


def test_a_delivery_that_raises_hands_the_rest_of_the_fetch_back_in_order(kombu):
    client, connection, name = kombu
    # Given 12 messages waiting, and a consumer whose callback raises on the 4th
    queue = publish(connection, name, 12)
    got: list = []
    with consumer(connection, queue, prefetch=10, got=got, fail_at=4):
        # When one fetch takes 10 and the 4th delivery raises
        with pytest.raises(RuntimeError):
            connection.drain_events(timeout=5)
        # Then the 4th to the 10th are back at the head of the queue, in order, with no record
        assert len(got) == 4
        assert [json.loads(base64.b64decode(json.loads(item)["body"]))["n"]
                for item in reversed(client.lrange(name, 0, -1))] == list(range(3, 12))
        assert sorted(client.hkeys("unacked")) == sorted(m.delivery_tag.encode() for m in got[:3])


# ---- real workers ----------------------------------------------------------------------------------------
@pytest.fixture
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    """A scenario on a Redis server of its own (the embedded broker, Redis 6.2): its counters are the test's."""
    with opened("embedded", "sqlite", tmp_path_factory, "fetch-embedded") as scenario:
        scenario.env.update(WORKER_ENV)
        scenario.client = scenario.driver()
        yield scenario


@pytest.fixture
def on_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    """A scenario on a Redis database of its own; redelivery after 11 s (a worker refuses less: the
    store's retry waits 10 s), swept every second."""
    with opened("redis", "sqlite", tmp_path_factory, "fetch-redis") as scenario:
        scenario.env.update(WORKER_ENV, BUS_VISIBILITY_TIMEOUT="11", BUS_UNACKED_RESTORE_INTERVAL="1")
        scenario.client = scenario.driver()
        yield scenario


def send_jobs(scenario: Scenario, n: int, **fields: Any) -> list[str]:
    jobs = [f"job{uuid.uuid4().hex[:8]}-{i}" for i in range(n)]
    for job in jobs:
        scenario.client.delay(NOTE, job_id=job, **fields)
    return jobs


def test_a_worker_drains_a_backlog_with_few_brpops_each_command_once_and_leaves_nothing_unacked(embedded):
    scenario = embedded
    client = broker_redis(scenario)
    # Given 200 commands waiting, and Redis's counters from zero
    jobs = send_jobs(scenario, 200)
    client.config_resetstat()
    # When a worker drains them and stops warm: 2 processes running batches of up to 8 (each
    # acked in one tick: room for a fetch of 8), 16 reserved per process
    worker = scenario.start_worker(concurrency=2, name="fetch-drain", env={"BUS_BATCH_MAX": "8"})
    scenario.wait_for("every command to run", lambda: sum(handler_runs(scenario)[job] for job in jobs) >= 200, 60)
    assert scenario.stop_worker(worker) == 0
    # Then every command ran once, and no delivery was a duplicate
    assert [handler_runs(scenario)[job] for job in jobs] == [1] * 200
    assert duplicates(scenario) == 0
    # ... nothing is left unacked (the acks kept at the stop were sent)
    assert unacked(client) == (0, 0)
    # ... and the worker fetched in batches: far fewer BRPOPs than messages, and the fetch script ran
    stats = client.info("commandstats")
    assert stats["cmdstat_brpop"]["calls"] <= 200 // 4, stats["cmdstat_brpop"]
    assert stats["cmdstat_evalsha"]["calls"] > 0
    assert client.script_exists(hashlib.sha1(redis_fetch.FETCH_MORE.encode()).hexdigest()) == [True]


def succeeded(scenario: Scenario) -> set[str]:
    """Jobs whose `batchlab.note` command succeeded (its claim stored the outcome)."""
    return {key.removeprefix("job_id=") for (key,) in scenario.rows(
        "SELECT key FROM bus_commands WHERE task = :t AND status = 'succeeded'", t=NOTE)}


def test_messages_the_script_fetched_survive_a_killed_worker_and_all_run(on_redis):
    scenario = on_redis
    client = broker_redis(scenario)
    # Given 6 commands waiting, each holding its pool process 1.5 s
    jobs = send_jobs(scenario, 6, hold=1.5)
    # When a worker takes them all at once (one BRPOP, one script: none is left in the queue) and
    # starts on two, and the whole worker is SIGKILLed
    first = scenario.start_worker(concurrency=2, name="fetch-killed")
    scenario.wait_for("two commands to start", lambda: sum(handler_runs(scenario).values()) >= 2)
    assert client.llen(NOTE) == 0
    first.kill()
    done, started = succeeded(scenario), set(handler_runs(scenario))
    assert len(done) < 6
    # Then a worker started after it runs every other one, once the visibility timeout is over:
    # the ones it held are restored from their unacked records
    scenario.start_worker(concurrency=2, name="fetch-after-kill")
    scenario.wait_for("every command to succeed", lambda: succeeded(scenario) == set(jobs), timeout=60)
    # ... those killed mid-handler (nothing committed) ran again, the others once
    assert [handler_runs(scenario)[job] for job in jobs] == [2 if job in started - done else 1 for job in jobs]
    scenario.wait_for("nothing left unacked", lambda: unacked(client) == (0, 0))


def test_acks_kept_when_a_worker_stops_warm_are_sent_so_nothing_can_come_back(on_redis):
    scenario = on_redis
    client = broker_redis(scenario)
    # Given a worker running two commands (1.5 s each), with nothing else reserved
    jobs = send_jobs(scenario, 2, hold=1.5)
    worker = scenario.start_worker(concurrency=2, name="fetch-warm")
    scenario.wait_for("both commands to start", lambda: all(handler_runs(scenario)[job] for job in jobs))
    # When it stops warm: both finish and are acked while it shuts down, their acks kept for a loop
    # tick that does not come (no restore of reserved messages sends them either: there are none)
    assert scenario.stop_worker(worker) == 0
    # Then both ran once and their acks reached Redis: no unacked record is left, so no worker can
    # restore either of them after the visibility timeout, and the queue is empty
    assert succeeded(scenario) == set(jobs) and [handler_runs(scenario)[job] for job in jobs] == [1, 1]
    assert unacked(client) == (0, 0) and client.llen(NOTE) == 0


@pytest.mark.parametrize("value", ["0", "x"])
def test_a_bad_fetch_max_stops_the_worker_naming_the_setting(redis_scenario: Scenario, value: str):
    # Given BUS_FETCH_MAX that is not a whole number >= 1
    worker = redis_scenario.start_worker(env={**WORKER_ENV, "BUS_FETCH_MAX": value}, wait=False)
    # When the worker starts, Then it exits, naming the setting and what to write instead
    assert worker.process.wait(60) != 0
    assert f"BUS_FETCH_MAX={value!r} is not valid; use a whole number >= 1" in worker.log()
