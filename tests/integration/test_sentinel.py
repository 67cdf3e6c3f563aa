"""Redis Sentinel as the broker (issue 17, defect 10a): real redis-server and sentinel, real workers.

The test starts its own Redis master and a `redis-server --sentinel` monitoring it, on
free ports, and stops both by PID at the end (also when a test fails). The bus is
configured as a user would: `CELERY_BROKER_URL=sentinel://...;sentinel://...` (the
first sentinel of the list is down: a client must go on to the next) and
`BUS_SENTINEL_MASTER`. What it shows:
- a command round trip: sent through the sentinels, run by a worker, its result read
  back from the Sentinel result backend;
- durable fan-out: an event published while a subscriber's worker is down waits in
  that subscriber's queue on the master, and is handled once when the worker starts;
- failover (a replica of its own): the master is killed, the sentinel promotes the
  replica, and commands and durable fan-out carry on there, with the copies that were
  replicated before the failover.
"""
from __future__ import annotations

import shutil
import subprocess
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import redis
from redis.sentinel import Sentinel

from tests.integration.support.bus_services import missing
from tests.integration.support.helpers import ITEMS_TOTAL, PLACE_ORDER, free_port, order
from tests.integration.support.scenarios import Scenario, open_scenario
from tests.integration.test_events import (
    CHARGE,
    CONFIRM,
    EVERY_BOUNDARY_BUT_BILLING,
    FULFIL,
    ORDER_PLACED,
    SETTLE,
    STOP_GRACE,
    calls,
    deliveries,
    one_event,
    order_mail,
    received,
)

pytestmark = pytest.mark.integration

MASTER_NAME = "mymaster"
SENTINEL_CONF = """\
port {port}
bind 127.0.0.1
daemonize no
dir {dir}
logfile {dir}/sentinel.log
sentinel monitor {master_name} 127.0.0.1 {master_port} 1
sentinel down-after-milliseconds {master_name} 1000
sentinel failover-timeout {master_name} 10000
"""


class Servers:
    """A Redis master, optionally a replica, and a sentinel, started by the test; `stop()` ends them by PID."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.master_port, self.replica_port, self.sentinel_port = free_port(), free_port(), free_port()
        self.processes: list[subprocess.Popen] = []
        self.master_process: subprocess.Popen | None = None

    def start(self, replica: bool = False) -> None:
        self.master_process = self._redis("master", self.master_port)
        if replica:
            self._redis("replica", self.replica_port, "--replicaof", "127.0.0.1", str(self.master_port))
        conf = self.home / "sentinel.conf"  # the sentinel rewrites it: a file of its own
        conf.write_text(SENTINEL_CONF.format(port=self.sentinel_port, dir=self.home, master_name=MASTER_NAME,
                                             master_port=self.master_port))
        self._spawn("redis-server", str(conf), "--sentinel")
        self.wait("the sentinel to monitor the master", lambda: self.master_address() == self.master_port)
        if replica:
            # Sentinel finds replicas in the master's INFO, which it reads every 10 s
            self.wait("the sentinel to know the replica", lambda: any(
                r["port"] == self.replica_port and r["master-link-status"] == "ok" and not r["is_disconnected"]
                for r in self.sentinel().sentinel_slaves(MASTER_NAME)))

    def sentinel(self) -> redis.Redis:
        return redis.Redis(port=self.sentinel_port)

    def master_address(self) -> int | None:
        """The port of the master the sentinel names now."""
        address = self.sentinel().sentinel_get_master_addr_by_name(MASTER_NAME)
        return int(address[1]) if address else None

    def discover_master(self) -> int:
        """The master's port as a client sees it (redis-py also checks the sentinel's view of its state)."""
        return Sentinel([("127.0.0.1", self.sentinel_port)]).discover_master(MASTER_NAME)[1]

    def master(self) -> redis.Redis:
        """A plain client on the master the sentinel names now (to look into its lists)."""
        return redis.Redis(port=self.master_address())

    def broker_env(self) -> dict[str, str]:
        """The bus's settings for these servers; the first sentinel listed is one that is down."""
        down = free_port()
        return {"CELERY_BROKER_URL": f"sentinel://127.0.0.1:{down};sentinel://127.0.0.1:{self.sentinel_port}",
                "BUS_SENTINEL_MASTER": MASTER_NAME}

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
        self.processes.clear()

    def wait(self, what: str, probe: Callable[[], Any], timeout: float = 40.0) -> None:
        """Poll `probe` until it is truthy (a server not answering yet counts as no)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if probe():
                    return
            except redis.ConnectionError:
                pass
            for process in self.processes:
                if process is not self.master_process:  # the only one a test may kill
                    assert process.poll() is None, f"{process.args} exited with {process.returncode} ({self.home})"
            assert time.monotonic() < deadline, (f"timed out after {timeout}s waiting for {what} ({self.home})\n"
                                                 f"sentinel.log:\n{self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, lines: int = 30) -> str:
        log = self.home / "sentinel.log"
        return "\n".join(log.read_text().splitlines()[-lines:]) if log.exists() else "(none)"

    def kill_master(self) -> None:
        """SIGKILL the first master (as a crash or power loss would end it)."""
        self.master_process.kill()
        self.master_process.wait(timeout=10)

    def _redis(self, name: str, port: int, *args: str) -> subprocess.Popen:
        return self._spawn("redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                           "--appendonly", "no", "--dir", str(self.home), "--dbfilename", f"{name}.rdb",
                           "--logfile", str(self.home / f"{name}.log"), *args)

    def _spawn(self, *args: str) -> subprocess.Popen:
        process = subprocess.Popen(args, cwd=self.home, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        self.processes.append(process)
        return process


@contextmanager
def running_servers(home: Path, replica: bool = False) -> Iterator[Servers]:
    """Servers under `home`, stopped by PID on exit (also when starting them failed)."""
    if shutil.which("redis-server") is None:
        missing("redis-server is not on PATH: the Sentinel tests start their own master and sentinel with it")
    servers = Servers(home)
    try:
        servers.start(replica)
        yield servers
    finally:
        servers.stop()


@contextmanager
def bus_on(servers: Servers, home: Path) -> Iterator[Scenario]:
    """The bus on `servers` with SQLite, a worker for every boundary but billing, and a driver."""
    scenario = open_scenario("sentinel", "sqlite", home, broker_env=servers.broker_env())
    try:
        scenario.worker = scenario.start_worker(boundaries=[EVERY_BOUNDARY_BUT_BILLING], name="no-billing")
        scenario.client = scenario.driver()
        yield scenario
    finally:
        scenario.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """A Redis master and a sentinel monitoring it, of this module alone."""
    with running_servers(tmp_path_factory.mktemp("sentinel")) as servers:
        yield servers


@pytest.fixture(scope="module")
def scenario(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    with bus_on(servers, tmp_path_factory.mktemp("sentinel-sqlite")) as scenario:
        yield scenario


def test_a_command_round_trips_through_the_sentinels(scenario: Scenario, servers: Servers, uid: str):
    # Given a worker found its master through the sentinels
    # When an order is placed and its result awaited
    order_id = f"o-{uid}"
    result = scenario.client.get(scenario.client.delay(PLACE_ORDER, idempotency_key=f"checkout-{uid}",
                                                       **order(order_id, f"c-{uid}")))

    # Then the worker ran it, and the result came back through the Sentinel result backend
    assert result["total"] == ITEMS_TOTAL
    assert one_event(scenario, ORDER_PLACED, order_id=order_id).published_at is not None
    # ... and the messages and results are on the master the sentinels named
    assert servers.master().keys("celery-task-meta-*")


def test_event_published_while_subscriber_is_down_is_handled_when_it_starts(
        scenario: Scenario, servers: Servers, uid: str, request: pytest.FixtureRequest):
    # Given no billing worker runs (billing's queue may hold the copies of earlier tests' orders)
    waiting = servers.master().llen(CHARGE)
    # When an order is placed
    order_id, customer = f"o-{uid}", f"c-{uid}"
    scenario.client.get(scenario.client.delay(PLACE_ORDER, idempotency_key=f"checkout-{uid}",
                                              **order(order_id, customer)))
    event_id = one_event(scenario, ORDER_PLACED, order_id=order_id).id
    scenario.wait_for("the online subscriber to handle the event",
                      lambda: deliveries(scenario, event_id) == {CONFIRM: 0, FULFIL: 0}, timeout=60)
    time.sleep(SETTLE)

    # Then billing's copy waits in billing's queue on the master, and nothing was charged
    assert servers.master().llen(CHARGE) == waiting + 1
    assert calls(scenario, "gateway", customer) == []

    # When a billing worker starts
    billing = scenario.start_worker(boundaries=["billing"], name="billing")
    request.addfinalizer(lambda: billing.stop(grace=STOP_GRACE))

    # Then it charges the order exactly once and drains the queue
    scenario.wait_for("the charge", lambda: calls(scenario, "gateway", customer), timeout=60)
    scenario.wait_for("billing's queue to drain", lambda: servers.master().llen(CHARGE) == 0)
    time.sleep(SETTLE)
    assert [c.payload["amount"] for c in calls(scenario, "gateway", customer)] == [ITEMS_TOTAL]
    assert deliveries(scenario, event_id) == {CONFIRM: 0, FULFIL: 0, CHARGE: 0}
    assert received(billing, CHARGE) == waiting + 1
    assert len(calls(scenario, "mail", order_mail(customer))) == 1


def test_after_a_failover_commands_and_durable_fan_out_go_to_the_new_master(
        tmp_path_factory: pytest.TempPathFactory, uid: str):
    with ExitStack() as stack:
        # Given a master with a replica, a sentinel, and the bus without a billing worker
        servers = stack.enter_context(running_servers(tmp_path_factory.mktemp("failover"), replica=True))
        scenario = stack.enter_context(bus_on(servers, tmp_path_factory.mktemp("failover-sqlite")))
        # ... which placed an order before the failover (its billing copy waits, replicated)
        before, after = (f"o-{uid}-before", f"c-{uid}-before"), (f"o-{uid}-after", f"c-{uid}-after")
        scenario.client.get(scenario.client.delay(PLACE_ORDER, idempotency_key=f"checkout-{uid}-1", **order(*before)))
        scenario.wait_for("billing's copy on the master", lambda: servers.master().llen(CHARGE) == 1)
        # ... and the worker is idle: kombu 5.7 ends a worker that holds an unacked message when its
        # master dies (AttributeError in restore_unacked_once; the message returns after the
        # visibility timeout). Not what this test is about.
        scenario.wait_for("every delivery to be acked", lambda: servers.master().hlen("unacked") == 0)
        assert servers.master().wait(1, 5000) == 1  # the replica has it all too

        # When the master dies, and the sentinel fails over to the replica
        servers.kill_master()
        # (until then a client finds no master: `.delay()` raises OperationalError, a worker retries)
        # (a failover that aborts is tried again after 2 x failover-timeout: 20 s here)
        servers.wait("the sentinel to name the replica as a master in good state",
                     lambda: servers.discover_master() == servers.replica_port, timeout=75)

        # Then a command sent now round-trips through the new master
        result = scenario.client.get(scenario.client.delay(PLACE_ORDER, idempotency_key=f"checkout-{uid}-2",
                                                           **order(*after)), timeout=60)
        assert result["total"] == ITEMS_TOTAL
        # ... and its event's billing copy waits there beside the replicated one
        scenario.wait_for("billing's second copy on the new master",
                          lambda: servers.master().llen(CHARGE) == 2, timeout=60)

        # When a billing worker starts (not pinged: the test's own control connection died with the master)
        scenario.start_worker(boundaries=["billing"], name="billing", wait=False)  # stopped by scenario.close()

        # Then it charges each order exactly once
        for order_id, customer in (before, after):
            scenario.wait_for(f"the charge of {order_id}", lambda: calls(scenario, "gateway", customer), timeout=60)
        time.sleep(SETTLE)
        assert [len(calls(scenario, "gateway", customer)) for _, customer in (before, after)] == [1, 1]
        assert servers.master().llen(CHARGE) == 0
