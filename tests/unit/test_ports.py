"""Failure injection into the ports (BUS_FAIL_PORTS, `Flaky`): how many calls fail, and for which keys."""
from __future__ import annotations

from pathlib import Path

import pytest

from adapters.ports import Failures, Flaky, PortUnavailable, failures_for


class SmsOutbox:
    """A fake SMS port that records what it sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def send(self, to: str, text: str) -> None:
        self.sent.append((to, text))


def attempts(call, times: int) -> list[str]:
    """Call `call` `times` times: 'failed' or 'sent' for each call."""
    outcomes = []
    for _ in range(times):
        try:
            call()
            outcomes.append("sent")
        except PortUnavailable:
            outcomes.append("failed")
    return outcomes


def test_a_port_fails_its_first_calls_per_key_then_succeeds(tmp_path: Path):
    # Given an SMS port that fails the first 2 calls per key
    sms = SmsOutbox()
    flaky = Flaky(sms, "sms", Failures(2), tmp_path)
    # When one user is texted 4 times and another once
    first = attempts(lambda: flaky.send("u-1", "hi"), 4)
    second = attempts(lambda: flaky.send("u-2", "hi"), 1)
    # Then each key had its own 2 failures, and only the calls after them reached the port
    assert first == ["failed", "failed", "sent", "sent"]
    assert second == ["failed"]
    assert sms.sent == [("u-1", "hi"), ("u-1", "hi")]


def test_a_marked_key_fails_every_call_and_the_others_none(tmp_path: Path):
    # Given an SMS port that fails every call for keys containing "-unreachable"
    sms = SmsOutbox()
    flaky = Flaky(sms, "sms", Failures(None, "-unreachable"), tmp_path)
    # When a marked user is texted 10 times and an unmarked one once
    marked = attempts(lambda: flaky.send("u-1-unreachable", "hi"), 10)
    unmarked = attempts(lambda: flaky.send("u-2", "hi"), 1)
    # Then every call of the marked user failed, and the other user's reached the port
    assert marked == ["failed"] * 10
    assert unmarked == ["sent"]
    assert sms.sent == [("u-2", "hi")]


def test_a_count_with_a_marker_fails_only_marked_keys(tmp_path: Path):
    # Given a port that fails the first call of keys containing "vip"
    sms = SmsOutbox()
    flaky = Flaky(sms, "sms", Failures(1, "vip"), tmp_path)
    # When a vip and an ordinary user are texted twice each
    vip = attempts(lambda: flaky.send("u-vip", "hi"), 2)
    ordinary = attempts(lambda: flaky.send("u-3", "hi"), 2)
    # Then only the vip's first call failed
    assert vip == ["failed", "sent"]
    assert ordinary == ["sent", "sent"]


def test_the_injected_failures_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    # Given BUS_FAIL_PORTS with a count, an always-with-marker and an always
    monkeypatch.setenv("BUS_FAIL_PORTS", "gateway=4, sms=always:-unreachable,mail=always")
    # When each port's failures are read
    # Then each port gets its own; a port not named fails nothing
    assert failures_for("gateway") == Failures(4)
    assert failures_for("sms") == Failures(None, "-unreachable")
    assert failures_for("mail") == Failures(None)
    assert failures_for("audit") == Failures(0)
    assert not failures_for("audit") and failures_for("sms") and failures_for("gateway")


@pytest.mark.parametrize("item", ["sms=sometimes", "gateway=-1", "gateway=", "sms=2.5:vip"])
def test_a_bad_injected_failure_is_refused_with_the_syntax(monkeypatch: pytest.MonkeyPatch, item: str):
    # Given BUS_FAIL_PORTS with an item that is neither a count nor `always`
    monkeypatch.setenv("BUS_FAIL_PORTS", item)
    # When the port's failures are read
    # Then the error names the item and how to write it
    with pytest.raises(ValueError, match=r"write port=count or port=always.*:marker"):
        failures_for(item.partition("=")[0])
