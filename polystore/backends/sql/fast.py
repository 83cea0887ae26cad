"""The read fast path: lookups over a DBAPI connection each thread keeps open.

A single ``load`` through SQLAlchemy costs a pool checkout, a ``BEGIN``, a
statement execution and a ``ROLLBACK``: ~200 µs, against ~8 µs for a raw
``sqlite3`` primary-key lookup. Reads outside a transaction need none of that
ceremony: in autocommit mode every ``SELECT`` sees one consistent snapshot of
committed data. So each thread keeps one driver connection checked out of the
engine's pool and runs pre-built SQL on it directly (psycopg prepares it
server-side after a few executions).

Reads inside :meth:`SQLBackend.transaction` never come here: they must see the
transaction's own writes.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from itertools import islice
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.pool import StaticPool

from polystore.backends.sql.inline import data_sql
from polystore.backends.sql.models import ROOT_ID

__all__ = [
    "JOIN_DEPTH",
    "LEAN_COLUMNS",
    "STREAM_ROWS",
    "FastReader",
    "Unavailable",
    "cached_kind_sql",
    "cached_load_sql",
    "children_sql",
    "load_columns",
    "locate_sql",
    "names_sql",
    "parse_json",
    "resolve_args",
    "resolve_sql",
    "walk_names",
    "walk_sql",
]

#: Most connections the fast path holds at once; more threads use the pool normally.
MAX_HELD = 8

#: Rows per chunk of a streamed result (:meth:`FastReader.stream_raw`). Small
#: chunks keep the server busy while the client decodes: for 10,000 arrays of
#: 4 KiB, chunks of 50-200 rows measured alike and 500 ~10% slower.
STREAM_ROWS = 100


# Marks this thread's connection as taken by a stream (see FastReader.stream_raw).
_STREAMING = object()


class Unavailable(Exception):
    """The fast path's connection failed mid-stream (it is dropped): use the slow path."""


def _streams_in_chunks() -> bool:
    """Whether psycopg can stream a result in chunks of rows (libpq 17 and later)."""
    try:
        import psycopg
    except ImportError:
        return False
    return psycopg.pq.version() >= 170000


def _no_statement_timeout(driver: Any) -> bool:
    """Whether no ``statement_timeout`` applies to this psycopg connection."""
    try:
        return driver.execute("SHOW statement_timeout").fetchone()[0] == "0"  # type: ignore[no-any-return]
    except Exception:  # noqa: BLE001 -- then do without streaming
        return False


def load_columns(node: str) -> str:
    """What a load reads of ``node`` and its blob ``b``, and nothing more.

    Every column costs a Python object per row, so the serializer, dtype,
    shape and meta are read as one integer, the file's ``kind_id``, which
    keys a cache of decoders (:mod:`~polystore.backends.sql.kinds`). Rows are
    ``kind, kind_id, size, blob_hash, store, data, checksums``: ``data`` is
    ``NULL`` for inline content over :data:`~.inline.WHOLE` bytes, read in
    pieces (:mod:`~polystore.backends.sql.inline`), and ``checksums`` are
    those of external content (:mod:`~polystore.backends.sql.checksums`).
    """
    return (
        f"{node}.kind, {node}.kind_id, {node}.size, {node}.blob_hash, b.store, {data_sql(node)}, "
        "b.checksums"
    )


def _placeholder(dialect: str) -> str:
    # Positional parameters: sqlite3 binds a list several times faster than a
    # dict of named ones (a 500-name IN list: ~2 µs a row less).
    return "%s" if dialect == "postgresql" else "?"


#: Paths up to this many names resolve through a chain of self-joins (fastest);
#: deeper ones through one recursive query. SQLite refuses joins of more than
#: 64 tables, and PostgreSQL's planner slows sharply on long join chains.
JOIN_DEPTH = 16


def walk_names(dialect: str, parts: Sequence[str]) -> Any:
    """The ``names`` parameter of :func:`walk_sql`."""
    return list(parts) if dialect == "postgresql" else json.dumps(list(parts))


def resolve_args(dialect: str, parts: Sequence[str]) -> list[Any]:
    """Parameters for :func:`resolve_sql` of the path ``parts``, in order."""
    if len(parts) > JOIN_DEPTH:
        return [walk_names(dialect, parts), len(parts), len(parts)]
    # The joins name p1 .. p{d-1}; the WHERE clause, last, names p0.
    return [*parts[1:], *parts[:1]]


def walk_sql(dialect: str, select: str, *, with_content: bool, named: bool = False) -> str:
    """A path of any depth resolved in one statement: a recursive walk from the root.

    The names come as one parameter ``names`` (a JSON array on SQLite, a text
    array on PostgreSQL) with ``depth`` their count; ``select`` lists columns
    of the node ``n`` (and of its blob ``b`` with ``with_content``). ``named``
    writes ``:names`` and ``:depth`` (for :func:`sqlalchemy.text`) instead of
    the driver's positional placeholders (``names, depth, depth``).
    """

    def param(name: str) -> str:
        return f":{name}" if named else _placeholder(dialect)

    if dialect == "postgresql":
        name_at = f"(CAST({param('names')} AS TEXT[]))[walk.depth + 1]"
    else:
        name_at = f"json_extract({param('names')}, '$[' || walk.depth || ']')"
    blob = "LEFT JOIN polystore_blobs AS b ON b.hash = n.blob_hash\n" if with_content else ""
    return (
        "WITH RECURSIVE walk (id, depth) AS (\n"
        "    SELECT CAST(0 AS BIGINT), 0\n"
        "    UNION ALL\n"
        "    SELECT n.id, walk.depth + 1 FROM walk\n"
        f"    JOIN polystore_nodes AS n ON n.parent_id = walk.id AND n.name = {name_at}\n"
        f"    WHERE walk.depth < {param('depth')}\n"
        ")\n"
        f"SELECT {select}\n"
        "FROM walk JOIN polystore_nodes AS n ON n.id = walk.id\n"
        f"{blob}"
        f"WHERE walk.depth = {param('depth')}"
    )


@lru_cache(maxsize=128)
def resolve_sql(dialect: str, depth: int, what: str = "kind") -> str:
    """SQL for the node at a path of ``depth`` names; see :func:`resolve_args`.

    ``what`` is ``"kind"`` (``id, kind`` only), ``"place"`` (``id, kind``,
    then the parent's id and the tree version, for :func:`cached_kind_sql`:
    ``exists`` and friends) or ``"load"`` (:func:`load_columns`: what a load
    needs, with the blob's placement and inline bytes; then the parent's id
    and the tree version, for :func:`cached_load_sql`).
    """
    with_content = what == "load"
    if depth > JOIN_DEPTH:
        return walk_sql(dialect, _select(dialect, what, "n"), with_content=with_content)
    last = f"n{depth - 1}" if depth else "n0"
    sql = [f"SELECT {_select(dialect, what, last)}", "FROM polystore_nodes AS n0"]
    for i in range(1, depth):
        sql.append(
            f"JOIN polystore_nodes AS n{i} ON n{i}.parent_id = n{i - 1}.id "
            f"AND n{i}.name = {_placeholder(dialect)}"
        )
    if with_content:
        sql.append(f"LEFT JOIN polystore_blobs AS b ON b.hash = {last}.blob_hash")
    if depth:
        sql.append(f"WHERE n0.parent_id = 0 AND n0.name = {_placeholder(dialect)}")
    else:
        sql.append("WHERE n0.id = 0")
    return "\n".join(sql)


@lru_cache(maxsize=256)
def locate_sql(dialect: str, depths: tuple[int, ...]) -> str:
    """One statement for the nodes at paths of these depths (each <= JOIN_DEPTH).

    One ``SELECT`` per path, each a chain of joins as in :func:`resolve_sql`,
    glued by ``UNION ALL`` and told apart by their first column; the
    parameters are each path's names in :func:`resolve_args` order; rows are
    ``slot, id, parent_id, name, kind``, ``slot`` the path's place in the list.
    """
    mark = _placeholder(dialect)
    arms = []
    for slot, depth in enumerate(depths):
        if not depth:
            arms.append(
                f"SELECT {slot}, id, parent_id, name, kind FROM polystore_nodes WHERE id = {ROOT_ID}"
            )
            continue
        last = f"n{depth - 1}"
        sql = [f"SELECT {slot}, {last}.id, {last}.parent_id, {last}.name, {last}.kind"]
        sql.append("FROM polystore_nodes AS n0")
        for i in range(1, depth):
            sql.append(
                f"JOIN polystore_nodes AS n{i} ON n{i}.parent_id = n{i - 1}.id "
                f"AND n{i}.name = {mark}"
            )
        sql.append(f"WHERE n0.parent_id = {ROOT_ID} AND n0.name = {mark}")
        arms.append(" ".join(sql))
    return "\nUNION ALL\n".join(arms)


def _select(dialect: str, what: str, node: str) -> str:
    if what == "kind":
        return f"{node}.id, {node}.kind"
    if what == "place":
        return f"{node}.id, {node}.kind, {node}.parent_id, {_TREE_VERSION}"
    # A load also reads where its directory is, for the cache of cached_load_sql.
    return f"{load_columns(node)}, {node}.parent_id, {_TREE_VERSION}"


_TREE_VERSION = "(SELECT version FROM polystore_tree_version WHERE id = 1)"


@lru_cache(maxsize=4)
def cached_load_sql(dialect: str, *, lean: bool = False) -> str:
    """SQL to load ``[parent_id, name, version]``: a file in a directory known by id.

    No row if the file is missing *or* the tree version is no longer
    ``version`` (a directory moved or was deleted since the id was read: the
    id may now be at another path). Either way, resolve the whole path. Rows
    are :func:`load_columns`, or with ``lean`` only :data:`_LEAN` (each column
    costs a load some 0.2-0.35 µs on SQLite: the lean row of a small array
    takes ~3.6 µs, the full row ~4.6).
    """
    p = _placeholder(dialect)
    columns = _LEAN if lean else load_columns("n")
    return _child_load_sql(dialect, columns, f"= {p} AND {_TREE_VERSION} = {p}")


@lru_cache(maxsize=2)
def cached_kind_sql(dialect: str) -> str:
    """SQL for ``[parent_id, name]``: the tree version, and the child's ``id, kind`` if any.

    Always one row: ``(version, None, None)`` when the directory holds no such
    name. While the version is the one the directory's id was read at, that
    is the answer: one indexed lookup instead of a join per level. Otherwise
    resolve the whole path.
    """
    p = _placeholder(dialect)
    return (
        "SELECT v.version, n.id, n.kind FROM polystore_tree_version AS v "
        f"LEFT JOIN polystore_nodes AS n ON n.parent_id = {p} AND n.name = {p} "
        "WHERE v.id = 1"
    )


@lru_cache(maxsize=8)
def names_sql(dialect: str) -> str:
    """SQL for the names in directory ``[parent]``, by code point (the index order)."""
    return (
        f"SELECT name FROM polystore_nodes WHERE parent_id = {_placeholder(dialect)} ORDER BY name"
    )


#: What a batch load reads of each file first (:func:`children_sql` with
#: ``lean``): the kind id where the content is inline -- ``NULL`` for a
#: directory, content in a blob store or a file without a kind id, all of which
#: are read again in full -- then the size, the inline bytes (``NULL`` over
#: :data:`~.inline.WHOLE`: read again too) and the name. Three
#: text columns fewer than :func:`load_columns` per row.
_LEAN = f"CASE WHEN b.store = 'inline' THEN n.kind_id END, n.size, {data_sql('n')}"
LEAN_COLUMNS = f"{_LEAN}, n.name"


@lru_cache(maxsize=128)
def children_sql(dialect: str, count: int, *, lean: bool = False) -> str:
    """SQL for ``count`` children of one directory, to load: ``[parent, *names]``.

    On PostgreSQL the names are one text parameter, joined by ``/`` (which no
    name holds), ``[parent, "a/b/c"]``, for any ``count``: psycopg dumps a list
    of strings in Python, a few µs each. Rows are :func:`load_columns` and
    then the name, or with ``lean`` the :data:`LEAN_COLUMNS`.
    """
    if dialect == "postgresql":
        names = "= ANY(string_to_array(%s, '/'))"
    else:
        names = f"IN ({', '.join(['?'] * count)})"
    columns = LEAN_COLUMNS if lean else f"{load_columns('n')}, n.name"
    return _child_load_sql(dialect, columns, names)


def _child_load_sql(dialect: str, columns: str, name_test: str) -> str:
    """``columns`` of children of ``[parent, ...]`` whose name passes, and of their blobs ``b``."""
    return (
        f"SELECT {columns} FROM polystore_nodes AS n "
        "LEFT JOIN polystore_blobs AS b ON b.hash = n.blob_hash "
        f"WHERE n.parent_id = {_placeholder(dialect)} AND n.name {name_test}"
    )


@lru_cache(maxsize=4096)
def parse_json(text: str | None) -> Any:
    """A JSON column as the fast path reads it: text, or None.

    Shapes and dtype metadata repeat across files, so parsed documents are
    cached: they are shared, and read-only for every caller.
    """
    return None if text is None else json.loads(text)


# A forked child must not use (nor close) its parent's connections: closing
# would end the parent's session on the shared socket. Each fork moves on a
# generation; connections of an older one are forgotten.
_generation = 0


def _after_fork() -> None:
    global _generation
    _generation += 1


os.register_at_fork(after_in_child=_after_fork)


class FastReader:
    """Per-thread driver connections for reads outside transactions."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._dialect = engine.dialect.name
        self._local = threading.local()
        self._held: list[Any] = []
        self._lock = threading.Lock()
        self._generation = _generation
        # An in-memory SQLite database is one connection shared by every
        # thread (a StaticPool): reading on it would see another thread's
        # uncommitted writes. Such backends read through SQLAlchemy only.
        self._enabled = not isinstance(engine.pool, StaticPool)
        #: :meth:`stream_raw` is available (PostgreSQL with libpq 17 or later).
        self.streams = self._dialect == "postgresql" and _streams_in_chunks()
        # Connections whose stream is open, and a count of close() calls: a
        # stream's connection is locked by the driver until the stream ends,
        # so close() leaves it to the stream, which closes it when it ends.
        self._streaming: set[Any] = set()
        self._closes = 0

    def _connection(self) -> Any | None:
        if not self._enabled:
            return None
        held = getattr(self._local, "held", None)
        if held is not None and held[0] == _generation:
            return held[2]
        if held is not None and held[0] is _STREAMING:
            return None  # a read from within a stream's loop: the slow path
        with self._lock:
            if held is not None or _generation != self._generation:
                # Inherited across a fork: forget, never close.
                self._held = [] if _generation != self._generation else self._held
                self._generation = _generation
            if len(self._held) >= MAX_HELD:
                return None
            fairy = self._engine.raw_connection()
            driver: Any = fairy.driver_connection
            may_stream = False
            cursor = None
            if self._dialect == "postgresql":
                driver.autocommit = True
                may_stream = self.streams and _no_statement_timeout(driver)
            else:
                # fetch_raw's cursor on SQLite: one made per call costs a load
                # ~0.15 µs. (Not psycopg's, which would keep its last result,
                # up to a chunk of large values, until the thread's next read.)
                cursor = driver.cursor()
            self._held.append(fairy)
        # (generation, pooled connection, driver's connection, may it stream, cursor)
        self._local.held = (_generation, fairy, driver, may_stream, cursor)
        return driver

    def can_stream(self) -> bool:
        """Whether this thread's connection may use :meth:`stream_raw` now.

        Not where a ``statement_timeout`` applies: a streamed query stays
        active while the caller decodes, and the timeout would count that
        time too, cancelling a long batch half way.
        """
        held = getattr(self._local, "held", None)
        return held is not None and held[0] == _generation and held[3]

    def _discard(self) -> None:
        held = getattr(self._local, "held", None)
        self._local.held = None
        if held is not None:
            with self._lock:
                if held[1] in self._held:
                    self._held.remove(held[1])
            if held[1].is_valid:  # (not if close() closed it meanwhile)
                held[1].invalidate()

    @contextmanager
    def snapshot(self) -> Iterator[bool]:
        """One consistent snapshot for several fetches; yields False if unavailable."""
        conn = self._connection()
        if conn is None:
            yield False
            return
        # PostgreSQL's READ COMMITTED would give each statement its own snapshot.
        begin = (
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
            if self._dialect == "postgresql"
            else "BEGIN"
        )
        try:
            conn.execute(begin)
        except Exception:  # noqa: BLE001 -- any failure: fall back to the slow path
            self._discard()
            yield False
            return
        try:
            yield True
        finally:
            held = getattr(self._local, "held", None)
            if held is not None and held[2] is conn:
                try:
                    conn.execute("COMMIT")
                except Exception:  # noqa: BLE001 -- a dead connection is dropped
                    self._discard()

    def fetch_raw(self, sql: str, params: Sequence[Any]) -> list[Any] | None:
        """Plain result tuples for ``sql``, or None when the fast path is unavailable."""
        conn = self._connection()
        if conn is None:
            return None
        try:
            if self._dialect == "postgresql":
                # Binary results: bytea arrives as raw bytes, not hex text that
                # doubles the client's memory and must be decoded.
                return conn.execute(sql, params, binary=True).fetchall()  # type: ignore[no-any-return]
            return self._local.held[4].execute(sql, params).fetchall()  # type: ignore[no-any-return]
        except Exception:  # noqa: BLE001
            # A broken connection (server restart) is dropped; the caller
            # retries through SQLAlchemy, which reports the error properly.
            self._discard()
            return None

    def stream_raw(
        self, sql: str, params: Sequence[Any], size: int
    ) -> Generator[list[Any], None, None]:
        """Result tuples of ``sql`` in lists of up to ``size``, as the server sends them.

        PostgreSQL only (see :meth:`can_stream`). One query, read in chunks: the
        server reads and sends the next rows while the caller works on these,
        and the client never holds more than a chunk (10,000 small arrays load
        in ~25% less time than by one query per chunk of names). Raises
        :class:`Unavailable` if the connection fails; stopping early cancels
        the rest of the query.
        """
        conn = self._connection()
        if conn is None:
            raise Unavailable
        held = self._local.held
        fairy = held[1]
        with self._lock:
            self._streaming.add(fairy)
            closes = self._closes
        try:
            # The driver keeps its connection locked until the stream ends: any
            # other read on this thread meanwhile (a serializer that loads) must
            # not wait for it, so it takes the slow path.
            self._local.held = (_STREAMING, *held[1:])
            try:
                cursor = conn.cursor()
            except Exception:  # noqa: BLE001 -- a closed connection
                self._discard()
                raise Unavailable from None
            rows = cursor.stream(sql, params, binary=True, size=size)
            try:
                while True:
                    try:
                        chunk = list(islice(rows, size))
                    except Exception:  # noqa: BLE001
                        self._discard()
                        raise Unavailable from None
                    if not chunk:
                        return
                    yield chunk
            finally:
                rows.close()
                cursor.close()
        finally:
            with self._lock:
                self._streaming.discard(fairy)
                closed = self._closes != closes
            if self._local.held is not None:  # (None: discarded)
                self._local.held = None if closed else held
                if closed:
                    fairy.invalidate()  # close() left it to this stream

    def close(self) -> None:
        with self._lock:
            held, self._held = self._held, []
            self._closes += 1
            streaming = set(self._streaming)
        for fairy in held:
            if fairy in streaming:
                continue  # locked by its stream, which closes it when it ends
            try:
                if self._dialect == "postgresql":
                    fairy.driver_connection.autocommit = False
                fairy.close()
            except Exception:  # noqa: BLE001, S110 -- closing is best effort on shutdown
                pass
