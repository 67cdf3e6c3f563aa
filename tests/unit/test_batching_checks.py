"""The checks a batching worker makes at its start (project/transport/batching.py)."""
from __future__ import annotations

import pytest
from celery import Celery

from project.errors import ConfigurationError
from project.settings import batch_max
from project.transport.batching import check_result_backend, check_visibility


def app_with(**conf) -> Celery:
    app = Celery("batching-checks", broker="redis://127.0.0.1:6379/0", set_as_current=False)
    app.conf.update({"broker_transport_options": {"visibility_timeout": 100}, "worker_prefetch_multiplier": 16, **conf})
    return app


def test_a_cap_whose_reserved_messages_can_outwait_the_visibility_timeout_is_refused_naming_both_settings():
    # Given a Redis worker reserving 16 per process, tasks limited to 10 s, a visibility timeout of 100 s
    app = app_with(task_time_limit=10)
    # When batches of 8 are asked for, Then the worker refuses: (16 + 8) x 10 s >= 100 s
    with pytest.raises(ConfigurationError, match="BUS_BATCH_MAX=8.*240 s.*BUS_VISIBILITY_TIMEOUT"):
        check_visibility(app, 8)
    # ... and a smaller reservation and cap pass
    check_visibility(app_with(task_time_limit=1, worker_prefetch_multiplier=4), 2)


def test_without_a_time_limit_or_on_rabbitmq_there_is_no_bound_to_check():
    check_visibility(app_with(), 8)
    rabbit = Celery("batching-checks", broker="amqp://guest:guest@127.0.0.1:5672//", set_as_current=False)
    rabbit.conf.task_time_limit = 10_000
    check_visibility(rabbit, 8)


def test_batching_refuses_a_result_backend_whose_writes_it_cannot_hold_back():
    app = app_with(result_backend="cache+memory://")
    with pytest.raises(ConfigurationError, match="BUS_BATCH_MAX=8 needs a Redis result backend"):
        check_result_backend(app, 8)
    check_result_backend(app_with(result_backend="redis://127.0.0.1:6379/0"), 8)


@pytest.mark.parametrize("backend, cap", [
    ("redis://127.0.0.1:6379/0", 16), ("rediss://cache:6380/0", 16), ("redis+socket:///tmp/r.sock", 16),
    ("sentinel://127.0.0.1:26379/0", 16), ("db+postgresql+psycopg://bus@db/bus", 0), ("rpc://", 0)])
def test_unset_batching_is_on_with_a_redis_result_backend_only(backend: str, cap: int):
    # Given BUS_BATCH_MAX unset, When the setting is read for this result backend
    # Then batches of 16 where a batch can hold the result writes back, off elsewhere, and marked as the default
    assert batch_max(backend, env={}) == (cap, True)


def test_an_explicit_batch_size_is_kept_to_on_any_backend():
    assert batch_max("redis://127.0.0.1:6379/0", env={"BUS_BATCH_MAX": "0"}) == (0, False)
    assert batch_max("db+sqlite:///bus.db", env={"BUS_BATCH_MAX": " 8 "}) == (8, False)


@pytest.mark.parametrize("raw", ["-1", "sixteen", "8.5"])
def test_a_malformed_batch_size_stops_start_up_naming_the_setting_and_its_forms(raw: str):
    with pytest.raises(ConfigurationError, match=r"BUS_BATCH_MAX=.* whole number >= 0 \(0 or 1: off\), or unset it"):
        batch_max("redis://127.0.0.1:6379/0", env={"BUS_BATCH_MAX": raw})
