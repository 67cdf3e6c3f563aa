"""Shared by unit and integration tests: a clean process environment.

The bus reads its configuration from environment variables (celeryconfig.py,
project/settings.py). A developer's shell may have some set; they must not leak into
the tests, which choose every setting themselves. The integration tests pass each
scenario's settings to the processes they start (workers, senders, the `bus` CLI).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Every variable the bus or Celery reads starts with one of these; tests set what they need.
for _name in [n for n in os.environ if n.startswith(("BUS_", "CELERY_"))]:
    os.environ.pop(_name)


@pytest.fixture(scope="session")
def repo() -> Path:
    """The repository root (where `project/`, `handlers/` and `tests/` live)."""
    return REPO
