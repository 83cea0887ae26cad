"""The hash that names a catalog's content: ``polystore_identity.hash_algorithm``.

Content was named by its SHA-256 until now. A catalog that holds no content
yet (no blob row, no upload under way) -- every catalog made from now on --
takes BLAKE3, which hashes about 2.5 times as fast; a catalog that holds
content keeps SHA-256, so its content keeps the names it was stored, and is
found, under (:mod:`polystore.hashing`).

The downgrade drops the column. Revision 0009 knows only SHA-256, so the
downgrade refuses a catalog whose content BLAKE3 names, unless it goes on to
``base`` (which removes all content): the older polystore would find its
files damaged.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: What a catalog that holds no content takes (``hashing.NEW_CATALOGS``).
FOR_NEW = "blake3"


def _holds_content() -> bool:
    """Whether a blob row or an upload intent exists, committed or not yet.

    On PostgreSQL the two tables are locked first (SHARE: readers go on, writers
    wait), so a save still in flight commits before they are looked at, and
    none starts until the migration commits. SQLite's migration holds the
    database's write lock already.
    """
    conn = op.get_bind()
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("LOCK TABLE polystore_blobs, polystore_upload_intents IN SHARE MODE"))
    return any(
        conn.execute(sa.text(f"SELECT 1 FROM {table} LIMIT 1")).first() is not None
        for table in ("polystore_blobs", "polystore_upload_intents")
    )


def upgrade() -> None:
    op.add_column(
        "polystore_identity",
        sa.Column(
            "hash_algorithm", sa.String(16), nullable=False, server_default=sa.text("'sha256'")
        ),
    )
    if not _holds_content():
        op.execute(f"UPDATE polystore_identity SET hash_algorithm = '{FOR_NEW}'")


def _to_base() -> bool:
    """Whether this downgrade goes on to ``base``, which removes all content anyway."""
    return context.get_revision_argument() in ("base", None)


def downgrade() -> None:
    algorithm = (
        op.get_bind().execute(sa.text("SELECT hash_algorithm FROM polystore_identity")).scalar()
    )
    if algorithm not in (None, "sha256") and _holds_content() and not _to_base():
        from polystore.errors import SchemaVersionError

        raise SchemaVersionError(
            f"this catalog's content is named by {algorithm}, and revision 0009 knows only "
            "sha256: an older polystore would find every file damaged. Copy the files out "
            "(polystore get) and into a catalog the older polystore makes. Nothing was changed."
        )
    op.drop_column("polystore_identity", "hash_algorithm")
