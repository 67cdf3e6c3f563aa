"""bench/faults.py without services: the options it refuses, and what its --edges plan sends."""
from __future__ import annotations

import importlib.util
import random
from collections import Counter

import pytest

from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("faults", REPO / "bench" / "faults.py")
faults = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(faults)


def entity(send) -> str:
    return send.fields[faults.ENTITY[send.task]]


@pytest.mark.parametrize(("argv", "message"), [
    (["--gateway-failures", "4"], "--gateway-failures goes with --edges"),
    (["--edges", "--gateway-failures", "-1"], "--gateway-failures -1: give a count >= 0"),
])
def test_bad_edge_options_are_refused_with_the_fix(argv: list[str], message: str, capsys):
    # Given fault-suite options that make no sense together
    # When they are parsed
    with pytest.raises(SystemExit):
        faults.parse_args(["--broker", "redis", *argv])
    # Then the error says what is wrong and how to write it
    assert message in capsys.readouterr().err


def test_edges_default_to_four_gateway_failures():
    # Given --edges without --gateway-failures
    # Then every charge fails 4 times: past Celery's old cap of 3 retries
    assert faults.parse_args(["--broker", "redis", "--edges"]).gateway_failures == 4
    assert faults.parse_args(["--broker", "redis"]).gateway_failures is None


def test_without_edges_the_plan_only_repeats_earlier_sends():
    # Given a seed
    # When a plan without edges is made
    sends = faults.plan(300, 0.1, random.Random(5))
    # Then it only repeats earlier sends: one payload per key, a fresh e-mail per registration, nobody marked
    payloads = Counter((s.task, s.key, entity(s)) for s in sends)
    assert len(sends) == 300 and len({(t, k) for t, k, _ in payloads}) == len(payloads)
    emails = {s.fields["email"] for s in sends if s.task == faults.REGISTER_USER}
    assert len(emails) == len({s.key for s in sends if s.task == faults.REGISTER_USER})
    assert not any(faults.UNREACHABLE in entity(s) for s in sends)


def test_the_edge_plan_has_bursts_conflicts_reused_emails_and_unreachable_users():
    # Given a seed
    # When a plan with edges is made
    sends = faults.plan(400, 0.1, random.Random(5), edges=True)
    # Then some sends go out 2-3 times back to back, identical
    runs = [len(list(group)) for group in _runs(sends)]
    assert len(sends) == 400 and max(runs) in (2, 3) and runs.count(2) + runs.count(3) > 10
    # ... some keys carry a second payload, with its own ids and a fresh e-mail, sent right after the first
    payloads: dict[tuple[str, str], list] = {}
    for s in sends:
        if entity(s) not in [entity(p) for p in payloads.setdefault((s.task, s.key), [])]:
            payloads[(s.task, s.key)].append(s)
    conflicts = [p for p in payloads.values() if len(p) > 1]
    assert conflicts and all(len(p) == 2 and sends.index(p[1]) == sends.index(p[0]) + 1 for p in conflicts)
    assert all(p[0].fields["email"] != p[1].fields["email"] for p in conflicts if p[0].task == faults.REGISTER_USER)
    # ... some registrations reuse an e-mail first used at least REUSE_GAP sends earlier, under a new key
    first_use: dict[str, tuple[int, str]] = {}
    reused = 0
    for at, s in enumerate(sends):
        if s.task != faults.REGISTER_USER:
            continue
        earliest, key = first_use.setdefault(s.fields["email"], (at, s.key))
        if key != s.key and entity(s) != entity(sends[earliest]):
            reused += 1
            assert at - earliest >= faults.REUSE_GAP
    assert reused > 5
    # ... and some users are marked unreachable by SMS
    assert any(faults.UNREACHABLE in entity(s) for s in sends if s.task == faults.REGISTER_USER)


def _runs(sends):
    """Groups of consecutive identical sends."""
    group = [sends[0]]
    for s in sends[1:]:
        if s == group[-1]:
            group.append(s)
        else:
            yield group
            group = [s]
    yield group
