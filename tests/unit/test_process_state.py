"""The stored state of process-manager instances (project/store/process_state.py): versions and races.

Real databases at the migrations' head (SQLite files; PostgreSQL at 127.0.0.1:5432, a
database per test: tests/databases.py), real transactions (UnitOfWork), threads for the races.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy.engine import Engine

from project.store import process_state
from project.store.engine import engine_for
from project.store.process_state import COMPLETED, Instance, VersionConflict
from project.store.uow import UnitOfWork
from tests.databases import migrated_database

THREADS = 8


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    with migrated_database(request.param, tmp_path, prefix="bus_process") as url:
        yield engine_for(url)


def read(engine: Engine, instance_id: str = "o-1") -> Instance | None:
    with UnitOfWork(engine) as uow:
        return process_state.load(uow.session, "lab", instance_id)


def saved(engine: Engine, instance: Instance) -> Instance:
    with UnitOfWork(engine) as uow:
        stored = process_state.save(uow.session, instance)
        uow.commit()
    return stored


def test_a_save_from_a_stale_read_is_a_conflict_and_changes_nothing(engine):
    # Given an instance at version 1, read by step A and by step B (two sessions)
    saved(engine, Instance("lab", "o-1", {"steps": []}))
    step_a, step_b = read(engine), read(engine)
    assert step_a.version == step_b.version == 1
    # When B saves first, then A saves what it made of version 1
    saved(engine, replace(step_b, state={"steps": ["b"]}))
    with pytest.raises(VersionConflict, match="changed since this step read version 1; this step runs again"):
        saved(engine, replace(step_a, state={"steps": ["a"]}))
    # Then B's state stands, at version 2
    after = read(engine)
    assert (after.state, after.version) == ({"steps": ["b"]}, 2)


def test_a_second_start_of_one_instance_is_a_conflict(engine):
    # Given two steps that each found no instance o-1 and start one
    saved(engine, Instance("lab", "o-1", {"by": "first"}))
    # When the second saves its new instance
    with pytest.raises(VersionConflict, match="was started by another step at the same time"):
        saved(engine, Instance("lab", "o-1", {"by": "second"}))
    # Then the first one's stands
    assert read(engine).state == {"by": "first"}


def test_completion_is_stored_with_its_time_and_the_timers(engine):
    # Given a running instance with a pending timeout
    first = saved(engine, Instance("lab", "o-1", {}, timers={"payment": "t-1"}))
    assert (first.status, first.timers, first.completed_at) == ("running", {"payment": "t-1"}, None)
    # When a step completes it
    saved(engine, replace(first, status=COMPLETED, timers={}))
    # Then it reads back completed, with its completion time, and no timers
    after = read(engine)
    assert (after.status, after.timers, after.version) == ("completed", {}, 2)
    assert after.completed_at is not None and after.started_at is not None


def apply(engine: Engine, n: int, start: threading.Barrier, after_first_read: threading.Barrier | None) -> int:
    """Append `n` to o-1's state as one step would, running again on each conflict; the attempts it took."""
    start.wait(timeout=30)
    attempts = 0
    while True:
        attempts += 1
        with UnitOfWork(engine) as uow:
            found = process_state.load(uow.session, "lab", "o-1") or Instance("lab", "o-1", {"applied": []})
            if after_first_read is not None and attempts == 1:
                after_first_read.wait(timeout=30)  # every step has read before any saves: all but one lose
            try:
                process_state.save(uow.session, replace(found, state={"applied": [*found.state["applied"], n]}))
            except VersionConflict:
                continue  # leaving the block rolls the attempt back
            uow.commit()
            return attempts


def test_concurrent_steps_of_one_instance_are_all_applied_without_a_lost_update(database):
    # Given 8 steps of one instance, not started yet, released together (on PostgreSQL each also
    # waits until all have read, so that all race for the first save; SQLite queues its writers)
    engine = database
    start = threading.Barrier(THREADS)
    after_first_read = threading.Barrier(THREADS) if engine.dialect.name == "postgresql" else None
    # When each applies itself, running again on a conflict
    with ThreadPoolExecutor(THREADS) as pool:
        futures = [pool.submit(apply, engine, n, start, after_first_read) for n in range(THREADS)]
        attempts = [future.result(timeout=60) for future in futures]  # a deadlock would time out here
    # Then every step was applied exactly once, one version each: no update was lost
    instance = read(engine)
    assert sorted(instance.state["applied"]) == list(range(THREADS))
    assert instance.version == THREADS
    if after_first_read is not None:  # PostgreSQL: all but the first save lost a race and ran again
        assert sum(a > 1 for a in attempts) == THREADS - 1, attempts


def test_a_locked_read_waits_for_a_concurrent_save_and_reads_what_it_committed(tmp_path):
    # Given (PostgreSQL) a step that saved version 2 of o-1 and has not committed yet
    with migrated_database("postgresql", tmp_path, prefix="bus_process") as url:
        engine = engine_for(url)
        saved(engine, Instance("lab", "o-1", {"steps": []}))
        with UnitOfWork(engine) as uow:
            first = process_state.load(uow.session, "lab", "o-1")
            process_state.save(uow.session, replace(first, state={"steps": ["event"]}))

            # When a timeout reads o-1 with a lock meanwhile
            def timeout() -> Instance:
                with UnitOfWork(engine) as other:
                    locked = process_state.load(other.session, "lab", "o-1", lock=True)
                    stored = process_state.save(other.session, replace(
                        locked, state={"steps": [*locked.state["steps"], "timeout"]}))
                    other.commit()
                    return stored
            with ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(timeout)
                time.sleep(0.5)
                assert not waiting.done()  # it waits for the step's row lock
                uow.commit()
                # Then it reads the committed version 2, and its save cannot conflict
                assert waiting.result(timeout=30).version == 3
        assert read(engine).state == {"steps": ["event", "timeout"]}
