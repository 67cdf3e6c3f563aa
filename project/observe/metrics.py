"""Prometheus metrics of the bus, served by a worker started with `--metrics-port PORT`.

Why prometheus-client's multiprocess mode (and not a Celery-events exporter): the
prefork pool runs handlers in child processes, and the facts worth counting are known
there, some of them only there (a duplicate absorbed by the claim, a dead letter written
by the execution). Each child writes its counters to memory-mapped files in
PROMETHEUS_MULTIPROC_DIR; the worker's main process sums them on every scrape. No
broker traffic is added, no event is lost when the event stream is busy, and a child
replaced by the pool keeps its counts. An events exporter would see only Celery's task
states, and every worker would receive every other worker's events.

The worker creates a fresh directory for this when PROMETHEUS_MULTIPROC_DIR is not set
(and deletes it at shutdown); if you set it, give each worker its own empty directory.
Without `--metrics-port` (and without PROMETHEUS_MULTIPROC_DIR) every function here is a
no-op and prometheus-client is never imported.

Per task (label `task`: the command or subscriber name, or `events.<event>` for published
events):
- bus_messages_sent_total: messages this worker published (events and commands of its
  handlers; not retries); bus_messages_received_total: deliveries it received;
- bus_tasks_succeeded_total / _failed_total / _retried_total: Celery's outcome of each
  attempt (a refused or dead-lettered command ends as failed);
- bus_dead_letters_total{task, reason}: messages put in the dead-letter store;
- bus_duplicates_absorbed_total: deliveries that found their work already done;
- bus_process_unmatched_total{manager, event}: events a process manager found no instance
  for, in a step that does not start one (ignored or dead-lettered: its `on_missing`);
- bus_handler_duration_seconds: one delivery's run in the pool (validate, claim, handler,
  commit, publish).
Per worker:
- bus_batch_size: deliveries a pool process ran in one transaction (batched execution,
  BUS_BATCH_MAX); batches of 1 under load mean the worker reads slower than it runs.
Read at scrape time by the main process:
- bus_outbox_backlog: outbox rows committed but not yet published;
- bus_outbox_relay_lag_seconds: age of the oldest of them (0 when there is none);
- bus_queue_depth{queue}: messages ready in each queue this worker consumes (every
  worker of a queue reports it: aggregate with max, not sum).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable

import click
from celery import Celery, bootsteps, signals

from project.settings import current

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

logger = logging.getLogger(__name__)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_lock = threading.Lock()
_metrics: SimpleNamespace | None = None
_engines: dict[int, Callable[[], "Engine"]] = {}
_started: dict[str, float] = {}  # task id -> perf_counter at prerun (one pool process runs one task)


def enabled() -> bool:
    # prometheus-client's own variable, which the worker also sets for its pool's children
    # (MetricsServer): process state read where it is set, not a setting of the bus
    return bool(os.environ.get(MULTIPROC_ENV))


def _get() -> SimpleNamespace | None:
    """The metric objects of this process, created on first use once metrics are enabled."""
    global _metrics
    if _metrics is not None or not enabled():
        return _metrics
    with _lock:
        if _metrics is None:
            from prometheus_client import Counter, Histogram, values
            if getattr(values.ValueClass, "__name__", "") != "MmapedValue":
                # prometheus-client was imported before the directory was set: switch it now
                values.ValueClass = values.MultiProcessValue()
            _metrics = SimpleNamespace(
                sent=Counter("bus_messages_sent", "Messages published by this worker (not retries).", ["task"]),
                received=Counter("bus_messages_received", "Deliveries received by this worker.", ["task"]),
                succeeded=Counter("bus_tasks_succeeded", "Attempts that succeeded.", ["task"]),
                failed=Counter("bus_tasks_failed", "Attempts that failed for good.", ["task"]),
                retried=Counter("bus_tasks_retried", "Attempts that failed and were retried.", ["task"]),
                dead=Counter("bus_dead_letters", "Messages put in the dead-letter store.", ["task", "reason"]),
                absorbed=Counter("bus_duplicates_absorbed", "Deliveries whose work was already done.", ["task"]),
                unmatched=Counter("bus_process_unmatched", "Events a process manager had no instance for.",
                                  ["manager", "event"]),
                duration=Histogram("bus_handler_duration_seconds",
                                   "Seconds one delivery ran in the pool (validate, claim, handler, commit).",
                                   ["task"]),
                batch=Histogram("bus_batch_size", "Deliveries a pool process ran in one transaction.",
                                buckets=(1, 2, 4, 8, 16, 32, 64)),
            )
    return _metrics


# ---- called by the bus -----------------------------------------------------------
def absorbed(task: str) -> None:
    """A duplicate delivery of `task` found its work done."""
    metrics = _get()
    if metrics is not None:
        metrics.absorbed.labels(task).inc()


def process_unmatched(manager: str, event: str) -> None:
    """Process manager `manager` found no instance for an `event` that does not start one."""
    metrics = _get()
    if metrics is not None:
        metrics.unmatched.labels(manager, event).inc()


def batch_ran(size: int) -> None:
    """A pool process ran a batch of `size` deliveries in one transaction."""
    metrics = _get()
    if metrics is not None:
        metrics.batch.observe(size)


def dead_lettered(task: str | None, reason: str) -> None:
    """A message of `task` went to the dead-letter store for `reason`."""
    metrics = _get()
    if metrics is not None:
        metrics.dead.labels(task or "", reason).inc()


# ---- Celery signals --------------------------------------------------------------
def _published(sender: str | None = None, headers: dict | None = None, **_: Any) -> None:
    metrics = _get()
    if metrics is not None and sender and not (headers or {}).get("retries"):
        metrics.sent.labels(sender).inc()


def _received(request: Any = None, **_: Any) -> None:
    metrics = _get()
    if metrics is not None and request is not None:
        metrics.received.labels(request.name).inc()


def _prerun(task_id: str | None = None, **_: Any) -> None:
    if task_id and enabled():
        _started[task_id] = time.perf_counter()


def _postrun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    began = _started.pop(task_id, None) if task_id else None
    metrics = _get()
    if metrics is not None and began is not None and task is not None:
        metrics.duration.labels(task.name).observe(time.perf_counter() - began)


def _counter(name: str):
    def count(sender: Any = None, **_: Any) -> None:
        metrics = _get()
        if metrics is not None and sender is not None:
            getattr(metrics, name).labels(getattr(sender, "name", str(sender))).inc()
    return count


# ---- the worker's side -----------------------------------------------------------
def install(app: Celery, engine: Callable[[], "Engine"]) -> None:
    """Add `--metrics-port` to `app`'s workers and count what its processes do; `engine()` is the bus database's."""
    _engines[id(app)] = engine
    app.user_options["worker"].add(click.Option(
        ("--metrics-port",), type=int, default=None,
        help="Serve Prometheus metrics on this port (address: BUS_METRICS_ADDRESS, default 0.0.0.0)."))
    app.steps["worker"].add(MetricsServer)
    signals.after_task_publish.connect(_published, weak=False)
    signals.task_received.connect(_received, weak=False)
    signals.task_prerun.connect(_prerun, weak=False)
    signals.task_postrun.connect(_postrun, weak=False)
    for name, signal in (("succeeded", signals.task_success), ("failed", signals.task_failure),
                         ("retried", signals.task_retry)):
        signal.connect(_counter(name), weak=False)


class MetricsServer(bootsteps.StartStopStep):
    """Serves /metrics from the worker's main process (started before the pool forks)."""

    label = "bus-metrics"

    def __init__(self, worker: Any, metrics_port: int | None = None, **options: Any) -> None:
        self.port, self.owned_dir, self.server = metrics_port, None, None
        if metrics_port and not enabled():
            # before the pool forks: every child inherits the directory
            self.owned_dir = tempfile.mkdtemp(prefix="bus-metrics-")
            os.environ[MULTIPROC_ENV] = self.owned_dir
        super().__init__(worker, **options)

    def include_if(self, worker: Any) -> bool:
        return bool(self.port)

    def start(self, worker: Any) -> None:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        registry.register(BusGauges(worker.app, _engines[id(worker.app)]))
        address = current().metrics_address  # BUS_METRICS_ADDRESS
        self.server, _thread = start_http_server(self.port, addr=address, registry=registry)
        logger.info("metrics on http://%s:%d/metrics", address, self.port)

    def stop(self, worker: Any) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def shutdown(self, worker: Any) -> None:
        self.stop(worker)
        if self.owned_dir:
            shutil.rmtree(self.owned_dir, ignore_errors=True)


class BusGauges:
    """Outbox backlog, relay lag and queue depths, read when Prometheus scrapes."""

    def __init__(self, app: Celery, engine: Callable[[], "Engine"]) -> None:
        self.app, self.engine = app, engine

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        try:
            backlog, lag = self.outbox()
        except Exception:  # a scrape must answer: the gauge is left out, the log says why
            logger.warning("metrics: cannot read the outbox", exc_info=True)
        else:
            yield GaugeMetricFamily("bus_outbox_backlog", "Outbox rows committed but not yet published.",
                                    value=backlog)
            yield GaugeMetricFamily("bus_outbox_relay_lag_seconds",
                                    "Age of the oldest unpublished outbox row (0: none).", value=lag)
        depth = GaugeMetricFamily("bus_queue_depth", "Messages ready in a queue this worker consumes.",
                                  labels=["queue"])
        for queue, count in self.queue_depths().items():
            depth.add_metric([queue], count)
        yield depth

    def outbox(self) -> tuple[int, float]:
        """(unpublished outbox rows, seconds the oldest has waited): what `bus check --outbox-age 0` reads."""
        from datetime import timedelta

        from project.store.backlog import waiting
        count, waited = waiting(self.engine(), timedelta(0))
        return count, waited.total_seconds()

    def queue_depths(self) -> dict[str, int]:
        names = sorted(self.app.amqp.queues.consume_from or {})
        depths: dict[str, int] = {}
        try:
            with self.app.connection_for_read() as conn:
                for name in names:
                    channel = conn.channel()
                    try:
                        if hasattr(channel, "_size"):
                            # kombu's virtual transports (Redis): an empty queue is a missing key, which
                            # a passive declare reports as "no queue"; _size sums the priority lists
                            depths[name] = int(channel._size(name))
                        else:
                            depths[name] = channel.queue_declare(queue=name, passive=True).message_count
                    except Exception:  # not declared yet (RabbitMQ closes the channel): no sample
                        logger.debug("metrics: no depth for queue %s", name, exc_info=True)
                    finally:
                        try:
                            channel.close()
                        except Exception:  # noqa: BLE001 - already closed by the broker
                            pass
        except Exception:
            logger.warning("metrics: cannot reach the broker for queue depths", exc_info=True)
        return depths
