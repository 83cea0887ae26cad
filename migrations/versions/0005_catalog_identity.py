"""The catalog's identity, so a blob store can tell its catalog from another.

``polystore_identity`` holds one row: a UUID drawn when the row is created
(here, for a new catalog and for an existing one alike) and never changed. An
external blob store records the identity of the catalog that first opened it
and refuses every other (``polystore.blobs.base.BlobStore.claim``): two
catalogs sharing a store would delete each other's content in ``gc()``.

The identity must outlive a downgrade and a later upgrade, or a catalog taken
back to an older polystore and upgraded again would be refused by its own
store. So the downgrade leaves it in the root directory's ``meta`` column (the
root row exists at every revision and no serializer writes its meta), and the
upgrade takes it back from there when it is present. A downgrade to ``base``
removes the root with everything else.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSONDoc = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")

#: The key under which a downgrade keeps the identity in the root's ``meta``.
STASH_KEY = "polystore_catalog_id"


def _root() -> sa.Table:
    return sa.Table(
        "polystore_nodes",
        sa.MetaData(),
        sa.Column("id", Id, primary_key=True),
        sa.Column("meta", JSONDoc),
    )


def _stashed(meta: Any) -> str | None:
    """The identity a downgrade left in the root's ``meta``, if any."""
    if isinstance(meta, dict):
        value = meta.get(STASH_KEY)
        if isinstance(value, str):
            try:
                return str(uuid.UUID(value))
            except ValueError:
                return None
    return None


def upgrade() -> None:
    table = op.create_table(
        "polystore_identity",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("catalog_id", sa.String(36), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("polystore_identity_single_row_check")),
        sa.PrimaryKeyConstraint("id", name=op.f("polystore_identity_pkey")),
    )
    conn = op.get_bind()
    root = _root()
    meta = conn.execute(sa.select(root.c.meta).where(root.c.id == 0)).scalar()
    catalog_id = _stashed(meta)
    if catalog_id is None:
        catalog_id = str(uuid.uuid4())
    else:
        rest = {k: v for k, v in meta.items() if k != STASH_KEY}
        conn.execute(root.update().where(root.c.id == 0).values(meta=rest or None))
    now = dt.datetime.now(dt.UTC)
    op.bulk_insert(table, [{"id": 1, "catalog_id": catalog_id, "created_at": now}])


def downgrade() -> None:
    conn = op.get_bind()
    catalog_id = conn.execute(
        sa.text("SELECT catalog_id FROM polystore_identity WHERE id = 1")
    ).scalar()
    if catalog_id is not None:
        root = _root()
        meta = conn.execute(sa.select(root.c.meta).where(root.c.id == 0)).scalar()
        kept = dict(meta) if isinstance(meta, dict) else {}
        conn.execute(
            root.update().where(root.c.id == 0).values(meta=kept | {STASH_KEY: catalog_id})
        )
    op.drop_table("polystore_identity")
