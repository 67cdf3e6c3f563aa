"""Retry policies: exponential backoff with full jitter, a cap and per-exception rules.

A policy is the only cap on a message's retries. On a broker that hands an unacknowledged
message back after a visibility timeout (Redis, the embedded broker), `check_visibility`
refuses a policy whose wait can reach it: a retry waits out its countdown unacknowledged
in the worker, and would be handed back and run twice.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from project.contracts import DomainError
from project.errors import ConfigurationError

#: doublings past this many reach any cap (and 2.0 ** 1024 would overflow a float)
_MAX_DOUBLINGS = 64


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
        ceiling = self._ceiling(retries)
        return random.uniform(0, ceiling) if self.jitter else ceiling

    def longest_delay(self) -> float:
        """The longest wait before any of its retries (the last retry's ceiling; 0 if it never retries)."""
        return self._ceiling(self.max_retries - 1) if self.max_retries else 0.0

    def _ceiling(self, retries: int) -> float:
        return min(self.cap, self.base * (2 ** min(retries, _MAX_DOUBLINGS)))

    def __str__(self) -> str:
        return f"Backoff(max_retries={self.max_retries}, base={self.base:g}, cap={self.cap:g})"


def check_visibility(name: str, policy: Backoff, visibility_timeout: float | None, other_wait: float = 0.0) -> None:
    """Refuse `policy` of task `name` if a retry can wait as long as `visibility_timeout` (None: no such timeout).

    `other_wait`: the longest wait of a retry the policy does not decide (the bus's own,
    e.g. while the dead-letter store is down).
    """
    if visibility_timeout is None:
        return
    longest = max(policy.longest_delay(), other_wait)
    if longest >= visibility_timeout:
        own = (f" (and the bus retries a message whose dead letter the store could not take after {other_wait:g} s)"
               if other_wait else "")
        raise ConfigurationError(
            f"{name}: its retry policy {policy}{own} can wait {longest:g} s before a retry, but the broker hands an "
            f"unacknowledged message back after {visibility_timeout:g} s (Redis visibility timeout): a retry "
            f"waiting that long would run twice. Lower the policy's cap (or max_retries) so it waits less than "
            f"{visibility_timeout:g} s, or raise BUS_VISIBILITY_TIMEOUT above {longest:g} s plus the handler's "
            f"longest run."
        )


def _names(types: tuple[type[BaseException], ...]) -> list[str]:
    return [f"{t.__module__}.{t.__qualname__}" for t in types]


def lost_a_write_race(exc: BaseException, retries: int) -> bool:
    """True for a unique-constraint violation on a first attempt: retried once, whatever the policy.

    Most often a concurrent transaction committed the same row between the handler's check
    and its insert (two registrations of one e-mail; on PostgreSQL the insert waits for the
    other transaction, then fails). Run again, the handler sees that row and refuses as it
    would have; a second violation is a bug of the handler and goes to the policy.
    """
    from sqlalchemy.exc import IntegrityError
    return retries == 0 and isinstance(exc, IntegrityError)


def default_command_policy() -> Backoff:
    """Commands retry only infrastructure failures; a handler bug is dead-lettered at once."""
    return Backoff(max_retries=5, base=0.5, cap=30.0, retry_on=transient_errors())


#: subscribers retry any failure but domain errors: 5 times, from ~1 s up to a minute apart
DEFAULT_SUBSCRIBER_POLICY = Backoff(max_retries=5, base=1.0, cap=60.0)
