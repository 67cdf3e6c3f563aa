"""Retry policy maths and operator durations: pure functions, exact numbers.

And the one check a policy gets from its broker: on Redis a retry must not wait as long
as the visibility timeout, checked as an app binds its tasks (no server needed).
"""
from __future__ import annotations

import random
from datetime import timedelta

import pytest
from celery import Celery

from handlers.accounts import EmailAlreadyRegistered
from handlers.messages import OrderPlaced, PlaceOrder
from project.core import Bus
from project.durations import parse_duration
from project.errors import ConfigurationError
from project.messaging.retry import (
    DEFAULT_SUBSCRIBER_POLICY,
    Backoff,
    check_visibility,
    default_command_policy,
    transient_errors,
)


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


# ---- retry waits and Redis's visibility timeout ----------------------------------------------
@pytest.mark.parametrize("policy, longest", [
    (Backoff(max_retries=5, base=1.0, cap=60.0), 16.0),      # 1, 2, 4, 8, 16: the cap is never reached
    (Backoff(max_retries=10, base=0.5, cap=30.0), 30.0),     # ... 16, 30, 30: the cap is
    (Backoff(max_retries=0, base=1.0, cap=600.0), 0.0),      # never retries: never waits
    (Backoff(max_retries=5000, base=1.0, cap=45.0), 45.0),   # no overflow on a huge count
    (Backoff(max_retries=3, base=0.0, cap=45.0), 0.0),       # retries at once
])
def test_the_longest_wait_of_a_policy_is_its_last_ceiling(policy, longest):
    assert policy.longest_delay() == longest
    # ... which no delay it draws exceeds (full jitter stays under the ceiling)
    assert all(policy.delay(n) <= longest for n in range(policy.max_retries) for _ in range(20))


def test_the_default_policies_fit_the_default_visibility_timeout():
    # Given Redis's default visibility timeout in celeryconfig (300 s), Then both default policies are accepted
    check_visibility("notifications.send_welcome_sms", DEFAULT_SUBSCRIBER_POLICY, 300)
    check_visibility("orders.place_order", default_command_policy(), 300)


def test_a_policy_is_not_checked_where_the_broker_restores_nothing_by_time():
    # Given RabbitMQ (no visibility timeout: None), Then even an hour's wait is accepted
    check_visibility("billing.charge_payment", Backoff(max_retries=20, base=1.0, cap=3600.0), None)


@pytest.mark.parametrize("cap", [10.0, 10.5, 60.0])
def test_a_policy_that_can_wait_as_long_as_the_visibility_timeout_is_refused_naming_the_fix(cap):
    # Given a subscriber whose retries may wait up to `cap` seconds, and a 10 s visibility timeout
    policy = Backoff(max_retries=8, base=1.0, cap=cap)
    # When it is checked, Then it is refused: its retry would be handed back and run twice
    with pytest.raises(ConfigurationError) as error:
        check_visibility("billing.charge_payment", policy, 10)
    assert str(error.value) == (
        f"billing.charge_payment: its retry policy Backoff(max_retries=8, base=1, cap={cap:g}) can wait "
        f"{cap:g} s before a retry, but the broker hands an unacknowledged message back after 10 s "
        f"(Redis visibility timeout): a retry waiting that long would run twice. Lower the policy's cap "
        f"(or max_retries) so it waits less than 10 s, or raise BUS_VISIBILITY_TIMEOUT above {cap:g} s "
        f"plus the handler's longest run."
    )


def test_a_policy_just_under_the_visibility_timeout_is_accepted():
    check_visibility("billing.charge_payment", Backoff(max_retries=8, base=1.0, cap=9.5), 10)


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


# ---- the check as a worker's app binds its tasks ----------------------------------------------
def charge(event: OrderPlaced) -> None:
    pass


def place(cmd: PlaceOrder) -> dict:
    return {}


def app_on(broker: str, **conf: object) -> Celery:
    """A Celery app on `broker` (never connected: binding tasks needs no server)."""
    app = Celery("policies", broker=broker, set_as_current=False)
    app.conf.update(conf)
    return app


@pytest.mark.parametrize("broker", ["redis://127.0.0.1:6379/0", "redis+socket:///tmp/bus/redis.sock"],
                         ids=["redis", "embedded"])
def test_a_worker_on_redis_refuses_a_subscriber_policy_past_its_visibility_timeout(broker):
    # Given an app on Redis whose visibility timeout is 30 s, and a subscriber that may wait 60 s
    app = app_on(broker, broker_transport_options={"visibility_timeout": 30})
    bus = Bus(app)
    bus.subscriber(OrderPlaced, boundary="billing", retry=Backoff(max_retries=8, base=1.0, cap=60.0))(charge)
    # When the app binds its tasks (a worker does at start), Then it refuses, naming the subscriber
    with pytest.raises(ConfigurationError, match=r"^billing\.charge: its retry policy .* can wait 60 s .* after 30 s"):
        app.finalize(auto=True)


def test_a_worker_on_redis_refuses_a_command_policy_past_its_visibility_timeout():
    # Given a command policy that waits up to 40 s and a 20 s visibility timeout
    app = app_on("redis://127.0.0.1:6379/0", broker_transport_options={"visibility_timeout": 20})
    Bus(app, command_policy=Backoff(max_retries=5, base=5.0, cap=40.0)).command(PlaceOrder)(place)
    # When the app binds its tasks, Then the command is refused
    with pytest.raises(ConfigurationError, match=r"^orders\.place_order: its retry policy .* can wait 40 s"):
        app.finalize(auto=True)


def test_a_visibility_timeout_under_the_bus_own_store_retry_is_refused_whatever_the_policy():
    # Given a command whose policy waits at most 1 s, and a 9 s visibility timeout, under
    # the 10 s after which the bus retries a message whose dead letter the store could not take
    app = app_on("redis://127.0.0.1:6379/0", broker_transport_options={"visibility_timeout": 9})
    Bus(app, command_policy=Backoff(max_retries=1, base=1.0, cap=1.0)).command(PlaceOrder)(place)
    # When the app binds its tasks, Then the command is refused, naming that retry
    with pytest.raises(ConfigurationError, match=r"dead letter the store could not take after 10 s\) can wait 10 s"):
        app.finalize(auto=True)


@pytest.mark.parametrize("broker, options", [
    ("amqp://guest:guest@127.0.0.1:5672//", {"visibility_timeout": 5}),  # RabbitMQ: no visibility timeout
    ("redis://127.0.0.1:6379/0", {}),                                   # kombu's default: 3600 s
], ids=["rabbitmq", "redis-default"])
def test_policies_that_fit_are_bound(broker, options):
    app = app_on(broker, broker_transport_options=options)
    bus = Bus(app)
    task = bus.subscriber(OrderPlaced, boundary="billing", retry=Backoff(max_retries=8, base=1.0, cap=600.0))(charge)
    bus.command(PlaceOrder)(place)
    app.finalize(auto=True)
    assert task.name in app.tasks and "orders.place_order" in app.tasks
