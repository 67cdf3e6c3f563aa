"""Durations as operators type them: `90s`, `15m`, `12h`, `7d`."""
from __future__ import annotations

import re
from datetime import timedelta

_DURATION = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_duration(text: str) -> timedelta:
    """`7d` -> 7 days; anything else raises ValueError saying what is accepted."""
    match = _DURATION.match(text or "")
    if not match:
        raise ValueError(f"{text!r} is not a duration; write a whole number and a unit: 90s, 15m, 12h or 7d")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
