"""Retry policy maths and operator durations: pure functions, exact numbers."""
from __future__ import annotations

import random
from datetime import timedelta

import pytest

from handlers.accounts import EmailAlreadyRegistered
from project.durations import parse_duration
from project.retry import Backoff, default_command_policy, transient_errors


class GatewayDown(ConnectionError):
    pass


class Unfixable(ValueError):
    pass


def test_backoff_doubles_from_base_up_to_the_cap_without_jitter():
    policy = Backoff(max_retries=10, base=0.5, cap=30.0, jitter=False)
    assert [policy.delay(n) for n in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_full_jitter_stays_between_zero_and_the_ceiling():
    random.seed(7)
    policy = Backoff(base=1.0, cap=10.0)
    for retries, ceiling in [(0, 1.0), (2, 4.0), (5, 10.0), (9, 10.0)]:
        delays = [policy.delay(retries) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling / 2  # spread over the range, not stuck at zero


def test_retries_until_max_retries_then_gives_up():
    policy = Backoff(max_retries=3)
    assert [policy.should_retry(GatewayDown(), n) for n in range(5)] == [True, True, True, False, False]


def test_domain_errors_and_give_up_on_are_final_at_once():
    policy = Backoff(max_retries=5, give_up_on=(Unfixable,))
    assert not policy.should_retry(EmailAlreadyRegistered("taken"), 0)
    assert not policy.should_retry(Unfixable("no"), 0)
    assert policy.should_retry(GatewayDown(), 0)


def test_retry_on_limits_what_is_retried():
    policy = Backoff(retry_on=(ConnectionError,))
    assert policy.should_retry(GatewayDown(), 0)
    assert not policy.should_retry(KeyError("bug"), 0)


def test_commands_retry_infrastructure_failures_only():
    from sqlalchemy.exc import OperationalError
    policy = default_command_policy()
    assert policy.should_retry(OperationalError("SELECT 1", {}, Exception("server closed")), 0)
    assert policy.should_retry(ConnectionError("reset"), 0)
    assert not policy.should_retry(KeyError("a handler bug"), 0)
    assert not policy.should_retry(ValueError("a handler bug"), 0)
    assert ConnectionError in transient_errors()


@pytest.mark.parametrize("field", ["max_retries", "base", "cap"])
def test_negative_backoff_settings_are_refused(field):
    with pytest.raises(ValueError) as error:
        Backoff(**{field: -1})
    assert "max_retries, base and cap >= 0" in str(error.value)


@pytest.mark.parametrize("text, expected", [
    ("90s", timedelta(seconds=90)), ("15m", timedelta(minutes=15)), ("12h", timedelta(hours=12)),
    ("7d", timedelta(days=7)), ("0s", timedelta(0)), (" 3 d ", timedelta(days=3)),
])
def test_parse_duration(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["banana", "7", "-5d", "7w", "1.5h", "", "d", "7dd", "7 days"])
def test_parse_duration_refuses_anything_else_with_the_accepted_forms(text):
    with pytest.raises(ValueError) as error:
        parse_duration(text)
    assert str(error.value) == f"{text!r} is not a duration; write a whole number and a unit: 90s, 15m, 12h or 7d"
