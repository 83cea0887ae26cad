"""Upload intents, so gc() can find abandoned uploads to external blob stores.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "polystore_upload_intents",
        sa.Column("id", Id, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("store", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("polystore_upload_intents_pkey")),
    )
    op.create_index(op.f("polystore_upload_intents_hash_idx"), "polystore_upload_intents", ["hash"])
    op.create_index(
        op.f("polystore_upload_intents_created_at_idx"), "polystore_upload_intents", ["created_at"]
    )


def downgrade() -> None:
    op.drop_index(
        op.f("polystore_upload_intents_created_at_idx"), table_name="polystore_upload_intents"
    )
    op.drop_index(op.f("polystore_upload_intents_hash_idx"), table_name="polystore_upload_intents")
    op.drop_table("polystore_upload_intents")
