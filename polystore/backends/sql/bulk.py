"""Executemany on the hot paths, without per-row SQLAlchemy overhead.

A batch of 10,000 saves repeats the same few values (the timestamp, the JSON of a
shape or of an array's dtype metadata) in every row. SQLAlchemy would run each
column's bind processor once per row; here a statement is compiled once per
dialect, each *distinct* value is processed once (memoized by identity: the
callers share one object per distinct value), and the rows go straight to the
DBAPI cursor's ``executemany``.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.dialects import postgresql

from polystore.backends.sql.engine import driver_error

__all__ = ["BulkStatement", "bound", "params_for"]


#: Rows of a group from which :meth:`BulkStatement.execute_groups` writes the
#: group's constants into its SQLite statement as literals.
LITERALS_FROM = 100


def params_for(columns: Sequence[sa.ColumnClause[Any]]) -> dict[str, Any]:
    """``{key: bindparam(key)}`` for ``.values()``, typed like the columns."""
    return {c.key: sa.bindparam(c.key, type_=c.type) for c in columns}


_PG_DIALECT = postgresql.psycopg.dialect()  # type: ignore[no-untyped-call]


def _copy_type(column: sa.ColumnClause[Any]) -> str:
    """The PostgreSQL type name psycopg's binary COPY needs for ``column``."""
    impl = column.type.dialect_impl(_PG_DIALECT)
    if isinstance(impl, sa.JSON):
        return "jsonb"
    for sa_type, name in (
        (sa.BigInteger, "int8"),
        (sa.Integer, "int4"),
        (sa.DateTime, "timestamptz"),
        (sa.LargeBinary, "bytea"),
        (sa.String, "text"),
    ):
        if isinstance(impl, sa_type):
            return name
    raise TypeError(f"no COPY type for column {column.key}: {column.type!r}")


class BulkStatement:
    """A Core statement run with ``executemany`` over rows of plain values.

    With ``copy_into`` (a table name), plain inserts on PostgreSQL use binary
    ``COPY ... FROM STDIN`` instead: about twice the rows per second of a
    pipelined executemany. Only for inserts that cannot conflict.
    """

    def __init__(
        self,
        build: Callable[[str], Any],
        columns: Sequence[sa.ColumnClause[Any]],
        *,
        copy_into: str | None = None,
    ) -> None:
        #: ``build(dialect_name)`` returns the Core statement for that dialect, with a
        #: ``bindparam`` named after each column's key (see :func:`params_for`).
        self._build = build
        self._columns = list(columns)
        self._copy_into = copy_into
        self._compiled: dict[str, tuple[str, list[str] | None, list[Any]]] = {}

    def _copy(self, conn: Connection, rows: Iterable[Sequence[Any]]) -> None:
        names = ", ".join(c.key for c in self._columns)
        sql = f"COPY {self._copy_into} ({names}) FROM STDIN (FORMAT BINARY)"
        types = [_copy_type(c) for c in self._columns]
        documents = [i for i, t in enumerate(types) if t == "jsonb"]
        # JSON documents go as jsonb's binary input, made here once per
        # distinct document (rows share one object per distinct shape or
        # metadata) and sent as raw bytes: psycopg's JSON dumper would run
        # Python code for every row (~2 µs a document).
        jsonb = _JsonbMemo()
        for i in documents:
            types[i] = "bytea"
        # The psycopg connection itself: COPY is not part of the DBAPI. Its
        # errors (a concurrent writer's row taking the same key, a lock
        # timeout) are raised as SQLAlchemy raises the driver's, so retries and
        # error translation see no difference from any other statement.
        psycopg_conn: Any = conn.connection.driver_connection
        try:
            with psycopg_conn.cursor() as cursor, cursor.copy(sql) as copy:
                copy.set_types(types)
                for row in rows:
                    if documents:
                        row = list(row)
                        for i in documents:
                            if row[i] is not None:
                                row[i] = jsonb.encode(row[i])
                    copy.write_row(row)
        except conn.dialect.loaded_dbapi.Error as error:
            raise driver_error(conn, error, sql, many=True) from error

    def _prepare(self, conn: Connection) -> tuple[str, list[str] | None, list[Any]]:
        name = conn.dialect.name
        prepared = self._compiled.get(name)
        if prepared is None:
            dialect = conn.dialect
            compiled = self._build(name).compile(dialect=dialect)
            order = list(compiled.positiontup) if compiled.positional else None
            processors = [
                c.type.dialect_impl(dialect).bind_processor(dialect) for c in self._columns
            ]
            prepared = (str(compiled), order, processors)
            self._compiled[name] = prepared
        return prepared

    def _copies(self, conn: Connection) -> bool:
        return self._copy_into is not None and conn.dialect.name == "postgresql"

    def processors(self, conn: Connection) -> dict[str, Callable[[Any], Any]]:
        """``{column key: bind processor}`` for the columns whose values need one.

        For :meth:`execute_processed`: apply each once per distinct value (a
        batch repeats a few), not once per row.
        """
        if self._copies(conn):
            return {}  # COPY takes the Python values
        processors = self._prepare(conn)[2]
        return {
            c.key: process
            for c, process in zip(self._columns, processors, strict=True)
            if process is not None
        }

    def execute_processed(self, conn: Connection, rows: Iterable[Sequence[Any]]) -> None:
        """Like :meth:`execute`, for rows whose values went through :meth:`processors`.

        On SQLite ``rows`` may be a generator: it is streamed to the driver's
        ``executemany``, so the rows never all exist at once (and the garbage
        collector does not walk thousands of them). The columns must be listed
        in the order the compiled statement binds them (the table's order).
        """
        if self._copies(conn):
            rows = list(rows)
            if rows:
                self._copy(conn, rows)
            return
        sql, order, _ = self._prepare(conn)
        if order is not None and order != [c.key for c in self._columns]:
            raise AssertionError(f"columns not in statement order: {order}")
        if conn.dialect.name == "sqlite":
            _sqlite_executemany(conn, sql, rows)
            return
        params: list[Any] = list(rows)
        if params:
            if order is None:
                keys = [c.key for c in self._columns]
                params = [dict(zip(keys, row, strict=True)) for row in params]
            conn.exec_driver_sql(sql, params)

    def execute_groups(
        self,
        conn: Connection,
        groups: Iterable[tuple[Mapping[str, Any], Iterable[Sequence[Any]]]],
    ) -> None:
        """Run the statement for groups of rows whose columns in ``constants`` hold one value.

        Each group is ``(constants, rows)``: ``constants`` maps column keys to
        values (as :meth:`processors` made them) shared by every row of the
        group; each row holds the other columns, in column order. On SQLite a
        group of :data:`LITERALS_FROM` rows or more has its constants written
        into its statement as literals: with nothing to bind for them, 10,000
        file rows go in about a quarter faster. Values with no safe literal
        are bound, as are the constants of smaller groups and on every other
        database, where all groups go in one statement (one COPY).
        """
        keys = [c.key for c in self._columns]
        rest: list[tuple[Mapping[str, Any], Iterable[Sequence[Any]]]] = []
        for constants, rows in groups:
            # (A few rows: bound, by one statement SQLite has prepared before.
            # Literals make a new statement each time -- the timestamp is one --
            # which SQLite prepares anew: a save of ten files paid ~60 µs for it.)
            many = not isinstance(rows, Sized) or len(rows) >= LITERALS_FROM
            sql = self._with_literals(conn, constants) if many else None
            if sql is None:
                rest.append((constants, rows))
            else:
                _sqlite_executemany(conn, sql, rows)
        if rest:
            self.execute_processed(conn, _full_rows(keys, rest))

    def _with_literals(self, conn: Connection, constants: Mapping[str, Any]) -> str | None:
        """The SQLite statement with ``constants`` as literals, or None where that cannot be."""
        if conn.dialect.name != "sqlite":
            return None
        sql, order, _ = self._prepare(conn)
        literals = {k: _sql_literal(v) for k, v in constants.items()}
        # Every "?" of the compiled statement is a parameter (no string literals).
        if order is None or None in literals.values() or sql.count("?") != len(order):
            return None
        pieces = sql.split("?")
        out = [pieces[0]]
        for key, piece in zip(order, pieces[1:], strict=True):
            out.append(literals.get(key) or "?")
            out.append(piece)
        return "".join(out)

    def execute(self, conn: Connection, rows: Sequence[Sequence[Any]]) -> None:
        """Run the statement once per row; each row holds values in column order."""
        if not rows:
            return
        if self._copies(conn):
            self._copy(conn, rows)
            return
        sql, order, processors = self._prepare(conn)
        # Column by column: most columns need no processing at all, and the ones
        # that do repeat a handful of distinct values.
        columns: list[Sequence[Any]] = list(zip(*rows, strict=True))
        for i, process in enumerate(processors):
            if process is not None:
                columns[i] = _processed(columns[i], process)
        keys = [c.key for c in self._columns]
        if order is None:
            params: list[Any] = [
                dict(zip(keys, v, strict=True)) for v in zip(*columns, strict=True)
            ]
        elif order == keys:
            params = list(zip(*columns, strict=True))
        else:
            by_key = dict(zip(keys, columns, strict=True))
            params = list(zip(*(by_key[k] for k in order), strict=True))
        conn.exec_driver_sql(sql, params)


class _JsonbMemo:
    """JSON documents in jsonb's binary input form (version 1, then the text), by identity.

    Identity, not equality: ``1`` and ``True`` are equal but serialize
    differently. The memo holds each object, so no other takes its id.
    """

    __slots__ = ("_memo",)

    def __init__(self) -> None:
        self._memo: dict[int, tuple[Any, bytes]] = {}

    def encode(self, document: Any) -> bytes:
        hit = self._memo.get(id(document))
        if hit is None:
            text = json.dumps(document)
            hit = self._memo[id(document)] = (document, b"\x01" + text.encode())
        return hit[1]


def bound(processors: Mapping[str, Callable[[Any], Any]], key: str, value: Any) -> Any:
    """``value`` as column ``key`` sends it, given :meth:`BulkStatement.processors`."""
    process = processors.get(key)
    return value if process is None or value is None else process(value)


def _full_rows(
    keys: Sequence[str], groups: Iterable[tuple[Mapping[str, Any], Iterable[Sequence[Any]]]]
) -> Iterator[list[Any]]:
    """The rows of :meth:`BulkStatement.execute_groups`' groups, every column filled in."""
    for constants, rows in groups:
        varying = [i for i, k in enumerate(keys) if k not in constants]
        template = [constants.get(k) for k in keys]
        for row in rows:
            full = template.copy()
            for i, value in zip(varying, row, strict=True):
                full[i] = value
            yield full


def _sql_literal(value: Any) -> str | None:
    """``value`` as a SQLite literal, or None where it has no safe one."""
    if value is None:
        return "NULL"
    if type(value) is int:
        # Out of SQLite's 64-bit range a literal would be read as REAL; bound,
        # the driver refuses it (OverflowError), as it does everywhere else.
        return str(value) if -(2**63) <= value < 2**63 else None
    if type(value) is str and "\x00" not in value:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return None  # (binding it raises the driver's own error)
        return "'" + value.replace("'", "''") + "'"
    return None


def _sqlite_executemany(conn: Connection, sql: str, rows: Iterable[Sequence[Any]]) -> None:
    """``executemany`` on the sqlite3 cursor itself, errors raised as SQLAlchemy raises them.

    SQLAlchemy's ``exec_driver_sql`` wants a list of all the rows first; the
    driver takes any iterable. Driver errors become the same
    :class:`sqlalchemy.exc.DBAPIError` subclasses (``OperationalError`` for a
    busy database, ``IntegrityError``...), so retries and error translation
    see no difference. Statement events do not fire for these statements.
    """
    dbapi_conn: Any = conn.connection.driver_connection
    cursor = dbapi_conn.cursor()
    try:
        cursor.executemany(sql, rows)
    except sqlite3.Error as error:
        raise driver_error(conn, error, sql, many=True) from error
    finally:
        cursor.close()


def _processed(values: Sequence[Any], process: Callable[[Any], Any]) -> list[Any]:
    """``process`` applied to each value, once per distinct object.

    Memoized by identity, in C-level loops: a batch shares one object per
    distinct value (the timestamp, a shape's JSON document, an array's dtype
    metadata), so this is one call per distinct value. Identity, not equality:
    ``1``, ``1.0`` and ``True`` are equal but serialize differently.
    """
    ids = list(map(id, values))
    distinct = dict(zip(ids, values, strict=True))
    if len(distinct) == 1:
        value = values[0]
        return [None if value is None else process(value)] * len(values)
    memo = {key: None if value is None else process(value) for key, value in distinct.items()}
    return list(map(memo.__getitem__, ids))
