"""Schema versioning: bring a fresh catalog to head, refuse a stale or unknown one.

polystore never calls ``create_all`` on a user's database. A database without
polystore's tables is migrated to head by Alembic, under a lock (SQLite's write
lock, a PostgreSQL advisory lock) so that when several processes open a fresh
database at once exactly one migrates and the others wait and see the result.
Every migration runs in one transaction (:func:`migration_transaction`): it
commits whole or not at all, on both databases.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import Connection, Engine, exc
from sqlalchemy.engine import make_url

from polystore.backends.sql.engine import WRITE
from polystore.errors import SchemaVersionError

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = [
    "HEAD",
    "REVISIONS",
    "VERSION_TABLE",
    "VIEW_COLUMNS",
    "alembic_config",
    "check_adoptable",
    "check_revision",
    "current_revision",
    "display_url",
    "ensure_schema",
    "include_name",
    "migration_transaction",
    "migrations_dir",
    "sqlite_foreign_keys_off",
    "upgrade",
    "upgrade_command",
]

VERSION_TABLE = "polystore_alembic_version"
#: Every revision this polystore knows, oldest first. A test checks it against
#: the scripts in migrations/versions, so it cannot drift.
REVISIONS: tuple[str, ...] = (
    "0001",
    "0002",
    "0003",
    "0004",
    "0005",
    "0006",
    "0007",
    "0008",
    "0009",
    "0010",
)
HEAD = REVISIONS[-1]
#: The columns of the ``polystore_catalog`` view, in order: a public contract
#: (docs/schema.rst); ``polystore db check`` verifies them.
VIEW_COLUMNS: tuple[str, ...] = (
    "path",
    "name",
    "kind",
    "size",
    "serializer",
    "dtype",
    "shape",
    "attrs",
    "hash",
    "store",
    "created_at",
    "modified_at",
)
# An arbitrary 64-bit key for pg_advisory_xact_lock ("polystor" in ASCII).
_PG_LOCK_KEY = 0x706F6C7973746F72


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """Alembic filter: only polystore's own tables exist for autogenerate and check."""
    if type_ == "table":
        return bool(name) and name.startswith("polystore_") and name != VERSION_TABLE  # type: ignore[union-attr]
    return True


def migrations_dir() -> Path:
    """Where the migration scripts are: inside the installed wheel, or the checkout."""
    here = Path(__file__).resolve()
    packaged = here.parents[2] / "_migrations"
    if (packaged / "env.py").is_file():
        return packaged
    checkout = here.parents[3] / "migrations"
    if (checkout / "env.py").is_file():
        return checkout
    raise RuntimeError(f"polystore's migrations are missing (looked in {packaged} and {checkout})")


def alembic_config(connection: Connection | None = None, url: str | None = None) -> Config:
    """An Alembic configuration built in code (no alembic.ini needed)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    if url is not None:
        # ConfigParser treats % as interpolation; URLs may hold escaped passwords.
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _sqlite_foreign_keys(conn: Connection, on: bool) -> None:
    # Straight to the driver: a statement through SQLAlchemy would open a
    # transaction first (the engine's "begin" hook), and inside one SQLite
    # silently ignores this pragma.
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None
    cursor = dbapi.cursor()
    try:
        cursor.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")
    finally:
        cursor.close()


def sqlite_foreign_keys_off(conn: Connection) -> None:
    """Raise unless SQLite's foreign keys are off on ``conn`` (a no-op on PostgreSQL).

    For a connection handed to the migrations while already in a transaction,
    where the pragma can no longer be changed.
    """
    if conn.dialect.name == "sqlite" and conn.exec_driver_sql("PRAGMA foreign_keys").scalar():
        raise SchemaVersionError(
            "SQLite migrations need PRAGMA foreign_keys=OFF, and it cannot be changed inside "
            "a transaction: set it before beginning the transaction you hand to the migrations "
            "(or hand over a connection that is not in a transaction)"
        )


@contextmanager
def migration_transaction(conn: Connection) -> Iterator[Connection]:
    """Run a migration on ``conn`` (not yet in a transaction) as one locked transaction.

    The lock makes concurrent migrators queue: SQLite's write lock (the engine
    begins writers with ``BEGIN IMMEDIATE`` when the connection has the
    :data:`~polystore.backends.sql.engine.WRITE` option; this function sets it),
    a transaction-scoped advisory lock on PostgreSQL.

    On SQLite, foreign keys are switched off for the duration. Batch migrations
    rebuild a table (create a copy, copy the rows, drop the old table, rename the
    copy), and with foreign keys on, dropping the old table runs an implicit
    ``DELETE`` that fires ``ON DELETE CASCADE`` on the rows pointing at it, so
    rebuilding ``polystore_nodes`` (which references itself) would empty the
    copy. SQLite ignores ``PRAGMA foreign_keys`` inside a transaction, so it is
    turned off before ``BEGIN`` and back on after ``COMMIT`` or ``ROLLBACK``,
    and ``PRAGMA foreign_key_check`` runs before the commit so a migration that
    broke a reference rolls back instead (the procedure SQLite's documentation
    gives for altering tables).
    """
    if conn.in_transaction():
        raise RuntimeError("migration_transaction() needs a connection outside a transaction")
    sqlite = conn.dialect.name == "sqlite"
    conn = conn.execution_options(**{WRITE: True})
    if sqlite:
        _sqlite_foreign_keys(conn, on=False)
    try:
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
            yield conn
            if sqlite:
                broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
                if broken:
                    raise SchemaVersionError(
                        f"the migration left broken foreign keys (table, rowid, parent): "
                        f"{[tuple(row[:3]) for row in broken[:10]]}; it was rolled back"
                    )
    finally:
        if sqlite and not conn.invalidated:
            _sqlite_foreign_keys(conn, on=True)


def current_revision(conn: Connection) -> str | None:
    """The catalog's revision, or None when polystore's version table is absent."""
    if not sa.inspect(conn).has_table(VERSION_TABLE):
        return None
    rows = conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
    if len(rows) > 1:
        raise SchemaVersionError(f"catalog has several schema heads: {sorted(rows)}")
    return rows[0] if rows else None


def upgrade(conn: Connection, revision: str = "head") -> None:
    """Run the migrations up to ``revision`` on ``conn`` (inside the caller's transaction)."""
    from alembic import command

    command.upgrade(alembic_config(conn), revision)


def display_url(url: str) -> str:
    """``url`` for messages: as given, or with its password masked."""
    try:
        parsed = make_url(url)
    except exc.ArgumentError:
        return url
    return url if parsed.password is None else parsed.render_as_string(hide_password=True)


def upgrade_command(url: str) -> str:
    """The shell command that brings the catalog at ``url`` to head."""
    return f"polystore db upgrade --url {shlex.quote(display_url(url))}"


def _stale_message(url: str, revision: str) -> str:
    return (
        f"the catalog at {display_url(url)} is at schema revision {revision}, this polystore "
        f"needs {HEAD}; run `{upgrade_command(url)}` (or open it with auto_upgrade=True)"
    )


def check_revision(revision: str | None, url: str, *, auto_upgrade: bool) -> bool:
    """Whether the catalog needs migrating now; raises if it must not be touched."""
    if revision == HEAD:
        return False
    if revision is None:
        return True
    if revision not in REVISIONS:
        raise SchemaVersionError(
            f"the catalog at {display_url(url)} is at schema revision {revision!r}, which "
            f"this polystore does not know (it knows {', '.join(REVISIONS)}): a newer "
            "polystore wrote it; upgrade polystore. Nothing was changed."
        )
    if not auto_upgrade:
        raise SchemaVersionError(_stale_message(url, revision))
    return True


def ensure_schema(engine: Engine, url: str, *, auto_upgrade: bool = False) -> None:
    """Make sure the catalog at ``engine`` is at head, migrating a fresh one."""
    with engine.connect() as conn:
        revision = current_revision(conn)
    if not check_revision(revision, url, auto_upgrade=auto_upgrade):
        return
    with engine.connect() as plain, migration_transaction(plain) as conn:
        # Look again under the lock: another process may have just migrated.
        revision = current_revision(conn)
        if check_revision(revision, url, auto_upgrade=auto_upgrade):
            check_adoptable(conn, revision, url)
            upgrade(conn, "head")


def check_adoptable(conn: Connection, revision: str | None, url: str) -> None:
    """Refuse to migrate polystore tables that polystore's migrations did not create."""
    if revision is None and sa.inspect(conn).has_table("polystore_nodes"):
        raise SchemaVersionError(
            f"the database at {display_url(url)} has polystore tables but no "
            f"{VERSION_TABLE}; they were not created by polystore's migrations, "
            "so polystore will not touch them"
        )
