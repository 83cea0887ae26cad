"""Managing a catalog's schema: upgrade, downgrade, inspect and check it.

These functions are what ``polystore db ...`` runs; they take a database URL
and open (and close) their own engine::

    from polystore import migrate

    migrate.upgrade("sqlite:///catalog.db")        # to head; creates a fresh catalog
    migrate.current("sqlite:///catalog.db")        # the revision id, e.g. "0002"
    migrate.check("sqlite:///catalog.db")          # [] when all is well
    migrate.downgrade("sqlite:///catalog.db", "base")

Every change runs in one transaction under polystore's migration lock (SQLite's
write lock, a PostgreSQL advisory lock), so it commits whole or not at all and
concurrent migrators queue. A catalog at a revision this polystore does not know
(a newer polystore wrote it) is never touched.

Downgrading to ``"base"`` removes everything polystore created -- its tables,
the ``polystore_catalog`` view *and* the ``polystore_alembic_version`` table --
along with the catalog's contents. An application's own tables and its own
``alembic_version`` are never read or touched.

Errors: :class:`~polystore.errors.SchemaVersionError` for anything about
revisions (unknown, stale, not a valid target),
:class:`~polystore.errors.BackendUnavailableError` when the database cannot be
reached, :class:`~polystore.errors.BackendConfigError` for a URL polystore
cannot use.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import Connection, Engine, exc

from polystore.backends.sql.engine import (
    create_catalog_engine,
    sqlite_file,
    translate_errors,
)
from polystore.backends.sql.schema import (
    HEAD,
    REVISIONS,
    VERSION_TABLE,
    VIEW_COLUMNS,
    alembic_config,
    check_adoptable,
    check_revision,
    current_revision,
    display_url,
    include_name,
    migration_transaction,
    upgrade_command,
)
from polystore.errors import BackendUnavailableError, SchemaVersionError

if TYPE_CHECKING:
    from alembic.script import ScriptDirectory

__all__ = ["check", "current", "downgrade", "head", "history", "resolve", "upgrade"]

VIEW = "polystore_catalog"


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the catalog at ``url`` up to ``revision`` (default: the newest).

    A database without a catalog gets one. ``revision`` is a revision id such
    as ``"0002"``, ``"head"``, or a relative step such as ``"+1"``. Upgrading to
    the revision the catalog is already at does nothing.
    """
    with (
        _catalog(url) as engine,
        _connect(engine, url) as plain,
        migration_transaction(plain) as conn,
    ):
        found = current_revision(conn)
        check_revision(found, url, auto_upgrade=True)
        check_adoptable(conn, found, url)
        revision = _absolute(revision, found, url)
        target = _position(revision)
        if target is not None and target < (_position(found) or 0):
            raise SchemaVersionError(
                f"the catalog at {display_url(url)} is at revision {found}, newer than "
                f"{revision}: use downgrade to go back"
            )
        _alembic("upgrade", conn, url, revision)


def downgrade(url: str, revision: str) -> None:
    """Take the catalog at ``url`` down to ``revision``, losing what later revisions added.

    ``"base"`` removes the catalog entirely: every polystore table and view,
    its contents, and the ``polystore_alembic_version`` table. Downgrading a
    database that holds no catalog to ``"base"`` does nothing.
    """
    if revision == "base" and _missing_sqlite_file(url):
        return  # nothing to remove, and no reason to create an empty file
    with (
        _catalog(url) as engine,
        _connect(engine, url) as plain,
        migration_transaction(plain) as conn,
    ):
        found = current_revision(conn)
        check_revision(found, url, auto_upgrade=True)
        if found is None:
            if revision == "base":
                return
            raise SchemaVersionError(
                f"there is no catalog at {display_url(url)} to downgrade to {revision!r}"
            )
        revision = _absolute(revision, found, url)
        target = _position(revision)
        if target is not None and target > (_position(found) or 0):
            raise SchemaVersionError(
                f"the catalog at {display_url(url)} is at revision {found}, older than "
                f"{revision}: use upgrade to go forward"
            )
        _alembic("downgrade", conn, url, revision)


def current(url: str) -> str | None:
    """The catalog's schema revision, or ``None`` when the database holds no catalog.

    Only reads; a revision this polystore does not know is returned as it is.
    """
    if _missing_sqlite_file(url):
        return None
    with _catalog(url) as engine, _connect(engine, url) as conn:
        return current_revision(conn)


def resolve(url: str, revision: str) -> str:
    """The revision ``revision`` names for the catalog at ``url``: a relative step
    (``"-1"``, ``"+2"``) made the plain id it reaches from the catalog's revision
    (``"base"`` for the start of history); any other target as it is.

    Raises :class:`~polystore.errors.SchemaVersionError` for a step past either end.
    """
    return _absolute(revision, current(url), url)


def check(url: str) -> list[str]:
    """Problems with the catalog's schema, one sentence each; empty when all is well.

    All is well when the catalog is at :func:`head` and the database matches the
    models exactly (tables, columns, types, indexes, constraints), and the
    ``polystore_catalog`` view has its documented columns. Only reads.
    """
    if _missing_sqlite_file(url):
        return [_no_catalog(url)]
    with _catalog(url) as engine, _connect(engine, url) as conn:
        found = current_revision(conn)
        if found is None:
            if sa.inspect(conn).has_table("polystore_nodes"):
                problem = (
                    f"the database at {display_url(url)} has polystore tables but no "
                    f"{VERSION_TABLE}: they were not created by polystore's migrations"
                )
                return [problem]
            return [_no_catalog(url)]
        if found not in REVISIONS:
            problem = (
                f"the catalog is at revision {found!r}, which this polystore does not know "
                f"(it knows {', '.join(REVISIONS)}): a newer polystore wrote it"
            )
            return [problem]
        if found != HEAD:
            # Comparing an old schema with the models would only list what the
            # pending migrations do.
            return [
                f"the catalog is at revision {found}, head is {HEAD}: run `{upgrade_command(url)}`"
            ]
        return _drift(conn)


def history() -> list[tuple[str, str]]:
    """Every revision this polystore knows as ``(revision, message)``, oldest first."""
    script = _script()
    return [(s.revision, s.doc) for s in reversed(list(script.walk_revisions()))]


def head() -> str:
    """The newest revision: what :func:`upgrade` brings a catalog to by default."""
    found = _script().get_current_head()
    assert found is not None, "polystore's migrations have no head"
    return found


# -- helpers -----------------------------------------------------------------------


def _script() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def _position(revision: str | None) -> int | None:
    """Where a plain revision id sits in history (0 for base); None for "head", "+1", ...

    Alembic silently does nothing when asked to upgrade to an older revision;
    polystore refuses plain ids that go the wrong way instead (relative
    targets are plain ids by then, :func:`_absolute`).
    """
    if revision is None or revision == "base":
        return 0
    if revision in REVISIONS:
        return REVISIONS.index(revision) + 1
    return None


def _absolute(revision: str, found: str | None, url: str) -> str:
    """``revision`` with a relative step (``"-2"``, ``"+1"``) made a plain id from ``found``.

    Alembic would resolve the step itself, but then a migration could not tell
    where the downgrade ends: ``0010`` lets a downgrade that reaches ``base``
    through, whatever spelling reached it. A step past either end is refused.
    """
    step = _STEP.fullmatch(revision)
    if step is None:
        return revision
    position = (_position(found) or 0) + int(step.group(0))
    if not 0 <= position <= len(REVISIONS):
        raise SchemaVersionError(
            f"the catalog at {display_url(url)} is at revision {found or 'base'}: "
            f"{revision} steps past the {'first' if position < 0 else 'newest'} revision"
        )
    return "base" if position == 0 else REVISIONS[position - 1]


#: A relative target: a signed number of revisions.
_STEP = re.compile(r"[+-][0-9]+")


def _no_catalog(url: str) -> str:
    return f"there is no catalog at {display_url(url)}: run `{upgrade_command(url)}`"


def _missing_sqlite_file(url: str) -> bool:
    path = sqlite_file(url)
    return path is not None and not os.path.exists(path)


@contextmanager
def _catalog(url: str) -> Iterator[Engine]:
    from alembic.script.revision import RevisionError
    from alembic.util import CommandError

    try:
        with translate_errors(url):
            engine = create_catalog_engine(url)
            try:
                yield engine
            finally:
                engine.dispose()
    except (CommandError, RevisionError) as error:
        raise SchemaVersionError(f"catalog at {display_url(url)}: {error}") from error


@contextmanager
def _connect(engine: Engine, url: str) -> Iterator[Connection]:
    try:
        conn = engine.connect()
    except exc.DBAPIError as error:
        # Whatever the driver says, failing to connect means the catalog is out of reach.
        raise BackendUnavailableError(
            f"cannot reach the catalog at {display_url(url)}: {' '.join(str(error.orig).split())}"
        ) from error
    with conn:
        yield conn


def _alembic(command_name: str, conn: Connection, url: str, revision: str) -> None:
    from alembic import command
    from alembic.script.revision import RevisionError
    from alembic.util import CommandError

    run = command.upgrade if command_name == "upgrade" else command.downgrade
    try:
        run(alembic_config(conn), revision)
    except (CommandError, RevisionError) as error:
        known = ", ".join(("base", *REVISIONS, "head"))
        raise SchemaVersionError(
            f"cannot {command_name} the catalog at {display_url(url)} to {revision!r}: "
            f"{error} (revisions: {known})"
        ) from error


def _drift(conn: Connection) -> list[str]:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from polystore.backends.sql.models import Base

    context = MigrationContext.configure(
        conn,
        opts={
            "include_name": include_name,
            "compare_type": True,
            "version_table": VERSION_TABLE,
            "target_metadata": Base.metadata,
        },
    )
    problems = [_describe(diff) for diff in compare_metadata(context, Base.metadata)]
    inspector = sa.inspect(conn)
    if VIEW not in inspector.get_view_names():
        problems.append(f"the {VIEW} view is missing")
    else:
        columns = tuple(column["name"] for column in inspector.get_columns(VIEW))
        if columns != VIEW_COLUMNS:
            problems.append(
                f"the {VIEW} view has columns {', '.join(columns)}; "
                f"expected {', '.join(VIEW_COLUMNS)}"
            )
    root = conn.execute(sa.text("SELECT kind FROM polystore_nodes WHERE id = 0")).scalar()
    if root != "dir":
        problems.append("the root directory (the polystore_nodes row with id 0) is missing")
    return problems


def _describe(diff: Any) -> str:
    """One of Alembic's autogenerate differences, as a sentence.

    ``add_*`` means the models have something the database lacks; ``remove_*``
    the reverse.
    """
    if isinstance(diff, list):  # modify_* differences come grouped per column
        return "; ".join(_describe(item) for item in diff)
    kind = diff[0]
    if kind in ("add_table", "remove_table"):
        return _presence(kind, f"table {diff[1].name}")
    if kind in ("add_column", "remove_column"):
        return _presence(kind, f"column {diff[2]}.{diff[3].name}")
    if kind in ("add_index", "remove_index"):
        index = diff[1]
        columns = ", ".join(str(c.name) for c in index.columns)
        return _presence(kind, f"index {index.name} on {index.table.name} ({columns})")
    if kind in ("add_constraint", "remove_constraint", "add_fk", "remove_fk"):
        constraint = diff[1]
        return _presence(kind, f"constraint {constraint.name} on {constraint.table.name}")
    if kind.startswith("modify_"):
        _, _, table, column, _, in_database, in_models = diff
        what = kind.removeprefix("modify_")
        return (
            f"column {table}.{column}: {what} is {in_database!r} in the database "
            f"but {in_models!r} in the models"
        )
    return f"{kind}: {diff[1:]!r}"


def _presence(kind: str, what: str) -> str:
    if kind.startswith("add_"):
        return f"{what} is in the models but not in the database"
    return f"{what} is in the database but not in the models"
