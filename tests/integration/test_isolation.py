"""The test suite's Redis databases: one a process still consumes is never handed out again.

An orphaned worker of an earlier run (its parent killed) keeps consuming the database it
was given; the next test handed that database, empty by then, would lose messages to it.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import redis

from project.testing.isolation import claim_redis_db
from tests.integration.support.bus_services import require

pytestmark = pytest.mark.integration
REDIS = "redis://127.0.0.1:6379"
#: another process that keeps database argv[1] selected, as an orphaned worker does
STRAY = ("import sys, time, redis; r = redis.Redis.from_url(sys.argv[1]); r.ping(); "
         "print('connected', flush=True); time.sleep(120)")


def test_a_database_another_process_is_connected_to_is_not_claimed():
    require("redis")
    # Given a database claimed, released (flushed, unmarked), and still selected by a stray client
    cleanups: list = []
    number = claim_redis_db(cleanups, REDIS)
    for release in reversed(cleanups):
        release()
    stray = subprocess.Popen([sys.executable, "-c", STRAY, f"{REDIS}/{number}"], stdout=subprocess.PIPE, text=True)
    try:
        assert stray.stdout.readline().strip() == "connected"
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
        stray.kill()  # by its PID
        stray.wait(10)

    # And once the stray client is gone, that database is free again
    cleanups = []
    try:
        assert claim_redis_db(cleanups, REDIS) == number
    finally:
        for release in reversed(cleanups):
            release()


def test_a_connection_of_this_process_does_not_block_a_database():
    require("redis")
    # Given a database claimed and released while this process keeps a connection to it (a pool)
    cleanups: list = []
    number = claim_redis_db(cleanups, REDIS)
    for release in reversed(cleanups):
        release()
    pooled = redis.Redis.from_url(f"{REDIS}/{number}")
    pooled.ping()
    try:
        # When a database is claimed again, Then it is the same one
        again: list = []
        try:
            assert claim_redis_db(again, REDIS) == number
        finally:
            for release in reversed(again):
                release()
    finally:
        pooled.close()
