"""The unit of work: one SQLAlchemy transaction around claim, handler and outcome.

Everything a handler changes through its injected repositories, the idempotency claim,
the stored result and (with events) the outbox commit together or not at all.
"""
from __future__ import annotations

from types import TracebackType

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session


class UnitOfWork:
    """`with UnitOfWork(engine) as uow: ...; uow.commit()`; leaving without commit rolls back."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.session: Session | None = None

    def __enter__(self) -> "UnitOfWork":
        self.session = Session(self.engine, expire_on_commit=False)
        self.session.begin()
        return self

    def commit(self) -> None:
        assert self.session is not None
        self.session.commit()

    def rollback(self) -> None:
        assert self.session is not None
        self.session.rollback()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self.session is not None
        try:
            if self.session.in_transaction():
                self.session.rollback()
        finally:
            self.session.close()
            self.session = None
