"""The catalog's database: its engine, the caller's transaction, and the only ways in.

Every statement polystore runs against a catalog goes through one of three
entry points here, and nowhere else are driver errors turned into polystore's
(:func:`~.engine.translate_errors`) or transactions retried
(:func:`~.engine.retrying`):

* :meth:`Catalog.read` -- in the caller's :meth:`Catalog.transaction` if one
  is open on this thread (reads must see its writes), else in a read
  transaction of its own;
* :meth:`Catalog.write` -- atomically: a savepoint of the caller's
  transaction, or a write transaction of its own, run again from the start
  when it loses a race to a concurrent writer;
* :meth:`Catalog.transact` -- always a write transaction of its own, never
  the caller's: for the upload protocol's intents, which must commit before
  an upload starts, and for maintenance (gc, rebalance), which commits batch
  by batch.

The caller's transaction is held in a :class:`~contextvars.ContextVar`, so
each thread (and each asyncio task) has its own.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

from sqlalchemy import Connection

from polystore.backends.sql.checkpoints import Checkpointer
from polystore.backends.sql.engine import (
    WAL_CHECKPOINT_BYTES,
    WRITE,
    create_catalog_engine,
    retrying,
    sqlite_file,
    translate_errors,
)
from polystore.backends.sql.identity import hash_algorithm
from polystore.hashing import HashAlgorithm

__all__ = ["Catalog", "utcnow"]

T = TypeVar("T")


def utcnow() -> dt.datetime:
    """Now, in UTC: the one clock every catalog timestamp is read from."""
    return dt.datetime.now(dt.UTC)


class Catalog:
    """One catalog database, as SQLAlchemy reaches it, and the current transaction."""

    def __init__(self, url: str, engine_options: dict[str, Any] | None = None) -> None:
        self.url = url
        with translate_errors(url):
            self.engine = create_catalog_engine(url, **(engine_options or {}))
        #: ``"sqlite"`` or ``"postgresql"``.
        self.dialect: str = self.engine.dialect.name
        self.postgresql = self.dialect == "postgresql"
        self._tx: ContextVar[Connection | None] = ContextVar(
            f"polystore_tx_{id(self)}", default=None
        )
        self._hashing: HashAlgorithm | None = None
        # A SQLite file's WAL is checkpointed on a thread, not in commits.
        path = sqlite_file(url) if self.dialect == "sqlite" else None
        self._checkpointer = None if path is None else Checkpointer(path, WAL_CHECKPOINT_BYTES)

    @property
    def hashing(self) -> HashAlgorithm:
        """The algorithm that names this catalog's content (:mod:`polystore.hashing`).

        Read once, from ``polystore_identity``: it never changes once the
        catalog holds content. :class:`~polystore.SQLBackend` reads it as it
        opens, outside any transaction.
        """
        if self._hashing is None:
            self._hashing = self.read(hash_algorithm)
        return self._hashing

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
        self.engine.dispose()

    def _committed(self) -> None:
        """After a write transaction of this catalog committed."""
        if self._checkpointer is not None:
            self._checkpointer.committed()

    def errors(self) -> Any:
        """A context in which driver errors become polystore errors (for this catalog)."""
        return translate_errors(self.url)

    @property
    def connection(self) -> Connection | None:
        """The connection of the caller's open :meth:`transaction` on this thread, or None."""
        return self._tx.get()

    @property
    def in_transaction(self) -> bool:
        return self._tx.get() is not None

    def read(self, work: Callable[[Connection], T], *, snapshot: bool = False) -> T:
        """Run ``work`` in the caller's transaction, or a read transaction of its own.

        ``snapshot`` asks for one snapshot across statements, which PostgreSQL's
        default READ COMMITTED does not give.
        """
        with translate_errors(self.url):
            conn = self._tx.get()
            if conn is not None:
                return work(conn)
            options = {"isolation_level": "REPEATABLE READ"} if snapshot and self.postgresql else {}
            with self.engine.connect().execution_options(**options) as conn:
                return work(conn)

    def write(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` atomically: its own transaction (retried), or a savepoint in the caller's."""
        with translate_errors(self.url):
            conn = self._tx.get()
            if conn is not None:
                with conn.begin_nested():
                    return work(conn)
            return retrying(lambda: self._run_write(work))

    def transact(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` in a write transaction of its own (retried), whatever the caller holds."""
        with translate_errors(self.url):
            return retrying(lambda: self._run_write(work))

    def _run_write(self, work: Callable[[Connection], T]) -> T:
        with self.engine.connect().execution_options(**{WRITE: True}) as conn, conn.begin():
            result = work(conn)
        self._committed()
        return result

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """The caller's transaction: a savepoint if one is open on this thread.

        Commits when the block ends, rolls back if it raises; while it is open,
        :meth:`read` and :meth:`write` on this thread run inside it.
        """
        conn = self._tx.get()
        if conn is not None:
            with translate_errors(self.url), conn.begin_nested():
                yield conn
            return
        with (
            translate_errors(self.url),
            self.engine.connect().execution_options(**{WRITE: True}) as conn,
        ):
            token = self._tx.set(conn)
            try:
                with conn.begin():
                    yield conn
            finally:
                self._tx.reset(token)
        self._committed()
