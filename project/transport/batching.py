"""Batched execution (BUS_BATCH_MAX > 1): a pool process runs the deliveries that arrived, in one transaction.

Main process (`Batcher`, in place of the consumer's `on_task_request`): a bus task's request
waits in a list; a flush, scheduled with the hub's `call_soon`, hands the waiting requests
to the pool as one job per free process (at most BUS_BATCH_MAX each). When the worker is
idle, a request goes out alone on the next loop tick: no timer, no added latency. Under
load the processes are busy, and a batch is what arrived while the previous one ran. The
job's callbacks are fanned out to each request's own `on_accepted` / `on_success` /
`on_failure`: acks (after the batch's commit), retries, and a lost pool process's requeue
(every request of its batch) stay Celery's. A request with a time limit is not batched.

Pool process (`run_batch`): each delivery goes through Celery's own tracer, with its
execution in a savepoint of the batch's one transaction (project/store/batch.py); while
the batch runs, result-backend writes and task publishes (retries) are held back. After
the one COMMIT: the outbox hand-offs, the retry publishes, then every result in one Redis
pipeline (each PUBLISH wakes its own `.get()`). A delivery whose after-commit step failed
is handed back (requeued): its redelivery finds its claim and stores its result. If the
COMMIT fails, the batch runs again one delivery per transaction, exactly as without
batching.
"""
from __future__ import annotations

import logging
import math
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterator
from weakref import ref

from billiard.einfo import ExceptionInfo
from celery import current_app
from celery.app.trace import fast_trace_task, trace_task_ret
from celery.concurrency import prefork
from celery.exceptions import Reject
from celery.utils.functional import maybe

from project.errors import ConfigurationError
from project.messaging.runtime import BusTask, visibility_timeout
from project.observe import metrics
from project.store import batch as batches

logger = logging.getLogger(__name__)

#: (task name, task id, request dict, body, content type, content encoding): what Celery's tracer takes
Item = tuple[str, str, dict, Any, Any, Any]


# ---- main process ---------------------------------------------------------------------
class Batcher:
    """The consumer's `on_task_request` with batching: bus tasks wait for a free process, others go at once."""

    def __init__(self, consumer: Any, cap: int) -> None:
        check_pool(consumer, cap)
        check_result_backend(consumer.app, cap)
        check_visibility(consumer.app, cap)
        self.consumer, self.cap, self.handle = consumer, cap, consumer.on_task_request
        self.waiting: deque = deque()
        self.jobs: set[int] = set()  # the pool's job ids of our batches that have not called back
        self.scheduled = False
        logger.info("batched execution: up to %d deliveries per pool job, in one transaction (BUS_BATCH_MAX)", cap)

    def __call__(self, request: Any) -> None:
        if not isinstance(request.task, BusTask) or _limited(request):
            return self.handle(request)
        self.waiting.append(request)
        self._schedule()

    @property
    def running(self) -> int:
        """Batch jobs in the pool."""
        return len(self.jobs)

    def drop_waiting(self) -> None:
        """Forget the waiting requests: their channel closed (their acks would fail; the broker redelivers them)."""
        if self.waiting:
            logger.info("batch: dropping %d waiting request(s) of a closed channel", len(self.waiting))
        self.waiting.clear()

    def forget_discarded(self, cache: Any) -> None:
        """After the pool's flush of a closed channel: forget our jobs it discarded from its `cache` (a job no
        process had accepted is dropped without a callback; the broker redelivers its messages). Counted as
        running, they would keep the batcher from ever handing the pool another batch."""
        lost = {job for job in self.jobs if job not in cache}
        if lost:
            logger.info("batch: %d batch job(s) discarded by the pool's flush; their messages are redelivered",
                        len(lost))
            self.jobs -= lost
        self._schedule()

    def _schedule(self) -> None:
        if not self.scheduled and self.waiting and self.running < self._processes():
            self.scheduled = True
            self.consumer.hub.call_soon(self.flush)

    def _processes(self) -> int:
        return max(int(self.consumer.pool.num_processes or 1), 1)

    def flush(self) -> None:
        """One job per free process, the waiting requests split evenly among them (at most `cap` each)."""
        self.scheduled = False
        while self.waiting and self.running < self._processes():
            free = self._processes() - self.running
            size = min(self.cap, math.ceil(len(self.waiting) / free))
            requests = []
            while self.waiting and len(requests) < size:
                request = self.waiting.popleft()
                if request.revoked():
                    self.handle(request)  # Celery's own path: revoked, released, never run
                else:
                    requests.append(request)
            if requests:
                self._submit(requests)

    def _submit(self, requests: list[Any]) -> None:
        app = self.consumer.app
        trace = fast_trace_task if app.use_fast_trace_task else trace_task_ret
        items = [(r.type, r.id, r.request_dict, r.body, r.content_type, r.content_encoding) for r in requests]
        job: list[int] = []  # its id, once the pool has given it one
        result = self.consumer.pool.apply_async(
            run_batch, args=(trace, items),
            accept_callback=_fan(requests, "on_accepted"),
            callback=self._done(requests, "on_success", job),
            error_callback=self._done(requests, "on_failure", job),
            correlation_id=requests[0].id,
        )
        job.append(result._job)
        if not result.ready():  # (a job that already called back is done)
            self.jobs.add(result._job)
        for request in requests:
            request._apply_result = maybe(ref, result)

    def _done(self, requests: list[Any], method: str, job: list[int]) -> Callable[[Any], None]:
        """The job's callback: each request's own `method`, then the next flush."""
        def done(value: Any, **kwargs: Any) -> None:
            self.jobs.difference_update(job)
            try:
                if method == "on_success":
                    for request, outcome in zip(requests, value):
                        _call(request, method, outcome)
                else:  # the whole job failed (a lost or killed pool process): every request gets it
                    for request in requests:
                        _call(request, method, value, **kwargs)
            finally:
                self._schedule()
        return done


def _fan(requests: list[Any], method: str) -> Callable[..., None]:
    def fanned(*args: Any, **kwargs: Any) -> None:
        for request in requests:
            _call(request, method, *args, **kwargs)
    return fanned


def _call(request: Any, method: str, *args: Any, **kwargs: Any) -> None:
    try:
        getattr(request, method)(*args, **kwargs)
    except Exception:  # one request's bookkeeping must not cost the others theirs
        logger.exception("batch: %s of %s[%s] failed", method, request.name, request.id)


def _limited(request: Any) -> bool:
    """A request with a time limit runs alone: a batch's limit would time out (and fail) all of its requests."""
    return any(request.time_limits) or bool(request.task.time_limit or request.task.soft_time_limit)


def check_pool(consumer: Any, cap: int) -> None:
    """Batches are jobs of billiard's prefork pool, handed out from the worker's event loop."""
    pool = consumer.pool
    if consumer.hub is None or not isinstance(pool, prefork.TaskPool):
        raise ConfigurationError(f"BUS_BATCH_MAX={cap} needs the prefork pool's event loop; this worker runs "
                                 f"{type(pool).__module__}.{type(pool).__name__}: run -P prefork, or BUS_BATCH_MAX=0")


def check_result_backend(app: Any, cap: int) -> None:
    """Batches hold result writes back until their commit: only the Redis backend's are held back."""
    backend = app.backend
    if not (callable(getattr(backend, "_set", None)) and hasattr(backend, "client")):
        raise ConfigurationError(f"BUS_BATCH_MAX={cap} needs a Redis result backend (CELERY_RESULT_BACKEND=redis://...); "
                                 f"{type(backend).__name__} is not batched: set BUS_BATCH_MAX=0")


def check_visibility(app: Any, cap: int) -> None:
    """Refuse a cap under which a reserved message can wait out Redis's visibility timeout in its worker.

    A reserved message waits for the batches ahead of it (prefetch / cap of them per process)
    and its own: up to (prefetch + cap) x the task time limit. Without a time limit the
    wait has no bound the worker knows; the operator's BUS_VISIBILITY_TIMEOUT must cover it.
    """
    timeout = visibility_timeout(app)
    limit = app.conf.task_time_limit
    if timeout is None or not limit:
        return
    longest = (int(app.conf.worker_prefetch_multiplier) + cap) * float(limit)
    if longest >= timeout:
        raise ConfigurationError(
            f"BUS_BATCH_MAX={cap}: a reserved message can wait {longest:g} s in its worker (prefetch "
            f"{app.conf.worker_prefetch_multiplier} + cap {cap}, x task_time_limit {limit:g} s), but Redis hands it "
            f"back after {timeout:g} s: lower BUS_BATCH_MAX or raise BUS_VISIBILITY_TIMEOUT above {longest:g} s")


# ---- pool process ---------------------------------------------------------------------
def run_batch(trace: Callable[..., tuple], items: list[Item]) -> list[tuple]:
    """Run `items` through Celery's tracer in one transaction; each one's `(failed, value, runtime)`."""
    app = current_app._get_current_object()
    engine = app.tasks[items[0][0]].execution.engine()
    metrics.batch_ran(len(items))
    held: list[tuple[int, Callable[[], Any]]] = []
    results: list[tuple[int, Any, tuple]] = []
    try:
        with batches.Batch(engine) as batch, _holding(app, items, batch, held, results):
            outcomes = []
            for index, item in enumerate(items):
                batch.tag = index
                outcomes.append(trace(*item))
            batch.commit()
            held[:0] = batch.hooks
    except Exception:
        logger.warning("batch of %d: its transaction failed; running them one per transaction", len(items),
                       exc_info=True)
        return [trace(*item) for item in items]
    return _after_commit(outcomes, held, results)


@contextmanager
def _holding(app: Any, items: list[Item], batch: batches.Batch, held: list, results: list) -> Iterator[None]:
    """While the batch runs, task publishes (retries) and result writes wait for its commit."""
    backends = {id(backend): backend for backend in (app.tasks[item[0]].backend for item in items)}
    send = app.send_task

    def send_later(name: str, *args: Any, **kwargs: Any) -> Any:
        held.append((batch.tag, lambda: send(name, *args, **kwargs)))
        task_id = kwargs.get("task_id")
        return app.AsyncResult(task_id) if task_id else None

    app.send_task = send_later
    for backend in backends.values():
        backend.set = _set_later(backend, batch, results)
    try:
        yield
    finally:
        del app.send_task
        for backend in backends.values():
            del backend.set


def _set_later(backend: Any, batch: batches.Batch, results: list) -> Callable[..., None]:
    def set_later(key: Any, value: Any, expires: Any = None, **retry_policy: Any) -> None:
        results.append((batch.tag, backend, (key, value, expires)))
    return set_later


def _after_commit(outcomes: list[tuple], held: list, results: list) -> list[tuple]:
    """Run what waited for the commit; a delivery whose step failed is handed back to be redelivered."""
    failed: dict[int, BaseException] = {}
    for tag, hook in held:
        if tag in failed:
            continue
        try:
            hook()
        except Exception as exc:  # noqa: BLE001 - its redelivery finds the claim and does it again
            failed[tag] = exc
    by_backend: dict[int, tuple[Any, list]] = {}
    for tag, backend, args in results:
        if tag not in failed:
            by_backend.setdefault(id(backend), (backend, []))[1].append((tag, args))
    for backend, writes in by_backend.values():
        try:
            with backend.client.pipeline() as pipe:
                for _, (key, value, expires) in writes:
                    expires = backend.expires if expires is None else expires
                    pipe.setex(key, expires, value) if expires else pipe.set(key, value)
                    pipe.publish(key, value)
                pipe.execute()
        except Exception as exc:  # noqa: BLE001 - redelivered: the claim holds the outcome
            for tag, _ in writes:
                failed.setdefault(tag, exc)
    for tag, exc in failed.items():
        logger.warning("batch: after its commit, delivery %s failed (%r); handing it back", tag, exc)
        outcomes[tag] = (1, _handed_back(exc), 0.0)
    return outcomes


def _handed_back(exc: BaseException) -> ExceptionInfo:
    try:
        raise Reject(f"after the batch's commit: {exc!r}", requeue=True) from exc
    except Reject:
        return ExceptionInfo()
