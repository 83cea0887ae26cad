"""Running a user's SQL against a catalog, strictly read-only.

Two locks on each database, so that one slip is not enough to write:

* SQLite: the file is opened read-only (``mode=ro`` URI) with
  ``PRAGMA query_only``, and an authorizer lets through only reads -- no
  ``ATTACH`` (even of an in-memory database), no ``BEGIN``, no pragma that
  sets anything.
* PostgreSQL: the statement runs in a ``READ ONLY`` transaction that is always
  rolled back, as a prepared statement, so a string holding two statements
  (``SELECT 1; COMMIT; DELETE ...``) is refused.

This is a guard against accidents, not a security boundary: anyone holding the
URL can write with other tools. Give untrusted users a database role that may
only ``SELECT``.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from dataclasses import dataclass
from typing import Any

import click

from polystore.cli.app import sqlite_file
from polystore.errors import NotFoundError, ReadOnlyError

__all__ = ["QueryResult", "run_readonly"]


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


def _refused(what: str) -> ReadOnlyError:
    return ReadOnlyError(
        f"refused: `polystore query` is read-only, and this statement would {what}; "
        "the catalog was not changed"
    )


def run_readonly(url: str, sql: str) -> QueryResult:
    """Run one statement ``sql`` read-only against the catalog at ``url``."""
    from polystore.backends.sql.engine import parse_url

    dialect = parse_url(url).get_backend_name()
    if dialect == "sqlite":
        path = sqlite_file(url)
        if path is None:
            raise click.ClickException(
                f"{url} is an in-memory database; query needs a catalog file or server"
            )
        if not os.path.exists(path):
            raise NotFoundError(f"there is no catalog at {url} ({path} does not exist)")
        return _run_sqlite(url, path, sql)
    return _run_postgresql(url, sql)


# -- SQLite ------------------------------------------------------------------------------

_READS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION}
_READS.add(getattr(sqlite3, "SQLITE_RECURSIVE", 33))  # WITH RECURSIVE (constant since 3.11)
#: Pragmas that only report; their argument, if any, names a table or index.
_INFO_PRAGMAS = {
    "table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo",
    "foreign_key_list", "foreign_key_check", "integrity_check", "quick_check",
}  # fmt: skip
#: Pragmas that report without an argument and change something with one.
_VALUE_PRAGMAS = {
    "application_id", "collation_list", "compile_options", "data_version", "database_list",
    "encoding", "foreign_keys", "freelist_count", "function_list", "journal_mode",
    "module_list", "page_count", "page_size", "pragma_list", "schema_version", "user_version",
}  # fmt: skip
_SCHEMA_TABLES = {"sqlite_master", "sqlite_schema", "sqlite_temp_master", "sqlite_temp_schema"}
_ACTIONS = {
    getattr(sqlite3, f"SQLITE_{name}"): name.lower().replace("_", " ")
    for name in (
        "CREATE_INDEX", "CREATE_TABLE", "CREATE_TEMP_INDEX", "CREATE_TEMP_TABLE",
        "CREATE_TEMP_TRIGGER", "CREATE_TEMP_VIEW", "CREATE_TRIGGER", "CREATE_VIEW", "DELETE",
        "DROP_INDEX", "DROP_TABLE", "DROP_TEMP_INDEX", "DROP_TEMP_TABLE", "DROP_TEMP_TRIGGER",
        "DROP_TEMP_VIEW", "DROP_TRIGGER", "DROP_VIEW", "INSERT", "PRAGMA", "TRANSACTION",
        "UPDATE", "ATTACH", "DETACH", "ALTER_TABLE", "REINDEX", "ANALYZE", "CREATE_VTABLE",
        "DROP_VTABLE", "SAVEPOINT",
    )
}  # fmt: skip


def _pragma_allowed(name: str | None, argument: str | None) -> bool:
    name = (name or "").lower()
    return name in _INFO_PRAGMAS or (name in _VALUE_PRAGMAS and argument is None)


def _run_sqlite(url: str, path: str, sql: str) -> QueryResult:
    from polystore.backends.sql.engine import damaged_catalog

    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=30)
    except sqlite3.Error as exc:
        raise click.ClickException(f"cannot open {path} read-only: {exc}") from exc
    denied: list[str] = []

    def authorize(
        action: int, arg1: str | None, arg2: str | None, _db: str | None, _src: str | None
    ) -> int:
        if action in _READS or (action == sqlite3.SQLITE_PRAGMA and _pragma_allowed(arg1, arg2)):
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_UPDATE and arg1 in _SCHEMA_TABLES:
            # Table-valued pragmas (pragma_table_info(...)) are authorized as an
            # UPDATE of sqlite_master's columns when they are set up. A real one
            # needs PRAGMA writable_schema (refused) and a writable file (it is not).
            return sqlite3.SQLITE_OK
        if arg1 in _SCHEMA_TABLES:
            # DROP and CREATE are first checked as writes to the schema table.
            denied.append("change the schema")
            return sqlite3.SQLITE_DENY
        what = _ACTIONS.get(action, f"perform SQLite action {action}")
        target = arg1 if action != sqlite3.SQLITE_PRAGMA else f"{arg1}={arg2}" if arg2 else arg1
        denied.append(f"{what} {target}" if target else what)
        return sqlite3.SQLITE_DENY

    try:
        conn.execute("PRAGMA query_only = ON")
        conn.set_authorizer(authorize)
        try:
            cursor = conn.execute(sql)
            rows = cursor.fetchall()
        except (sqlite3.Error, sqlite3.Warning) as exc:
            if denied:
                raise _refused(denied[0]) from exc
            damaged = damaged_catalog(url, exc)
            if damaged is not None:
                raise damaged from exc
            if any(text in str(exc) for text in ("readonly", "query_only", "may not be modified")):
                raise _refused("write") from exc
            raise click.ClickException(f"SQL error: {exc}") from exc
        columns = [d[0] for d in cursor.description or ()]
        return QueryResult(columns, [tuple(row) for row in rows])
    finally:
        conn.close()


# -- PostgreSQL ----------------------------------------------------------------------------


def _run_postgresql(url: str, sql: str) -> QueryResult:
    import psycopg
    import sqlalchemy as sa

    from polystore.backends.sql.engine import (
        create_catalog_engine,
        damaged_catalog,
        translate_errors,
    )

    with translate_errors(url):
        engine = create_catalog_engine(url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SET TRANSACTION READ ONLY")
                driver = conn.connection.driver_connection
                assert driver is not None
                try:
                    with driver.cursor() as cursor:
                        # A prepared statement holds exactly one statement.
                        cursor.execute(sql, prepare=True)
                        columns = [d.name for d in cursor.description or ()]
                        rows = cursor.fetchall() if cursor.description else []
                except psycopg.Error as exc:
                    message = (exc.diag.message_primary or str(exc)).strip()
                    if exc.sqlstate == "25006":  # read_only_sql_transaction
                        raise _refused(f"write ({message})") from exc
                    damaged = damaged_catalog(url, exc)
                    if damaged is not None:
                        raise damaged from exc
                    if "multiple commands" in message:
                        raise click.ClickException("query runs one statement at a time") from exc
                    raise click.ClickException(f"SQL error: {message}") from exc
                finally:
                    conn.rollback()
        finally:
            engine.dispose()
    return QueryResult(columns, [tuple(row) for row in rows])
