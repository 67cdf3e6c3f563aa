"""The batcher's count of batch jobs in the pool (project/transport/batching.py `Batcher`), with fakes that record.

The batcher hands the pool a batch only while fewer batch jobs run than the pool has
processes; each job's callback ends its count. When the broker connection closes, Celery
flushes the pool, and the pool discards every job no process had accepted without calling
it back (billiard's `ApplyResult.discard`): the broker redelivers those messages. Counted
on, such jobs would keep the batcher from ever handing the pool another batch: the worker
would take messages and never run them. Real workers: tests/integration/test_batching.py.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable

import pytest
from celery import Celery
from celery.concurrency import prefork

from project.messaging.runtime import BusTask
from project.transport.batching import Batcher
from tests.unit.test_redis_fetch import Loop

JOBS = itertools.count(1)


class Job:
    """A pool job (billiard's ApplyResult as the batcher uses it): an id, in the pool's cache until done."""

    def __init__(self, cache: dict[int, "Job"], callback: Callable[..., None]) -> None:
        self._job, self.cache, self.callback = next(JOBS), cache, callback
        cache[self._job] = self

    def ready(self) -> bool:
        return self._job not in self.cache

    def finish(self, outcomes: list) -> None:
        del self.cache[self._job]
        self.callback(outcomes)

    def discard(self) -> None:  # what the pool's flush does to a job no process accepted: no callback
        self.cache.pop(self._job, None)


class Pool(prefork.TaskPool):  # the batcher runs on the prefork pool only
    num_processes = 2

    def __init__(self) -> None:
        self._cache: dict[int, Job] = {}
        self.jobs: list[tuple[Job, list]] = []  # (job, its items), in submission order

    def apply_async(self, fn: Any, *, args: tuple, callback: Callable[..., None], **_: Any) -> Job:
        job = Job(self._cache, callback)
        self.jobs.append((job, args[1]))
        return job


class Request:
    """A bus task's request as the batcher reads it."""

    def __init__(self, task: BusTask, n: int) -> None:
        self.task, self.id, self.type = task, f"m-{n}", task.name
        self.request_dict, self.body, self.content_type, self.content_encoding = {}, b"{}", "application/json", "utf-8"
        self.time_limits = (None, None)
        self.succeeded: list = []

    def revoked(self) -> bool:
        return False

    def on_success(self, outcome: Any) -> None:
        self.succeeded.append(outcome)


@pytest.fixture
def batcher() -> Batcher:
    app = Celery("batcher", broker="memory://", backend="redis://127.0.0.1:6379/15", set_as_current=False)
    consumer = type("Consumer", (), {"app": app, "hub": Loop(), "pool": Pool(), "on_task_request": print})()
    return Batcher(consumer, cap=4)


def task() -> BusTask:
    bound = BusTask()
    bound.name = "orders.place_order"
    return bound


def arrive(batcher: Batcher, count: int, start: int = 0) -> list[Request]:
    requests = [Request(task(), start + n) for n in range(count)]
    for request in requests:
        batcher(request)
    batcher.consumer.hub.tick()
    return requests


def test_a_busy_pool_gets_no_more_batches_until_one_calls_back(batcher):
    # Given both processes running a batch
    arrive(batcher, 8)
    pool = batcher.consumer.pool
    assert [len(items) for _, items in pool.jobs] == [4, 4] and batcher.running == 2
    # When more arrive, Then they wait
    arrive(batcher, 3, start=8)
    assert len(pool.jobs) == 2 and len(batcher.waiting) == 3
    # When one batch calls back, Then its requests get their outcomes and the waiting ones go out
    job, items = pool.jobs[0]
    job.finish([("ok", n) for n in range(len(items))])
    batcher.consumer.hub.tick()
    assert [len(items) for _, items in pool.jobs] == [4, 4, 3] and batcher.running == 2


def test_jobs_the_pools_flush_discarded_stop_counting_and_the_next_batch_goes_out(batcher):
    # Given both processes' batches discarded by the pool's flush of a closed channel (no callback)
    arrive(batcher, 8)
    pool = batcher.consumer.pool
    for job, _ in pool.jobs:
        job.discard()
    batcher.drop_waiting()
    # When the consumer tells the batcher what the pool still holds, and the redelivered messages arrive
    batcher.forget_discarded(pool._cache)
    arrive(batcher, 8, start=100)
    # Then nothing counts as running but the new batches: they went to the pool at once
    assert [len(items) for _, items in pool.jobs[2:]] == [4, 4] and batcher.running == 2


def test_a_job_still_in_the_pool_keeps_counting_after_a_flush(batcher):
    # Given two batches, one of which a process accepted (it stays in the pool's cache), the other discarded
    arrive(batcher, 8)
    pool = batcher.consumer.pool
    (running, _), (discarded, _) = pool.jobs
    discarded.discard()
    # When the batcher forgets the discarded one
    batcher.forget_discarded(pool._cache)
    # Then the accepted one still counts, and still ends its count when it calls back
    assert batcher.running == 1
    running.finish([("ok", n) for n in range(4)])
    assert batcher.running == 0
