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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, NamedTuple

from sqlalchemy import Engine

__all__ = ["JOIN_DEPTH", "FastReader", "FastRow", "resolve_params", "resolve_sql", "walk_sql"]

#: Most connections the fast path holds at once; more threads use the pool normally.
MAX_HELD = 8


class FastRow(NamedTuple):
    """The node columns a load needs, plus its blob's placement and inline bytes."""

    id: int
    parent_id: int | None
    name: str
    kind: str
    size: int | None
    serializer: str | None
    dtype: str | None
    shape: Any
    meta: Any
    blob_hash: str | None
    store: str | None
    data: Any


_COLUMNS = "{n}.id, {n}.parent_id, {n}.name, {n}.kind, {n}.size, {n}.serializer, {n}.dtype, {n}.shape, {n}.meta, {n}.blob_hash"


def _placeholder(dialect: str, name: str) -> str:
    return f"%({name})s" if dialect == "postgresql" else f":{name}"


#: Paths up to this many names resolve through a chain of self-joins (fastest);
#: deeper ones through one recursive query. SQLite refuses joins of more than
#: 64 tables, and PostgreSQL's planner slows sharply on long join chains.
JOIN_DEPTH = 16


def resolve_params(dialect: str, parts: Sequence[str]) -> dict[str, Any]:
    """Parameters for :func:`resolve_sql` of the path ``parts``."""
    if len(parts) > JOIN_DEPTH:
        names: Any = list(parts) if dialect == "postgresql" else json.dumps(list(parts))
        return {"names": names, "depth": len(parts)}
    return {f"p{i}": name for i, name in enumerate(parts)}


def walk_sql(dialect: str, select: str, *, with_content: bool, named: bool = False) -> str:
    """A path of any depth resolved in one statement: a recursive walk from the root.

    The names come as one parameter ``names`` (a JSON array on SQLite, a text
    array on PostgreSQL) with ``depth`` their count; ``select`` lists columns
    of the node ``n`` (and of its blob ``b`` with ``with_content``). ``named``
    writes ``:name`` placeholders (for :func:`sqlalchemy.text`) instead of the
    driver's own.
    """

    def param(name: str) -> str:
        return f":{name}" if named else _placeholder(dialect, name)

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
def resolve_sql(dialect: str, depth: int, what: str = "node") -> str:
    """SQL for the node at a path of ``depth`` names; see :func:`resolve_params`.

    ``what`` is ``"kind"`` (``id, kind`` only: ``exists`` and friends),
    ``"node"`` (the :class:`FastRow` columns, no content) or ``"content"`` (with
    the blob's placement and inline bytes).
    """
    if depth > JOIN_DEPTH:
        columns = "n.id, n.kind" if what == "kind" else _COLUMNS.format(n="n")
        if what == "node":
            columns += ", NULL, NULL"
        elif what == "content":
            columns += ", b.store, b.data"
        return walk_sql(dialect, columns, with_content=what == "content")
    last = f"n{depth - 1}" if depth else "n0"
    if what == "kind":
        sql = [f"SELECT {last}.id, {last}.kind"]
    else:
        sql = [f"SELECT {_COLUMNS.format(n=last)}"]
        sql.append(", b.store, b.data" if what == "content" else ", NULL, NULL")
    sql.append("FROM polystore_nodes AS n0")
    for i in range(1, depth):
        sql.append(
            f"JOIN polystore_nodes AS n{i} ON n{i}.parent_id = n{i - 1}.id "
            f"AND n{i}.name = {_placeholder(dialect, f'p{i}')}"
        )
    if what == "content":
        sql.append(f"LEFT JOIN polystore_blobs AS b ON b.hash = {last}.blob_hash")
    if depth:
        sql.append(f"WHERE n0.parent_id = 0 AND n0.name = {_placeholder(dialect, 'p0')}")
    else:
        sql.append("WHERE n0.id = 0")
    return "\n".join(sql)


@lru_cache(maxsize=8)
def names_sql(dialect: str) -> str:
    """SQL for the names in directory ``parent``, by code point (the index order)."""
    return (
        "SELECT name FROM polystore_nodes "
        f"WHERE parent_id = {_placeholder(dialect, 'parent')} ORDER BY name"
    )


@lru_cache(maxsize=64)
def children_sql(dialect: str, count: int) -> str:
    """SQL for the files named ``c0`` .. ``c{count-1}`` under parent ``parent``, with content."""
    names = ", ".join(_placeholder(dialect, f"c{i}") for i in range(count))
    return (
        f"SELECT {_COLUMNS.format(n='n')}, b.store, b.data FROM polystore_nodes AS n "
        "LEFT JOIN polystore_blobs AS b ON b.hash = n.blob_hash "
        f"WHERE n.parent_id = {_placeholder(dialect, 'parent')} AND n.name IN ({names})"
    )


@lru_cache(maxsize=4096)
def _parse_json(text: str) -> Any:
    # SQLite hands JSON back as text. Shapes and dtype metadata repeat across
    # files, so parsed documents are cached (and read-only for every caller).
    return json.loads(text)


def _row(raw: Sequence[Any]) -> FastRow:
    shape, meta = raw[7], raw[8]
    if shape.__class__ is str:
        shape = _parse_json(shape)
    if meta.__class__ is str:
        meta = _parse_json(meta)
    return FastRow(raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], shape, meta, *raw[9:])


@lru_cache(maxsize=4096)
def _parse_jsonb(data: bytes) -> Any:
    return json.loads(data)


def _load_jsonb(data: Any) -> Any:
    # psycopg's loader for JSONB on fast connections: the same few shapes and
    # dtype descriptions repeat across thousands of rows.
    return _parse_jsonb(bytes(data))


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

    def _connection(self) -> Any | None:
        held = getattr(self._local, "held", None)
        if held is not None and held[0] == _generation:
            return held[2]
        with self._lock:
            if held is not None or _generation != self._generation:
                # Inherited across a fork: forget, never close.
                self._held = [] if _generation != self._generation else self._held
                self._generation = _generation
            if len(self._held) >= MAX_HELD:
                return None
            fairy = self._engine.raw_connection()
            driver: Any = fairy.driver_connection
            if self._dialect == "postgresql":
                from psycopg.types.json import set_json_loads

                driver.autocommit = True
                set_json_loads(_load_jsonb, driver)
            self._held.append(fairy)
        self._local.held = (_generation, fairy, driver)
        return driver

    def _discard(self) -> None:
        held = getattr(self._local, "held", None)
        self._local.held = None
        if held is not None:
            with self._lock:
                if held[1] in self._held:
                    self._held.remove(held[1])
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

    def fetch_raw(self, sql: str, params: dict[str, Any]) -> list[Any] | None:
        """Plain result tuples for ``sql``, or None when the fast path is unavailable."""
        conn = self._connection()
        if conn is None:
            return None
        try:
            if self._dialect == "postgresql":
                # Binary results: bytea arrives as raw bytes, not hex text that
                # doubles the client's memory and must be decoded.
                return conn.execute(sql, params, binary=True).fetchall()  # type: ignore[no-any-return]
            return conn.execute(sql, params).fetchall()  # type: ignore[no-any-return]
        except Exception:  # noqa: BLE001
            # A broken connection (server restart) is dropped; the caller
            # retries through SQLAlchemy, which reports the error properly.
            self._discard()
            return None

    def fetch(self, sql: str, params: dict[str, Any]) -> list[FastRow] | None:
        """:class:`FastRow` results for ``sql``, or None when unavailable."""
        rows = self.fetch_raw(sql, params)
        return None if rows is None else [_row(r) for r in rows]

    def close(self) -> None:
        with self._lock:
            held, self._held = self._held, []
        for fairy in held:
            try:
                if self._dialect == "postgresql":
                    fairy.driver_connection.autocommit = False
                fairy.close()
            except Exception:  # noqa: BLE001, S110 -- closing is best effort on shutdown
                pass
