"""Piece checksums of external content: ``polystore_blobs.checksums``.

A load used to check external content by the SHA-256 of the whole object,
on one core. The rows of external blobs written from this revision on also
record an XXH3-64 digest of each 8 MiB piece of their content, which a load
checks as it reads, at a small part of the cost
(:mod:`polystore.backends.sql.checksums` describes the value). Existing rows keep ``NULL`` there and are checked by
their SHA-256 as before; inline rows never have checksums.

The downgrade drops the column: the older schema checks every object by its
SHA-256, which needs nothing stored.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("polystore_blobs", sa.Column("checksums", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    # In place on both databases (SQLite 3.35+): a batch rebuild of the table
    # would trip over the polystore_catalog view that reads it.
    op.execute("ALTER TABLE polystore_blobs DROP COLUMN checksums")
