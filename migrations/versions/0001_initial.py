"""The initial catalog: nodes, blobs, the root directory and the polystore_catalog view.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Name = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")
JSONDoc = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

# The view is written out per dialect only where the SQL must differ: PostgreSQL
# needs the path column's collation spelled out so the recursive term matches.
CATALOG_VIEW = """
CREATE VIEW polystore_catalog AS
WITH RECURSIVE tree (id, path) AS (
    SELECT id, {cast_name} FROM polystore_nodes WHERE parent_id = 0
    UNION ALL
    SELECT child.id, {cast_path}
    FROM polystore_nodes AS child JOIN tree ON child.parent_id = tree.id
)
SELECT
    tree.path AS path,
    node.name AS name,
    node.kind AS kind,
    node.size AS size,
    node.serializer AS serializer,
    node.dtype AS dtype,
    node.shape AS shape,
    node.attrs AS attrs,
    node.blob_hash AS hash,
    blob.store AS store,
    node.created_at AS created_at,
    node.modified_at AS modified_at
FROM tree
JOIN polystore_nodes AS node ON node.id = tree.id
LEFT JOIN polystore_blobs AS blob ON blob.hash = node.blob_hash
"""


def create_catalog_view() -> None:
    if op.get_bind().dialect.name == "postgresql":
        sql = CATALOG_VIEW.format(
            cast_name='CAST(name AS TEXT) COLLATE "C"',
            cast_path="CAST(tree.path || '/' || child.name AS TEXT) COLLATE \"C\"",
        )
    else:
        sql = CATALOG_VIEW.format(cast_name="name", cast_path="tree.path || '/' || child.name")
    op.execute(sql)


def upgrade() -> None:
    op.create_table(
        "polystore_blobs",
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("store", sa.String(64), nullable=False),
        sa.Column("refcount", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "refcount >= 0", name=op.f("polystore_blobs_refcount_nonnegative_check")
        ),
        sa.CheckConstraint(
            "store <> 'inline' OR data IS NOT NULL",
            name=op.f("polystore_blobs_inline_has_data_check"),
        ),
        sa.PrimaryKeyConstraint("hash", name=op.f("polystore_blobs_pkey")),
    )
    op.create_table(
        "polystore_nodes",
        sa.Column("id", Id, nullable=False),
        sa.Column("parent_id", Id, nullable=True),
        sa.Column("name", Name, nullable=False),
        sa.Column("kind", sa.String(4), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("serializer", sa.String(64), nullable=True),
        sa.Column("serializer_version", sa.Integer(), nullable=True),
        sa.Column("dtype", sa.Text(), nullable=True),
        sa.Column("shape", JSONDoc, nullable=True),
        sa.Column("meta", JSONDoc, nullable=True),
        sa.Column("attrs", JSONDoc, nullable=True),
        sa.Column("blob_hash", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("modified_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "kind IN ('file', 'dir')", name=op.f("polystore_nodes_kind_valid_check")
        ),
        sa.CheckConstraint(
            "(parent_id IS NULL) = (id = 0)",
            name=op.f("polystore_nodes_only_root_has_no_parent_check"),
        ),
        sa.CheckConstraint(
            "kind = 'dir' OR blob_hash IS NOT NULL",
            name=op.f("polystore_nodes_file_has_blob_check"),
        ),
        sa.ForeignKeyConstraint(
            ["blob_hash"],
            ["polystore_blobs.hash"],
            name=op.f("polystore_nodes_blob_hash_fkey"),
        ),
        sa.ForeignKeyConstraint(
            ["parent_id"],
            ["polystore_nodes.id"],
            name=op.f("polystore_nodes_parent_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("polystore_nodes_pkey")),
        sa.UniqueConstraint("parent_id", "name", name=op.f("polystore_nodes_parent_id_name_key")),
    )
    op.create_index(op.f("polystore_nodes_blob_hash_idx"), "polystore_nodes", ["blob_hash"])
    op.create_index(op.f("polystore_nodes_dtype_idx"), "polystore_nodes", ["dtype"])
    op.execute(
        "INSERT INTO polystore_nodes (id, parent_id, name, kind, created_at, modified_at) "
        "VALUES (0, NULL, '', 'dir', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
    )
    create_catalog_view()


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS polystore_catalog")
    op.drop_index(op.f("polystore_nodes_dtype_idx"), table_name="polystore_nodes")
    op.drop_index(op.f("polystore_nodes_blob_hash_idx"), table_name="polystore_nodes")
    op.drop_table("polystore_nodes")
    op.drop_table("polystore_blobs")
