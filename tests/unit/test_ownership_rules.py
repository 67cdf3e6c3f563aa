"""Start-up and cluster checks as pure logic: boundary options, owner conflicts, the survey.

The survey runs against a fake control channel that returns canned worker replies and
records what it was asked (the integration tests ask real workers).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from handlers import accounts, orders
from handlers.messages import PlaceOrder, RegisterUser
from project.cluster import survey
from project.errors import ConfigurationError
from project.registry import Registry
from project.worker import find_conflicts, parse_boundaries

REAL = "handlers.orders.place_order"
ROGUE = "elsewhere.place_order"


def test_parse_boundaries_accepts_repeated_and_comma_separated_names():
    assert parse_boundaries(("orders,billing", " audit "), {"orders", "billing", "audit"}) == [
        "orders", "billing", "audit"]
    assert parse_boundaries((), {"orders"}) == []


def test_unknown_boundary_is_refused_listing_the_known_ones():
    with pytest.raises(ConfigurationError) as error:
        parse_boundaries(("orders,nosuch", "typo"), {"orders", "billing"})
    assert str(error.value).startswith("--boundary nosuch, typo: no such boundary; known: billing, orders")
    assert "BUS_TASK_MODULES" in str(error.value)


def test_unknown_boundary_with_an_empty_registry_says_none():
    with pytest.raises(ConfigurationError) as error:
        parse_boundaries(("orders",), set())
    assert "known: none" in str(error.value)


def test_a_different_handler_on_another_host_is_a_conflict_naming_both():
    mine = {"orders.place_order": REAL}
    replies = [{"b@host": {"orders.place_order": ROGUE}}]
    assert find_conflicts(mine, replies, "a@host") == [
        f"orders.place_order is served by {ROGUE} on b@host, but a@host would serve it with {REAL}"]


def test_replicas_other_queues_myself_and_error_replies_are_no_conflict():
    mine = {"orders.place_order": REAL}
    replies = [
        {"replica@host": {"orders.place_order": REAL}},             # same handler: a replica
        {"accounts@host": {"accounts.register_user": "x.register"}},  # a queue I do not serve
        {"a@host": {"orders.place_order": ROGUE}},                  # my own reply
        {"old@host": "not a dict"},                                 # a malformed reply
    ]
    assert find_conflicts(mine, replies, "a@host") == []


@dataclass
class FakeControl:
    """Celery's app.control, answering broadcasts with canned replies; records the calls."""

    replies: list[dict[str, Any]]
    asked: list[tuple[str, dict]] = field(default_factory=list)

    def broadcast(self, command: str, **options: Any) -> list[dict[str, Any]]:
        self.asked.append((command, options))
        return self.replies


@dataclass
class FakeApp:
    control: FakeControl


@dataclass
class FakeBus:
    app: FakeApp
    registry: Registry


def cluster(*replies: dict[str, Any]) -> FakeBus:
    registry = Registry()
    registry.add_command(PlaceOrder, orders.place_order)
    registry.add_command(RegisterUser, accounts.register_user)
    return FakeBus(FakeApp(FakeControl(list(replies))), registry)


def test_survey_reports_each_conflicting_pair_once():
    bus = cluster({"a@h": {"orders.place_order": REAL}}, {"b@h": {"orders.place_order": ROGUE}},
                  {"c@h": {"orders.place_order": REAL, "accounts.register_user": "handlers.accounts.register_user"}})
    report = survey(bus, timeout=1.5)
    assert bus.app.control.asked == [("bus_owners", {"reply": True, "timeout": 1.5})]
    assert report.workers == ["a@h", "b@h", "c@h"]
    assert report.conflicts == [
        f"orders.place_order is served by {ROGUE} on b@h, but a@h would serve it with {REAL}",
        f"orders.place_order is served by {REAL} on c@h, but b@h would serve it with {ROGUE}",
    ]
    assert report.unconsumed == []


def test_survey_lists_command_queues_no_worker_consumes():
    report = survey(cluster({"orders@h": {"orders.place_order": REAL}}), timeout=1)
    assert report.conflicts == []
    assert report.unconsumed == ["accounts.register_user"]


def test_survey_of_an_empty_cluster_lists_every_command_queue():
    report = survey(cluster(), timeout=1)
    assert (report.workers, report.conflicts) == ([], [])
    assert report.unconsumed == ["accounts.register_user", "orders.place_order"]
