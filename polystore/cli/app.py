"""The ``polystore`` group: global options, the catalog commands open, error handling.

Every command works on one catalog, named by a database URL: the ``--url``
option (accepted before the command or after it), else ``POLYSTORE_URL``, else
``sqlite:///polystore.db``.

Errors a user can cause -- a bad URL, a missing path, a directory where a file
was expected, an outdated schema, an unreachable server, a permission problem --
are polystore errors or ``OSError``\\ s. :class:`PolystoreGroup` turns them into
one line on stderr and exit status 1; ``--debug`` lets the traceback through.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import click

from polystore.errors import NotFoundError, PolystoreError

if TYPE_CHECKING:
    from polystore.backends.sql import SQLBackend

__all__ = [
    "DEFAULT_URL",
    "PolystoreGroup",
    "State",
    "describe_user_error",
    "json_option",
    "main",
    "pass_state",
    "url_option",
]

# The same default as polystore.backends.sql.engine.DEFAULT_URL, repeated so that
# `polystore --help` does not import SQLAlchemy.
DEFAULT_URL = "sqlite:///polystore.db"

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class State:
    """What the global options chose; commands receive it with :data:`pass_state`."""

    url: str = DEFAULT_URL
    blob_store: str | None = None
    debug: bool = False
    quiet: bool = False
    #: ``--at``: the read commands read this snapshot (see :mod:`.snapshots`).
    at: str | None = None
    _backend: SQLBackend | None = None

    #: Set by a long command (put, get) while it runs: what is done so far, for
    #: the one line printed when it is interrupted (Ctrl-C).
    interrupted_note: str | None = None

    def backend(self, *, create: bool = False) -> SQLBackend:
        """The catalog at :attr:`url`, opened once per command.

        Commands that only read pass ``create=False``: a SQLite file that does
        not exist is then an error (most likely a typo in the URL) instead of a
        new, empty catalog. An in-memory SQLite URL (``sqlite://``) is refused:
        whatever a command did there would be gone when it exits.
        """
        if self._backend is None:
            check_persistent(self.url)
            if not create:
                self.require_catalog()
            from polystore.backends.sql import SQLBackend

            self._backend = SQLBackend(self.url, blob_store=self.blob_store)
        if self.at is not None:  # (a read-only view that answers as SQLBackend does)
            from polystore.cli.snapshots import open_at

            return open_at(self._backend, self.at)  # type: ignore[no-any-return]
        return self._backend

    def require_catalog(self) -> None:
        """Raise :class:`~polystore.errors.NotFoundError` unless there is a catalog at :attr:`url`.

        A missing SQLite file, or a database (SQLite or PostgreSQL) without
        polystore's tables, is most likely a wrong URL: a command that only reads
        must not create a catalog there.
        """
        from polystore.backends.sql.engine import sqlite_file

        path = sqlite_file(self.url)
        if path is not None and not os.path.exists(path):
            raise NotFoundError(
                f"there is no catalog at {self.url} ({path} does not exist); "
                "create one with `polystore put` or `polystore db upgrade`"
            )
        if not has_polystore_tables(self.url):
            from polystore.backends.sql.schema import display_url

            raise NotFoundError(
                f"there is no catalog at {display_url(self.url)} (the database has no "
                "polystore tables); create one with `polystore put` or `polystore db upgrade`"
            )

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None


def check_persistent(url: str) -> None:
    """Refuse an in-memory SQLite URL: a command's catalog would vanish when it exits."""
    from polystore.backends.sql.engine import parse_url, sqlite_file

    if parse_url(url).get_backend_name() == "sqlite" and sqlite_file(url) is None:
        raise click.ClickException(
            f"{url} is an in-memory SQLite database: nothing written there outlives the "
            "command; name a file (sqlite:///catalog.db) or a PostgreSQL server"
        )


def has_polystore_tables(url: str) -> bool:
    """Whether the database at ``url`` holds polystore's tables; it is not changed.

    True for in-memory SQLite (always new) and whenever a SQLite file cannot be
    looked at: opening the catalog then reports the actual problem.
    """
    import sqlite3

    from polystore.backends.sql.engine import sqlite_file

    tables = ("polystore_alembic_version", "polystore_nodes")
    path = sqlite_file(url)
    if path is not None:
        # Read-only, through sqlite3 itself: the catalog engine would switch a
        # non-WAL file to WAL on connect.
        uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
        try:
            db = sqlite3.connect(uri, uri=True)
            try:
                found = db.execute(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN (?, ?)",
                    tables,
                ).fetchone()[0]
            finally:
                db.close()
        except sqlite3.Error:
            return True
        return bool(found)
    from polystore.backends.sql.engine import parse_url

    if parse_url(url).get_backend_name() == "sqlite":
        return True  # in memory
    import sqlalchemy as sa

    from polystore.backends.sql.engine import create_catalog_engine, translate_errors

    with translate_errors(url):
        engine = create_catalog_engine(url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                inspector = sa.inspect(conn)
                return any(inspector.has_table(name) for name in tables)
        finally:
            engine.dispose()


pass_state = click.make_pass_decorator(State, ensure=True)


def _set_url(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.ensure_object(State).url = value


def url_option(command: F) -> F:
    """``--url`` after the command name, overriding the global one."""
    return click.option(
        "--url",
        metavar="URL",
        expose_value=False,
        callback=_set_url,
        help="Catalog database URL (overrides the global --url).",
    )(command)


json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print JSON (for scripts) instead of a table."
)


def describe_user_error(exc: BaseException) -> str | None:
    """One line for an error the user can fix, or None for a bug."""
    text: str | None
    if isinstance(exc, OSError):  # polystore's file errors are OSErrors too
        text = _os_error_text(exc)
    elif isinstance(exc, PolystoreError):
        text = str(exc)
    else:
        text = _database_error_text(exc)
    if text is None:
        return None
    # Driver messages span lines ("...\n\tIs the server running...?"); one line it is.
    return " ".join(text.split()) or type(exc).__name__


def _os_error_text(exc: OSError) -> str:
    if exc.strerror is None:
        return str(exc)
    if exc.filename is None:
        return exc.strerror
    text = f"{exc.strerror}: {os.fsdecode(exc.filename)}"
    if exc.filename2 is not None:
        text += f" -> {os.fsdecode(exc.filename2)}"
    return text


def _database_error_text(exc: BaseException) -> str | None:
    sa_exc = sys.modules.get("sqlalchemy.exc")
    if sa_exc is None or not isinstance(exc, sa_exc.DBAPIError):
        return None
    orig = str(exc.orig).strip()
    # Operational errors come from the environment (locks, disk, server);
    # "not a database" is the wrong file. Other driver errors are bugs.
    if isinstance(exc, sa_exc.OperationalError) or "not a database" in orig:
        return f"database error: {orig}"
    return None


_LITERAL = re.compile(r"``(.+?)``", re.DOTALL)
_ROLE = re.compile(r":[a-z:]+:`~?(?:[^`<]*<)?([^`>]+)>?`")


def plain_text(text: str) -> str:
    """Help text without reStructuredText markup (inline literals, roles).

    The command docstrings are reStructuredText, rendered as such in the
    documentation (``docs/_ext/clidoc.py``); a terminal shows them plain.
    """
    text = _LITERAL.sub(r"\1", text)
    return _ROLE.sub(lambda m: m[1].rpartition(".")[2] if "~" in m[0] else m[1], text)


def interrupted(exc: BaseException | None) -> bool:
    """Whether ``exc`` is, or was raised while handling, a KeyboardInterrupt (Ctrl-C).

    A Ctrl-C inside a database driver can leave the connection mid-command,
    and the rollback that follows then fails with an error of its own: that
    error is still the Ctrl-C's doing.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


class PlainHelpFormatter(click.HelpFormatter):
    """Writes help text and option descriptions without reStructuredText markup."""

    def write_text(self, text: str) -> None:
        super().write_text(plain_text(text))

    def write_dl(self, rows: Any, col_max: int = 30, col_spacing: int = 2) -> None:
        super().write_dl([(a, plain_text(b)) for a, b in rows], col_max, col_spacing)


class PolystoreContext(click.Context):
    formatter_class = PlainHelpFormatter


class PolystoreCommand(click.Command):
    """Every command of the group: plain help text."""

    context_class = PolystoreContext


class PolystoreGroup(click.Group):
    """A group whose commands report user errors as one line on stderr.

    Ctrl-C (KeyboardInterrupt) prints one line and exits with status 130, as
    shells expect of an interrupted program.
    """

    context_class = PolystoreContext
    command_class = PolystoreCommand
    group_class = type  # subgroups (db) are PolystoreGroups too

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except BaseException as exc:
            state = ctx.find_object(State)
            debug = state is not None and state.debug
            if interrupted(exc) and not debug:
                note = state.interrupted_note if state is not None else None
                # On a terminal, a new line first: ^C was echoed where the cursor was.
                start = "\n" if sys.stderr.isatty() else ""
                click.echo(f"{start}interrupted{': ' + note if note else ''}", err=True)
                raise click.exceptions.Exit(130) from None
            if not isinstance(exc, Exception):
                raise
            if isinstance(exc, OSError) and exc.errno == errno.EPIPE:
                raise  # `polystore ls | head`: click exits quietly
            message = describe_user_error(exc)
            if message is None or debug:
                raise
            raise click.ClickException(message) from exc


@click.group(
    name="polystore",
    cls=PolystoreGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option(
    "--url",
    envvar="POLYSTORE_URL",
    default=DEFAULT_URL,
    show_default=True,
    metavar="URL",
    help="Catalog database URL: sqlite:///FILE or postgresql+psycopg://... [env: POLYSTORE_URL]",
)
@click.option(
    "--blob-store",
    envvar="POLYSTORE_BLOB_STORE",
    metavar="STORE",
    help="Blob store for content over the inline limit, one per catalog: a directory or "
    "s3://bucket/prefix "
    "[env: POLYSTORE_BLOB_STORE; default: next to a SQLite catalog, none for PostgreSQL]",
)
@click.option("--debug", is_flag=True, help="Show the full traceback when a command fails.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or summaries.")
@click.option(
    "--at",
    metavar="SNAP",
    help="Read the catalog as at snapshot SNAP: ls, tree, cat, get, stat, du.",
)
@click.version_option(package_name="polystore", prog_name="polystore")
@click.pass_context
def main(
    ctx: click.Context, url: str, blob_store: str | None, debug: bool, quiet: bool, at: str | None
) -> None:
    """Store and query numpy arrays and other objects in a polystore SQL catalog.

    Paths inside the catalog are POSIX-style and relative to its root
    (``plate1/A01/site1.npy``). Start with ``polystore demo``, then point
    ``--url`` (or ``POLYSTORE_URL``) at your own catalog.
    """
    state = ctx.ensure_object(State)
    state.url = url
    state.blob_store = blob_store
    state.debug = debug
    state.quiet = quiet
    state.at = at
    if at is not None:
        from polystore.cli.snapshots import check_at

        check_at(ctx)
    if not debug:
        # SQLAlchemy logs what it swallows (a Ctrl-C while a connection goes
        # back to its pool) with a traceback; errors reach the user as one
        # line instead (--debug shows everything).
        logging.getLogger("sqlalchemy").addHandler(logging.NullHandler())
    ctx.call_on_close(state.close)
