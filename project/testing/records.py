"""The records `BusHarness` returns for assertions: frozen, typed, with named fields.

Each reads both ways, `dead.reason` and `dead["reason"]`; a name that is not a field
raises KeyError listing the fields. They are copies: changing the store afterwards does
not change them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping


class Record:
    """`record["field"]` as well as `record.field`, for the frozen dataclasses below."""

    def __getitem__(self, name: str) -> Any:
        names = [f.name for f in dataclasses.fields(self)]  # type: ignore[arg-type]
        if name not in names:
            raise KeyError(f"{name!r} is not a field of {type(self).__name__}; its fields: {', '.join(names)}")
        return getattr(self, name)

    @classmethod
    def from_row(cls, row: Any) -> Any:
        """The record of a SQLAlchemy row (its columns of the same names)."""
        mapping: Mapping[str, Any] = row._mapping
        return cls(**{f.name: mapping[f.name] for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


@dataclass(frozen=True)
class DeadLetter(Record):
    """One entry of the dead-letter store (bus_dead_letters): what failed, why, and its message."""

    id: int
    message_id: str | None
    task: str | None
    queue: str | None
    boundary: str | None
    reason: str  # invalid, conflict, refused, retries-exhausted, ... (project/dead_letters)
    error: str | None
    traceback: str | None
    headers: dict[str, Any] | None
    body: bytes | None
    content_type: str | None
    content_encoding: str | None
    attempts: int
    correlation_id: str | None
    first_failed_at: datetime
    last_failed_at: datetime
    replays: int
    replayed_at: datetime | None
