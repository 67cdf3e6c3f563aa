"""One database transaction for a batch of deliveries, with a SAVEPOINT per delivery.

    with Batch(engine) as batch:            # BEGIN; the batch is `current()` in this process
        ...  each delivery: `with batch.unit() as uow: ...; uow.commit()`
        batch.commit()                      # one COMMIT for them all
    for tag, hook in batch.hooks: hook()    # what may only happen after the commit

A delivery's unit of work is a savepoint in the batch's transaction: its `commit()` keeps
what it wrote (flushed, savepoint released), leaving it without one rolls back its own
writes only, and the batch goes on. Writes that would otherwise open a transaction of
their own (a failed attempt's log, a dead letter) go through `batch.writer()`, in a
savepoint of the same connection: on SQLite a second connection would wait on the
batch's own writer lock. project/transport/batching.py runs the batches.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from itertools import count
from typing import Any, Callable, Iterator

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from project.store.uow import UnitOfWork

_current: ContextVar["Batch | None"] = ContextVar("bus_batch", default=None)
_serials = count(1)


def current() -> "Batch | None":
    """The batch this process is running now, or None (each delivery in its own transaction)."""
    return _current.get()


class Batch:
    """The transaction of one batch; `hooks` are (tag, callable) to run after its commit."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.serial = next(_serials)  # tells this process's batches apart (logs, tests)
        self.session: Session | None = None
        self.hooks: list[tuple[Any, Callable[[], Any]]] = []
        #: the delivery running now: hooks registered while it runs carry it
        self.tag: Any = None
        self._token: Any = None

    def __enter__(self) -> "Batch":
        self._transaction = UnitOfWork(self.engine).__enter__()  # BEGIN, as a delivery's own would
        self.session = self._transaction.session
        self._token = _current.set(self)
        return self

    def unit(self) -> "SavepointUnit":
        """The unit of work of one delivery: a savepoint in this transaction."""
        assert self.session is not None
        return SavepointUnit(self.engine, self.session)

    def writer(self) -> "Writer":
        """An engine stand-in whose `begin()` is a savepoint of this transaction."""
        assert self.session is not None
        return Writer(self.session)

    def after_commit(self, hook: Callable[[], Any]) -> None:
        """Run `hook` once the batch committed (never if it does not)."""
        self.hooks.append((self.tag, hook))

    def commit(self) -> None:
        self._transaction.commit()

    def __exit__(self, *exc_info: Any) -> None:
        _current.reset(self._token)
        try:
            self._transaction.__exit__(*exc_info)  # rolls back what was not committed, closes the session
        finally:
            self.session = None


class SavepointUnit(UnitOfWork):
    """A UnitOfWork inside a batch: BEGIN is a SAVEPOINT, COMMIT keeps it, leaving without one rolls it back."""

    def __init__(self, engine: Engine, session: Session) -> None:
        super().__init__(engine)
        self._session, self._savepoint = session, None
        self._inner: list[Any] = []  # savepoints set inside this one (`savepoint()`), innermost last

    def __enter__(self) -> "SavepointUnit":
        self.session = self._session
        self._savepoint = self.session.connection().begin_nested()
        return self

    def savepoint(self) -> Callable[[], None]:
        """As UnitOfWork.savepoint; this unit releases it with its own (SQLAlchemy tracks savepoints as a stack)."""
        undo = super().savepoint()
        self._inner.append(self.session.connection().get_nested_transaction())
        return undo

    def commit(self) -> None:
        assert self._savepoint is not None
        self.session.flush()  # the ORM's pending writes belong to this delivery, not to the next one's savepoint
        self._close(lambda savepoint: savepoint.commit())  # RELEASE: the writes stay in the batch's transaction

    def rollback(self) -> None:
        assert self._savepoint is not None
        self._close(lambda savepoint: savepoint.rollback())
        self.session.expunge_all()

    def _close(self, end: Callable[[Any], None]) -> None:
        for savepoint in [*reversed(self._inner), self._savepoint]:
            if savepoint.is_active:
                end(savepoint)
        self._inner.clear()

    def __exit__(self, *exc_info: Any) -> None:
        try:
            if self._savepoint is not None and self._savepoint.is_active:
                self.rollback()
        finally:
            self.session, self._savepoint = None, None


class Writer:
    """What execution_log.failed and the dead-letter store use of an engine, inside a batch."""

    def __init__(self, session: Session) -> None:
        self._session = session

    @property
    def dialect(self) -> Any:
        return self._session.get_bind().dialect

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        connection = self._session.connection()
        with connection.begin_nested():
            yield connection
