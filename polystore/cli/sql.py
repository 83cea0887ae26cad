"""Running a user's SQL against a catalog, strictly read-only and for a limited time.

Two locks on each database, so that one slip is not enough to write:

* SQLite: the file is opened read-only (``mode=ro`` URI) with
  ``PRAGMA query_only``, and an authorizer lets through only reads -- no
  ``ATTACH`` (even of an in-memory database), no ``BEGIN``, no pragma that
  sets anything.
* PostgreSQL: the statement runs in a ``READ ONLY`` transaction that is always
  rolled back, as a prepared statement, so a string holding two statements
  (``SELECT 1; COMMIT; DELETE ...``) is refused.

A read-only transaction does not stop what acts outside the database's data:
on PostgreSQL a superuser's ``pg_terminate_backend()``, ``pg_reload_conf()``,
``pg_read_file()``, ``COPY ... TO PROGRAM`` or a ``DO`` block. The statement
must therefore start with ``SELECT``, ``WITH``, ``VALUES``, ``TABLE``,
``EXPLAIN``, ``SHOW``, ``SET`` or ``RESET``, and may not call the server
functions of :data:`_SERVER_FUNCTIONS` by name. That check reads the text, so
it catches accidents and nothing more: a function defined in the database may
call any of them.

Every statement runs under a time limit (:data:`DEFAULT_TIMEOUT`): a progress
handler with a deadline on SQLite, ``SET LOCAL statement_timeout`` on
PostgreSQL.

None of this is a security boundary: anyone holding the URL can write with
other tools. Give untrusted users a database role that may only ``SELECT``
(docs/querying.rst shows one).
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from polystore.errors import NotFoundError, ReadOnlyError

__all__ = ["DEFAULT_TIMEOUT", "QueryResult", "run_readonly"]

#: Seconds a statement may run before it is stopped (``polystore query --timeout``).
DEFAULT_TIMEOUT = 60.0


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


def _timed_out(timeout: float) -> click.ClickException:
    return click.ClickException(
        f"query stopped: it ran for longer than its limit of {timeout:g} s (nothing was "
        "changed); narrow it down, or allow more time with --timeout SECONDS (0: no limit)"
    )


def run_readonly(url: str, sql: str, *, timeout: float | None = DEFAULT_TIMEOUT) -> QueryResult:
    """Run one statement ``sql`` read-only against the catalog at ``url``.

    ``timeout``: seconds the statement may run (fetching its rows included);
    None or 0 for no limit.
    """
    from polystore.backends.sql.engine import parse_url, sqlite_file

    timeout = timeout or None
    dialect = parse_url(url).get_backend_name()
    if dialect == "sqlite":
        path = sqlite_file(url)
        if path is None:
            raise click.ClickException(
                f"{url} is an in-memory database; query needs a catalog file or server"
            )
        if not os.path.exists(path):
            raise NotFoundError(f"there is no catalog at {url} ({path} does not exist)")
        return _run_sqlite(url, path, sql, timeout)
    _check_postgresql_statement(sql)
    return _run_postgresql(url, sql, timeout)


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


#: SQLite virtual machine instructions between two looks at the clock (~0.5 ms of work).
_PROGRESS_STEPS = 10_000


def _run_sqlite(url: str, path: str, sql: str, timeout: float | None) -> QueryResult:
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    busy = 30.0 if timeout is None else min(30.0, timeout)
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=busy)
    except sqlite3.Error as exc:
        raise click.ClickException(f"cannot open {path} read-only: {exc}") from exc
    denied: list[str] = []
    deadline = None if timeout is None else time.monotonic() + timeout
    stopped: list[bool] = []

    def progress() -> int:
        # A non-zero answer interrupts the statement ("interrupted").
        if deadline is not None and time.monotonic() > deadline:
            stopped.append(True)
            return 1
        return 0

    try:
        conn.execute("PRAGMA query_only = ON")
        conn.set_authorizer(_authorizer(denied))
        if deadline is not None:
            conn.set_progress_handler(progress, _PROGRESS_STEPS)
        try:
            cursor = conn.execute(sql)
            rows = cursor.fetchall()
        except (sqlite3.Error, sqlite3.Warning) as exc:
            if stopped:
                assert timeout is not None
                raise _timed_out(timeout) from exc
            raise _sqlite_error(url, exc, denied) from exc
        columns = [d[0] for d in cursor.description or ()]
        return QueryResult(columns, [tuple(row) for row in rows])
    finally:
        conn.close()


def _authorizer(denied: list[str]) -> Callable[..., int]:
    """An SQLite authorizer that allows reads only, noting what it denied in ``denied``."""

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

    return authorize


def _sqlite_error(url: str, exc: Exception, denied: list[str]) -> Exception:
    """What a failed read-only statement on SQLite raises: a refusal, damage, or its error."""
    from polystore.backends.sql.engine import damaged_catalog

    if denied:
        return _refused(denied[0])
    damaged = damaged_catalog(url, exc)
    if damaged is not None:
        return damaged
    if any(text in str(exc) for text in ("readonly", "query_only", "may not be modified")):
        return _refused("write")
    return click.ClickException(f"SQL error: {exc}")


# -- PostgreSQL ----------------------------------------------------------------------------


#: What a statement may start with: reading, and settings that the rollback undoes.
_STATEMENTS = {"select", "with", "values", "table", "explain", "show", "set", "reset"}
#: PostgreSQL functions that act outside the transaction's data (on other
#: sessions, the server's configuration or files, replication), or that run
#: SQL given as text, past this check. A superuser may call them all, and a
#: read-only transaction stops none of them.
_SERVER_FUNCTIONS = frozenset(
    {
        "pg_cancel_backend", "pg_terminate_backend", "pg_reload_conf", "pg_rotate_logfile",
        "pg_log_backend_memory_contexts", "pg_read_file", "pg_read_binary_file", "pg_stat_file",
        "pg_ls_dir", "pg_ls_logdir", "pg_ls_waldir", "pg_ls_tmpdir", "pg_ls_archive_statusdir",
        "pg_ls_logicalsnapdir", "pg_ls_logicalmapdir", "pg_ls_replslotdir", "pg_file_write",
        "pg_file_rename", "pg_file_unlink", "pg_file_sync", "pg_logdir_ls", "lo_import",
        "lo_export", "pg_promote", "pg_switch_wal", "pg_create_restore_point",
        "pg_backup_start", "pg_backup_stop", "pg_start_backup", "pg_stop_backup",
        "pg_wal_replay_pause", "pg_wal_replay_resume", "pg_logical_emit_message",
        "pg_create_physical_replication_slot", "pg_create_logical_replication_slot",
        "pg_drop_replication_slot", "pg_copy_physical_replication_slot",
        "pg_copy_logical_replication_slot", "pg_replication_slot_advance",
        "pg_replication_origin_create", "pg_replication_origin_drop",
        "pg_replication_origin_advance", "pg_replication_origin_session_setup",
        "pg_stat_reset", "pg_stat_reset_shared", "pg_stat_reset_single_table_counters",
        "pg_stat_reset_single_function_counters", "pg_stat_reset_slru",
        "pg_stat_reset_replication_slot", "pg_stat_reset_subscription_stats",
        "dblink", "dblink_exec", "dblink_connect", "dblink_connect_u", "dblink_send_query",
        "query_to_xml", "query_to_xmlschema", "query_to_xml_and_xmlschema", "ts_stat",
    }
)  # fmt: skip
# Comments, string literals (standard, E'...', dollar-quoted), quoted identifiers,
# then words; what is not a word or a quoted identifier is skipped.
_TOKENS = re.compile(
    r"""
    (?P<comment>--[^\n]*|/\*.*?\*/)
    | (?P<escaped>[eE]'(?:[^'\\]|\\.|'')*')
    | (?P<string>'(?:[^']|'')*')
    | (?P<dollar>\$(?P<tag>[A-Za-z_][A-Za-z_0-9]*)?\$.*?\$(?P=tag)\$)
    | "(?P<quoted>(?:[^"]|"")*)"
    | (?P<word>[A-Za-z_][A-Za-z_0-9$]*)
    | (?P<call>\()
    """,
    re.VERBOSE | re.DOTALL,
)


def _check_postgresql_statement(sql: str) -> None:
    """Refuse statements and function calls a read-only transaction would not stop.

    A convenience against accidents, by the text alone (comments and string
    literals skipped, quoted names unquoted): anything defined in the database
    can still call these functions. The boundary is the role that connects.
    """
    words: list[str] = []
    called: list[str] = []
    for match in _TOKENS.finditer(sql):
        if match["call"] is not None:
            if words and words[-1] in _SERVER_FUNCTIONS:
                called.append(words[-1])
            words.append("(")
        elif match["word"] is not None:
            words.append(match["word"].lower())
        elif match["quoted"] is not None:
            words.append(match["quoted"].replace('""', '"'))
        elif match["comment"] is None:
            words.append("'")  # a literal: no function name
    first = next((w for w in words if w != "("), "")
    if first and first not in _STATEMENTS:
        raise ReadOnlyError(
            "refused: `polystore query` is read-only and runs only SELECT, WITH, VALUES, "
            f"TABLE, EXPLAIN, SHOW, SET and RESET statements, not {first.upper()}; "
            "the catalog was not changed"
        )
    if called:
        raise ReadOnlyError(
            f"refused: `polystore query` is read-only and does not call {called[0]}(), "
            "which acts outside the transaction (a check of the statement's text, not a "
            "security boundary: connect as a role that may only SELECT); the catalog was "
            "not changed"
        )


def _run_postgresql(url: str, sql: str, timeout: float | None) -> QueryResult:
    import sqlalchemy as sa

    from polystore.backends.sql.engine import (
        create_catalog_engine,
        damaged_catalog,
        translate_errors,
    )

    with translate_errors(url):
        engine = create_catalog_engine(url, poolclass=sa.pool.NullPool)  # (needs psycopg)
        import psycopg

        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SET TRANSACTION READ ONLY")
                if timeout is not None:
                    # LOCAL: for this transaction only, which is rolled back.
                    milliseconds = max(1, round(timeout * 1000))
                    conn.exec_driver_sql(f"SET LOCAL statement_timeout = {milliseconds}")
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
                    if exc.sqlstate == "57014" and "statement timeout" in message:
                        assert timeout is not None
                        raise _timed_out(timeout) from exc
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
