"""The tree version, and an index of unreferenced blobs.

``polystore_tree_version`` is a counter raised by every directory move or
delete. Readers cache directory ids by path and check, in the same statement
that uses a cached id, that the counter has not moved since: a cached lookup
then costs one indexed join instead of one join per level of the path.

``polystore_blobs_unreferenced_idx`` is a partial index of the blobs whose
reference count is zero, so ``gc()`` finds its candidates without scanning the
whole blob table.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    table = op.create_table(
        "polystore_tree_version",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("polystore_tree_version_single_row_check")),
        sa.PrimaryKeyConstraint("id", name=op.f("polystore_tree_version_pkey")),
    )
    # Seeded from the clock (microseconds), not 0: a catalog downgraded and
    # upgraded again must never repeat a version some process still caches.
    op.bulk_insert(table, [{"id": 1, "version": time.time_ns() // 1000}])
    unreferenced = sa.text("refcount = 0")
    op.create_index(
        "polystore_blobs_unreferenced_idx",
        "polystore_blobs",
        ["store"],
        sqlite_where=unreferenced,
        postgresql_where=unreferenced,
    )


def downgrade() -> None:
    op.drop_index("polystore_blobs_unreferenced_idx", table_name="polystore_blobs")
    op.drop_table("polystore_tree_version")
