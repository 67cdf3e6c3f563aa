"""celery-bus: commands with exactly one owner, events with many listeners, on Celery.

`project.app` and `project.bus` are loaded on first access, so that a sending service
can import `project.contracts` with pydantic alone.
"""
import importlib
from typing import Any

__all__ = ["app", "bus"]


def __getattr__(name: str) -> Any:
    if name in ("app", "bus"):
        return getattr(importlib.import_module("project.celery"), name)
    raise AttributeError(f"module 'project' has no attribute {name!r}")
