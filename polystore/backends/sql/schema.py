"""Schema versioning: bring a fresh catalog to head, refuse a stale or unknown one.

polystore never calls ``create_all`` on a user's database. A database without
polystore's tables is migrated to head by Alembic, under a lock (SQLite's write
lock, a PostgreSQL advisory lock) so that when several processes open a fresh
database at once exactly one migrates and the others wait and see the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from polystore.backends.sql.engine import WRITE
from polystore.errors import SchemaVersionError

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = [
    "HEAD",
    "REVISIONS",
    "VERSION_TABLE",
    "alembic_config",
    "current_revision",
    "ensure_schema",
    "include_name",
    "migrations_dir",
    "upgrade",
]

VERSION_TABLE = "polystore_alembic_version"
#: Every revision this polystore knows, oldest first. A test checks it against
#: the scripts in migrations/versions, so it cannot drift.
REVISIONS: tuple[str, ...] = ("0001", "0002")
HEAD = REVISIONS[-1]
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


def _stale_message(url: str, revision: str) -> str:
    return (
        f"the catalog at {url} is at schema revision {revision}, this polystore needs {HEAD}; "
        f"run `polystore db upgrade --url '{url}'` (or open it with auto_upgrade=True)"
    )


def check_revision(revision: str | None, url: str, *, auto_upgrade: bool) -> bool:
    """Whether the catalog needs migrating now; raises if it must not be touched."""
    if revision == HEAD:
        return False
    if revision is None:
        return True
    if revision not in REVISIONS:
        raise SchemaVersionError(
            f"the catalog at {url} is at schema revision {revision!r}, which this polystore "
            f"does not know (it knows {', '.join(REVISIONS)}): a newer polystore wrote it; "
            "upgrade polystore. Nothing was changed."
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
    with engine.connect().execution_options(**{WRITE: True}) as conn:
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
            # Look again under the lock: another process may have just migrated.
            revision = current_revision(conn)
            if check_revision(revision, url, auto_upgrade=auto_upgrade):
                if revision is None and sa.inspect(conn).has_table("polystore_nodes"):
                    raise SchemaVersionError(
                        f"the database at {url} has polystore tables but no "
                        f"{VERSION_TABLE}; it was not created by polystore's migrations"
                    )
                upgrade(conn, "head")
