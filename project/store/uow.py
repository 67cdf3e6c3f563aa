"""The unit of work: one SQLAlchemy transaction around claim, handler and outcome.

Everything a handler changes through its injected repositories, the idempotency claim,
the stored result and (with events) the outbox commit together or not at all. A
savepoint undoes what a block wrote and keeps the rest: a refused command's handler is
rolled back while its claim (and the row lock a duplicate waits on) stays.
"""
from __future__ import annotations

from functools import cache
from types import TracebackType
from typing import Callable

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from sqlalchemy.sql import Executable

from project.store.engine import Write


class UnitOfWork:
    """`with UnitOfWork(engine) as uow: ...; uow.commit()`; leaving without commit rolls back."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.session: Session | None = None

    def __enter__(self) -> "UnitOfWork":
        self.session = Session(self.engine, expire_on_commit=False)
        self.session.begin()
        return self

    @property
    def dialect(self) -> str:
        """`postgresql` or `sqlite`."""
        return self.engine.dialect.name

    def write(self, *writes: Write) -> None:
        """Execute writes whose results nobody reads; on PostgreSQL in one round trip.

        PostgreSQL runs data-modifying statements of a WITH clause to completion with the
        main statement, in its transaction and snapshot: one round trip instead of one
        each. The writes must touch different rows, and name their parameters apart.
        """
        assert self.session is not None
        if self.dialect == "postgresql" and len(writes) > 1:
            params = {}
            for _, own in writes:
                if params.keys() & own.keys():
                    raise ValueError(f"UnitOfWork.write: parameters {sorted(params.keys() & own.keys())} appear in "
                                     f"two writes; give each statement's bind parameters a prefix of its own")
                params.update(own)
            writes = ((_together(tuple(statement for statement, _ in writes)), params),)
        for statement, params in writes:
            self.session.execute(statement, params)

    def savepoint(self) -> Callable[[], None]:
        """Set a SAVEPOINT; the function returned undoes what was written since, and the transaction goes on.

        The COMMIT releases the savepoint: it has no RELEASE of its own (one round trip less
        on PostgreSQL than `Session.begin_nested()`, whose RELEASE would come with every
        success). Undoing also forgets the session's ORM objects, so that none written
        since is flushed again.
        """
        assert self.session is not None
        session, savepoint = self.session, self.session.connection().begin_nested()

        def undo() -> None:
            savepoint.rollback()
            session.expunge_all()
        return undo

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


@cache
def _together(statements: tuple[Executable, ...]) -> Executable:
    """The last statement, with the others as WITH clauses (built once per tuple of prebuilt statements)."""
    *first, last = statements
    return last.add_cte(*(statement.cte(f"write_{n}") for n, statement in enumerate(first)))
