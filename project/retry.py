"""Retry policies: exponential backoff with full jitter, a cap and per-exception rules."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from project.contracts import DomainError


def transient_errors() -> tuple[type[BaseException], ...]:
    """Failures of the infrastructure (database, broker) that a retry may cure."""
    from kombu.exceptions import OperationalError as BrokerError
    from sqlalchemy.exc import InterfaceError, OperationalError
    return (OperationalError, InterfaceError, BrokerError, ConnectionError, TimeoutError)


@dataclass(frozen=True)
class Backoff:
    """Retry up to `max_retries` times, waiting about base * 2**attempt seconds (<= cap).

    `retry_on` lists what is retried (default: everything but `give_up_on`);
    `give_up_on` is final at once (domain errors always are).
    """

    max_retries: int = 5
    base: float = 1.0
    cap: float = 300.0
    jitter: bool = True
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    give_up_on: tuple[type[BaseException], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.base < 0 or self.cap < 0:
            raise ValueError(f"Backoff needs max_retries, base and cap >= 0; got {self}")

    def should_retry(self, exc: BaseException, retries: int) -> bool:
        """True if `exc` after `retries` earlier retries deserves another try."""
        if isinstance(exc, (DomainError, *self.give_up_on)):
            return False
        return retries < self.max_retries and isinstance(exc, self.retry_on)

    def describe(self) -> dict:
        """The policy as JSON-ready data (for `bus topology` and the catalog)."""
        return {"max_retries": self.max_retries, "base_seconds": self.base, "cap_seconds": self.cap,
                "jitter": self.jitter, "retry_on": _names(self.retry_on), "give_up_on": _names(self.give_up_on)}

    def delay(self, retries: int) -> float:
        """Seconds to wait before retry number `retries + 1`."""
        ceiling = min(self.cap, self.base * (2 ** retries))
        return random.uniform(0, ceiling) if self.jitter else ceiling


def _names(types: tuple[type[BaseException], ...]) -> list[str]:
    return [f"{t.__module__}.{t.__qualname__}" for t in types]


def default_command_policy() -> Backoff:
    """Commands retry only infrastructure failures; a handler bug is dead-lettered at once."""
    return Backoff(max_retries=5, base=0.5, cap=30.0, retry_on=transient_errors())


#: subscribers retry any failure but domain errors: 5 times, from ~1 s up to a minute apart
DEFAULT_SUBSCRIBER_POLICY = Backoff(max_retries=5, base=1.0, cap=60.0)
