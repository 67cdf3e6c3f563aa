"""The test suite's Redis databases: one a process still consumes is never handed out again.

An orphaned worker of an earlier run (its parent killed) keeps consuming the database it
was given; the next test handed that database, empty by then, would lose messages to it.
"""
from __future__ import annotations

import pytest
import redis

from project.testing.isolation import claim_redis_db
from tests.integration.support.bus_services import require

pytestmark = pytest.mark.integration
REDIS = "redis://127.0.0.1:6379"


def test_a_database_another_process_is_connected_to_is_not_claimed():
    require("redis")
    # Given a database claimed, released (flushed, unmarked), and still selected by a stray client
    cleanups: list = []
    number = claim_redis_db(cleanups, REDIS)
    for release in reversed(cleanups):
        release()
    stray = redis.Redis.from_url(f"{REDIS}/{number}")
    stray.ping()  # connects, with database `number` selected
    try:
        # When a database is claimed again
        again: list = []
        try:
            second = claim_redis_db(again, REDIS)
        finally:
            for release in reversed(again):
                release()
        # Then it is another one
        assert second != number
    finally:
        stray.close()

    # And once the stray client is gone, that database is free again
    cleanups = []
    try:
        assert claim_redis_db(cleanups, REDIS) == number
    finally:
        for release in reversed(cleanups):
            release()
