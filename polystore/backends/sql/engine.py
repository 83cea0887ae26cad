"""Engines for the catalog, and the one place driver errors become polystore errors.

SQLite: WAL journal, ``synchronous=NORMAL`` (a committed transaction survives a
process crash; a power cut may lose the last ones, never corrupt the file),
foreign keys on, a busy timeout, and ``BEGIN IMMEDIATE`` for write transactions
so two writers queue on the lock instead of failing half-way through.

PostgreSQL: psycopg 3 (binary transfer for ``bytea``), ``READ COMMITTED``;
writers rely on upserts, row locks and savepoints.
"""

from __future__ import annotations

import errno
import json
import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import unquote

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import URL, Connection, Engine, make_url

from polystore.errors import (
    BackendConfigError,
    BackendUnavailableError,
    CatalogDamagedError,
    ConflictError,
    PolystoreError,
    ReadOnlyError,
    StorageFullError,
    UnsupportedOperationError,
)

__all__ = [
    "DEFAULT_URL",
    "WAL_CHECKPOINT_BYTES",
    "WAL_SIZE_LIMIT",
    "WRITE",
    "CatalogChanged",
    "JSONColumnError",
    "create_catalog_engine",
    "damaged_catalog",
    "default_url",
    "driver_error",
    "driver_fetch",
    "is_retryable",
    "load_json_column",
    "retrying",
    "sqlite_file",
    "translate_errors",
]

DEFAULT_URL = "sqlite:///polystore.db"
#: Execution option that marks a connection as a writer (``BEGIN IMMEDIATE``).
WRITE = "polystore_write"
SQLITE_BUSY_TIMEOUT_S = 30.0
PG_CONNECT_TIMEOUT_S = 10

T = TypeVar("T")


def default_url() -> str:
    """``POLYSTORE_URL`` if set, else ``sqlite:///polystore.db``."""
    return os.environ.get("POLYSTORE_URL") or DEFAULT_URL


def parse_url(url: str | URL) -> URL:
    try:
        parsed = make_url(url)
    except exc.ArgumentError as error:
        raise BackendConfigError(f"not a database URL: {url!r} ({error})") from error
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise BackendConfigError(
            f"unsupported database {parsed.get_backend_name()!r} in {url!r}: "
            "polystore catalogs run on sqlite:/// and postgresql+psycopg:// URLs"
        )
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() != "psycopg":
        # psycopg 3 is the driver polystore is tested with; plain postgresql://
        # would pick psycopg2, which is not a dependency.
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def create_catalog_engine(url: str | URL, **engine_kwargs: Any) -> Engine:
    """An engine configured for a polystore catalog at ``url``."""
    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed, **engine_kwargs)
    if parsed.get_driver_name() == "psycopg":
        _require_psycopg()
    engine_kwargs.setdefault("pool_pre_ping", True)
    connect_args = dict(engine_kwargs.pop("connect_args", {}))
    # A server that accepts the connection and then says nothing must not hang
    # the caller forever (libpq's default is to wait indefinitely).
    connect_args.setdefault("connect_timeout", PG_CONNECT_TIMEOUT_S)
    return sa.create_engine(parsed, connect_args=connect_args, **engine_kwargs)


def _require_psycopg() -> None:
    """PostgreSQL needs psycopg, an optional dependency (``polystore[postgres]``)."""
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        raise BackendConfigError(
            "PostgreSQL catalogs need the psycopg driver, which is not installed: "
            "pip install 'polystore[postgres]'"
        ) from exc


def sqlite_file(url: str | URL) -> str | None:
    """The absolute path of the SQLite file ``url`` names.

    None for another database and for in-memory SQLite. The one reading of a
    SQLite URL in polystore: the engine, the default blob store
    (``<file>.blobs``), migrations and the command line all ask here.
    """
    parsed = parse_url(url) if isinstance(url, str) else url
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if database in ("", ":memory:") or parsed.query.get("mode") == "memory":
        return None
    if parsed.query.get("uri") in ("true", "1") and database.startswith("file:"):
        # A SQLite URI filename: file:/abs/x.db or file:rel/x.db, percent-encoded
        database = unquote(database[len("file:") :].split("?", 1)[0])
    return os.path.abspath(database)


def _set_wal(cursor: Any) -> None:
    """``PRAGMA journal_mode=WAL``, waiting out a concurrent opener.

    Switching a fresh file to WAL needs an exclusive lock, and SQLite reports
    "database is locked" at once (no busy handler) when several processes
    open a new catalog together: retry, with back-off, for up to the busy
    timeout.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    delay = 0.002
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.1)


#: WAL bytes left by commits that a catalog's checkpoint thread copies back
#: into the database file (:mod:`.checkpoints`; ``docs/decisions.rst`` says
#: why not more). Four times as many make SQLite checkpoint in the commit
#: itself (``PRAGMA wal_autocheckpoint``, set in pages of the file's own size:
#: 4 KiB, SQLite's default, unless the file was made with others): where no
#: thread does (migrations, the command line), or where it falls behind.
WAL_CHECKPOINT_BYTES = 16 << 20

#: Bytes a SQLite catalog's ``-wal`` file is cut down to once a checkpoint has
#: emptied it (``PRAGMA journal_size_limit``): the most it grows to between
#: checkpoints when commits make them (four times :data:`WAL_CHECKPOINT_BYTES`).
WAL_SIZE_LIMIT = 64 << 20


def _sqlite_engine(url: URL, **engine_kwargs: Any) -> Engine:
    path = sqlite_file(url)
    memory = path is None
    if path is not None:
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            raise BackendConfigError(f"directory for SQLite catalog does not exist: {parent}")
    connect_args = dict(engine_kwargs.pop("connect_args", {}))
    connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_S)
    connect_args.setdefault("check_same_thread", False)
    if memory:
        # One shared connection, or every checkout would see a new empty database.
        engine_kwargs.setdefault("poolclass", sa.pool.StaticPool)
    engine = sa.create_engine(url, connect_args=connect_args, **engine_kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control from the sqlite3 module: it would otherwise
        # open transactions lazily and never with BEGIN IMMEDIATE.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        try:
            if not memory:
                _set_wal(cursor)
                # The commit that fills the WAL past this many pages copies
                # them into the database and fsyncs: 1,000 4 KiB pages
                # (SQLite's default, 4 MiB) made that a commit in 30 of small
                # saves, each ~10 ms, 40% of their commit time. A catalog's
                # checkpoint thread copies them back at a quarter of this
                # (.checkpoints), so commits rarely do. What a power cut can
                # lose is still "the last transactions" (synchronous=NORMAL).
                page = cursor.execute("PRAGMA page_size").fetchone()[0]
                cursor.execute(f"PRAGMA wal_autocheckpoint={4 * WAL_CHECKPOINT_BYTES // page}")
                # Once a checkpoint has copied it all back, the next writer
                # starts the WAL over and cuts it down to this size: one large
                # transaction would otherwise leave a -wal file that large.
                cursor.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            cursor.execute("PRAGMA synchronous=NORMAL")
            # Batch loads touch node, index and blob pages all over the file: a
            # 64 MiB page cache (allocated only as used) and reads through a
            # 256 MiB memory map cut load_batch of 10k small arrays by ~30%.
            cursor.execute("PRAGMA cache_size=-65536")
            cursor.execute("PRAGMA mmap_size=268435456")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        immediate = conn.get_execution_options().get(WRITE, False)
        # (on the driver's cursor: ~10 µs, where SQLAlchemy's execution costs ~100)
        driver_fetch(conn, "BEGIN IMMEDIATE" if immediate else "BEGIN", ())

    return engine


# -- statements on the driver's cursor ---------------------------------------------


def driver_fetch(conn: Connection, sql: str, params: Sequence[Any]) -> list[Any]:
    """The rows of ``sql``, run on the DBAPI cursor itself, errors raised as SQLAlchemy raises them.

    For small lookups on the hot path of a write, and SQLite's ``BEGIN``: no
    execution context, no result object (on SQLite ~10 µs a statement
    instead of ~100). ``sql``
    uses the driver's placeholders. When something listens to the
    connection's statement events (a tracer, a test counting
    statements), the statement goes through SQLAlchemy instead, so that
    listeners get a real execution context and see failures too.
    """
    if _statement_listeners(conn):
        result = conn.exec_driver_sql(sql, tuple(params))
        return list(result.all()) if result.returns_rows else []
    dbapi_conn: Any = conn.connection.dbapi_connection
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute(sql, params)
        return cursor.fetchall()  # type: ignore[no-any-return]
    except conn.dialect.loaded_dbapi.Error as error:
        raise driver_error(conn, error, sql, params) from error
    finally:
        cursor.close()


def driver_error(
    conn: Connection,
    error: Exception,
    statement: str,
    params: Sequence[Any] | None = None,
    *,
    many: bool = False,
) -> exc.StatementError:
    """The driver's ``error`` as SQLAlchemy raises it (``OperationalError`` for a busy
    database, ``IntegrityError``...), for statements run on the driver itself:
    retries and error translation then see no difference."""
    return exc.DBAPIError.instance(
        statement,
        params,
        error,
        conn.dialect.loaded_dbapi.Error,
        dialect=conn.dialect,
        ismulti=many,
    )


def _statement_listeners(conn: Connection) -> bool:
    """Whether anything listens to ``conn``'s cursor-level statement events, or its errors.

    Not ``engine._has_events``: that is true of every polystore engine, which
    listens to ``connect`` and ``begin`` itself. (Any listener on the
    connection itself counts, to be safe.)
    """
    dispatch = conn.engine.dispatch
    return (
        conn._has_events
        or bool(dispatch.before_cursor_execute)
        or bool(dispatch.after_cursor_execute)
        or bool(conn.dialect.dispatch.handle_error)
    )


# -- errors --------------------------------------------------------------------


class CatalogChanged(Exception):
    """A row this transaction read changed before the transaction could act on it.

    Under PostgreSQL's READ COMMITTED each statement sees the catalog as of its
    own start: a file resolved by one statement may be moved, overwritten or
    deleted by another writer before the next statement updates it. The
    statement that finds so (it changed no row, or another row than expected)
    raises this, and :func:`retrying` runs the whole transaction again, which
    resolves everything afresh. Inside a caller's
    :meth:`~polystore.SQLBackend.transaction` it becomes
    :class:`~polystore.errors.ConflictError`.
    """


_SQLITE_BUSY = ("database is locked", "database table is locked", "database schema has changed")
# serialization_failure, deadlock_detected, unique_violation (a concurrent insert
# of the same new path or blob), foreign_key_violation (a directory or blob row
# deleted by a concurrent transaction after this one looked it up),
# lock_not_available
_PG_RETRY_SQLSTATES = {"40001", "40P01", "23505", "23503", "55P03"}


def is_retryable(error: BaseException) -> bool:
    """Whether a failed write transaction may simply be run again."""
    if isinstance(error, CatalogChanged):
        return True
    if not isinstance(error, exc.DBAPIError):
        return False
    orig = error.orig
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate is not None:
        return sqlstate in _PG_RETRY_SQLSTATES
    return isinstance(error, exc.OperationalError) and any(
        text in str(orig) for text in _SQLITE_BUSY
    )


def _is_unavailable(error: exc.DBAPIError) -> bool:
    if error.connection_invalidated:
        return True
    text = str(error.orig).lower()
    return isinstance(error, exc.OperationalError) and any(
        marker in text
        for marker in (
            "connection refused",
            "could not connect",
            "connection failed",
            "server closed the connection",
            "unable to open database file",
            "no such host",
            "name or service not known",
            "timeout expired",
        )
    )


@contextmanager
def translate_errors(url: str) -> Iterator[None]:
    """Turn driver errors a user can cause into polystore errors, ``from`` the original."""
    try:
        yield
    except PolystoreError:
        raise
    except CatalogChanged as error:
        raise ConflictError(
            "the catalog changed under this transaction (a concurrent writer moved, "
            f"replaced or deleted what it read); nothing of it was written, run it again: {error}"
        ) from error
    except exc.DBAPIError as error:
        read_only = _read_only_sqlite_directory(url, error)
        if read_only is not None:
            raise read_only from error
        damaged = damaged_catalog(url, error.orig)
        if damaged is not None:
            raise damaged from error
        if _is_unavailable(error):
            raise BackendUnavailableError(
                f"cannot reach the catalog at {_safe(url)}: {str(error.orig).strip()}"
            ) from error
        text = str(error.orig)
        if "readonly database" in text or "read-only" in text:
            raise ReadOnlyError(
                f"the catalog at {_safe(url)} is read-only: {text.strip()}"
            ) from error
        if "database or disk is full" in text:
            raise StorageFullError(
                errno.ENOSPC, f"the catalog at {_safe(url)} is full: {text.strip()}"
            ) from error
        if "file is not a database" in text:
            raise BackendConfigError(
                f"{_safe(url)} does not point at a SQLite database: {text.strip()}"
            ) from error
        if "cannot start a transaction within a transaction" in text:
            raise UnsupportedOperationError(
                f"the in-memory catalog {_safe(url)} is one connection: use it from one "
                "thread at a time (or use a SQLite file)"
            ) from error
        if is_retryable(error):
            # Left after polystore's own retries, or inside the caller's transaction().
            raise ConflictError(
                "the catalog aborted this transaction to resolve a conflict with a concurrent "
                f"one (nothing of it was written; run it again): {text.strip()}"
            ) from error
        raise


# SQLITE_CORRUPT; its extended codes (SQLITE_CORRUPT_INDEX, ...) keep it in the low byte.
_SQLITE_CORRUPT = 11
# data_corrupted, index_corrupted
_PG_CORRUPT_SQLSTATES = {"XX001", "XX002"}


def damaged_catalog(url: str, orig: BaseException | None) -> CatalogDamagedError | None:
    """The error for a driver error ``orig`` that says the catalog's database is damaged.

    None for any other error. SQLite reports damaged pages of its file as
    ``SQLITE_CORRUPT`` ("database disk image is malformed"), PostgreSQL as
    ``XX001`` or ``XX002``. The message says what to do: no retry helps.
    """
    text = str(orig).strip()
    code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF == _SQLITE_CORRUPT:
        try:
            path = sqlite_file(parse_url(url))
        except PolystoreError:
            path = None
        if path is None:
            return CatalogDamagedError(
                f"the SQLite catalog {_safe(url)} is damaged (SQLite: {text}); nothing was changed"
            )
        return CatalogDamagedError(
            f"the SQLite catalog file {path} is damaged (SQLite: {text}); nothing was "
            "changed. Restore it from a backup, or salvage what SQLite can still read with "
            f"`sqlite3 {path} .recover` (see 'A damaged catalog' in polystore's reliability "
            "docs), then check the result with `polystore fsck`"
        )
    if getattr(orig, "sqlstate", None) in _PG_CORRUPT_SQLSTATES:
        return CatalogDamagedError(
            f"the PostgreSQL catalog at {_safe(url)} is damaged (PostgreSQL: {text}); "
            "nothing was changed. A damaged index is rebuilt with REINDEX; damaged "
            "table data must be restored from a backup. Then check the catalog with "
            "`polystore fsck`"
        )
    return None


class JSONColumnError(CatalogDamagedError):
    """A JSON column of a catalog row holds text that is not JSON (SQLite keeps JSON as text).

    Raised while SQLAlchemy reads the row, where its path is not known: code
    that knows it raises a :class:`~polystore.errors.CatalogDamagedError`
    naming it instead.
    """


def load_json_column(text: str | bytes) -> Any:
    """``json.loads`` for the catalog's JSON columns: the engine's ``json_deserializer``.

    Text that another program wrote and that is not JSON raises
    :class:`JSONColumnError`, not ``json.JSONDecodeError``.
    """
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:  # (RecursionError: nested too deep)
        raise JSONColumnError(
            "a row of the catalog holds text that is not JSON in its shape, meta or attrs "
            f"column ({error}); polystore never writes that: `fsck()` lists the damaged rows, "
            "to repair or remove with SQL"
        ) from error


def _read_only_sqlite_directory(url: str, error: exc.DBAPIError) -> ReadOnlyError | None:
    """The error for a SQLite catalog in a directory this process cannot write.

    SQLite reads a WAL database through ``-wal`` and ``-shm`` files it creates
    beside it, so on a read-only file system or in a read-only directory even a
    ``mode=ro`` open fails, with "unable to open database file" (or "attempt to
    write a readonly database"): say why, and what opens it.
    """
    text = str(error.orig).strip()
    if not isinstance(error, exc.OperationalError) or not any(
        marker in text
        for marker in ("unable to open database file", "attempt to write a readonly database")
    ):
        return None
    try:
        parsed = parse_url(url)
    except PolystoreError:
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.query.get("immutable") in ("1", "true"):
        return None
    path = sqlite_file(parsed)
    if path is None:
        return None
    directory = os.path.dirname(path)
    if not os.path.isdir(directory) or os.access(directory, os.W_OK):
        return None
    if not os.path.exists(path):
        return ReadOnlyError(
            f"cannot create the SQLite catalog {path}: its directory is read-only (SQLite: {text})"
        )
    return ReadOnlyError(
        f"cannot open the SQLite catalog {path}: its directory is read-only (a read-only "
        "file system or directory), and SQLite must create its -wal and -shm files there, "
        f"even to read (SQLite: {text}). To read it in place, open "
        f"sqlite:///file:{path}?immutable=1&uri=true -- only while nothing changes the "
        "file -- or copy it somewhere writable"
    )


def _safe(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except exc.ArgumentError:
        return "<invalid URL>"


def retrying(
    operation: Callable[[], T],
    *,
    attempts: int = 12,
    base_delay: float = 0.005,
    max_delay: float = 0.25,
) -> T:
    """Run a whole write transaction, again on lock or serialization conflicts.

    Bounded: after ``attempts`` tries (about two seconds of back-off in all)
    the last error propagates. Each wait is drawn at random up to an
    exponentially growing cap ("full jitter"), so writers that collided do
    not collide again in step.
    """
    for attempt in range(1, attempts + 1):
        try:
            return operation()
        except (exc.DBAPIError, CatalogChanged) as error:
            if attempt == attempts or not is_retryable(error):
                raise
            time.sleep(random.uniform(0, min(max_delay, base_delay * 2**attempt)))
    raise AssertionError("unreachable")  # pragma: no cover
