"""Inline content stored uncompressed on PostgreSQL: ``polystore_blobs.data`` ``STORAGE EXTERNAL``.

PostgreSQL compresses a ``bytea`` value over about 2 KiB where it can (the
column's default ``STORAGE EXTENDED``), and ``substring()`` of a compressed
value decompresses it from its start. Large inline content is read in pieces
(:mod:`polystore.backends.sql.inline`), and a ranged read or an array slice
reads one part of a value: both read only the TOAST chunks they need once the
value is stored uncompressed, as SQLite stores it. Values written before keep
their compression until rewritten; a load reads those whole.

Nothing changes on SQLite. The downgrade restores ``STORAGE EXTENDED``; no row
is rewritten either way.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _storage(kind: str) -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE polystore_blobs ALTER COLUMN data SET STORAGE {kind}")


def upgrade() -> None:
    _storage("EXTERNAL")


def downgrade() -> None:
    _storage("EXTENDED")
