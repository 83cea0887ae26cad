"""``polystore_blobs.data`` as the table's last column, on SQLite.

A save of large inline content used to cost about twice its size in extra
memory on SQLite: the ``sqlite3`` module copies a value it binds, and SQLite
copies it again into the row it builds. Written through a BLOB handle
instead (:mod:`polystore.backends.sql.inline`), the row goes in holding
``zeroblob(size)`` and the content follows a piece at a time; but SQLite
stores a zeroblob without allocating its zeros only when every column after
it is empty, and ``data`` was followed by ``created_at`` (never empty) and
``checksums``. This revision rebuilds the table with ``data`` last: every row
is copied once, inline bytes included.

Nothing changes on PostgreSQL, where the order of columns does not matter.
The downgrade rebuilds the table in its former order.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The columns, in the order of this revision and of the one before.
DATA_LAST = ("hash", "size", "store", "refcount", "created_at", "checksums", "data")
BEFORE = ("hash", "size", "store", "refcount", "data", "created_at", "checksums")


def _column(name: str) -> sa.Column[object]:
    types: dict[str, tuple[sa.types.TypeEngine[object], bool]] = {
        "hash": (sa.String(64), False),
        "size": (sa.BigInteger(), False),
        "store": (sa.String(64), False),
        "refcount": (sa.BigInteger(), False),
        "data": (sa.LargeBinary(), True),
        "created_at": (sa.DateTime(timezone=True), False),
        "checksums": (sa.LargeBinary(), True),
    }
    kind, nullable = types[name]
    return sa.Column(name, kind, nullable=nullable)


def _rebuild(order: Sequence[str]) -> None:
    """Copy ``polystore_blobs`` into a table of its columns in ``order`` (SQLite).

    SQLite's own recipe for a change ALTER TABLE cannot make: a new table, the
    rows copied, the old one dropped and the new one renamed. Migrations run
    with foreign keys off (:func:`polystore.backends.sql.schema.migration_transaction`),
    so dropping the table that ``polystore_nodes.blob_hash`` refers to deletes
    nothing else; the view that reads the table is dropped first and made
    again last. Triggers an application put on ``polystore_blobs`` go with
    the old table.
    """
    if op.get_bind().dialect.name != "sqlite":
        return
    initial = op.get_context().script.get_revision("0001").module  # (the view's definition)
    op.execute("DROP VIEW polystore_catalog")
    op.drop_index("polystore_blobs_unreferenced_idx", table_name="polystore_blobs")
    op.create_table(
        "polystore_blobs_rebuilt",
        *(_column(name) for name in order),
        sa.CheckConstraint(
            "refcount >= 0", name=op.f("polystore_blobs_refcount_nonnegative_check")
        ),
        sa.CheckConstraint(
            "store <> 'inline' OR data IS NOT NULL",
            name=op.f("polystore_blobs_inline_has_data_check"),
        ),
        sa.PrimaryKeyConstraint("hash", name=op.f("polystore_blobs_pkey")),
    )
    columns = ", ".join(order)
    op.execute(
        f"INSERT INTO polystore_blobs_rebuilt ({columns}) SELECT {columns} FROM polystore_blobs"
    )
    op.drop_table("polystore_blobs")
    # Renaming checks every view and trigger of the database (SQLite 3.26+),
    # and one of an application's over polystore_catalog names a view that is
    # not there until the end: the legacy rename checks none of them.
    op.execute("PRAGMA legacy_alter_table=ON")
    try:
        op.rename_table("polystore_blobs_rebuilt", "polystore_blobs")
    finally:  # (a setting of the connection, which a rollback does not undo)
        op.execute("PRAGMA legacy_alter_table=OFF")
    op.create_index(
        "polystore_blobs_unreferenced_idx",
        "polystore_blobs",
        ["store"],
        sqlite_where=sa.text("refcount = 0"),
    )
    initial.create_catalog_view()


def upgrade() -> None:
    _rebuild(DATA_LAST)


def downgrade() -> None:
    _rebuild(BEFORE)
