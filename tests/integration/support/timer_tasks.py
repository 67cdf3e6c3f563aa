"""A tasks module for the durable-timer tests (tests/integration/test_timers.py): the lab's `timerlab.ring`.

A worker loads it alone: BUS_TASK_MODULES=tests.integration.support.timer_tasks (the
contract and handler are in timer_lab.py; the audit port comes from the shop's wiring).
"""
from __future__ import annotations

from project import bus
from tasks import wiring  # noqa: F401  (providers: audit)
from tests.integration.support.timer_lab import Ring, ring

ring_task = bus.command(Ring)(ring)
