"""The table of kinds, and each file's kind id.

``polystore_kinds`` holds one row per distinct (serializer, version, dtype,
shape, meta) that files record, under an id derived from those values
(``polystore.backends.sql.kinds``); ``polystore_nodes.kind_id`` points each
file at its row. The node keeps its own serializer columns, which the view and
SQL users read; a batch load reads the one integer instead of four columns.

Existing files are given their kind ids here, a page of node ids at a time:
one ``UPDATE`` per kind and 500 nodes. Files whose serializer or version is
missing (written by something other than polystore) keep no kind id and load
from their own columns.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from polystore.backends.sql.kinds import kind_key

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSONDoc = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")

#: Node rows read per page of the backfill.
PAGE = 10_000
#: Node ids per UPDATE of the backfill.
CHUNK = 500


def upgrade() -> None:
    op.create_table(
        "polystore_kinds",
        sa.Column("id", Id, autoincrement=False, nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("serializer", sa.String(length=64), nullable=False),
        sa.Column("serializer_version", sa.Integer(), nullable=False),
        sa.Column("dtype", sa.Text(), nullable=True),
        sa.Column("shape", JSONDoc, nullable=True),
        sa.Column("meta", JSONDoc, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("polystore_kinds_pkey")),
    )
    # Derived from the node's own columns, not a foreign key (a file's kind
    # row is written in the same transaction, and never deleted): no check
    # per row written, and a plain ADD COLUMN on SQLite, with no rebuild of
    # the table. ``polystore fsck`` checks every kind id.
    op.add_column("polystore_nodes", sa.Column("kind_id", Id, nullable=True))
    _backfill()


def _backfill() -> None:
    conn = op.get_bind()
    meta = sa.MetaData()
    nodes = sa.Table(
        "polystore_nodes",
        meta,
        sa.Column("id", Id, primary_key=True),
        sa.Column("kind", sa.String(4)),
        sa.Column("serializer", sa.String(64)),
        sa.Column("serializer_version", sa.Integer()),
        sa.Column("dtype", sa.Text()),
        sa.Column("shape", JSONDoc),
        sa.Column("meta", JSONDoc),
        sa.Column("kind_id", Id),
    )
    kinds = sa.Table(
        "polystore_kinds",
        meta,
        sa.Column("id", Id, primary_key=True),
        sa.Column("key", sa.Text()),
        sa.Column("serializer", sa.String(64)),
        sa.Column("serializer_version", sa.Integer()),
        sa.Column("dtype", sa.Text()),
        sa.Column("shape", JSONDoc),
        sa.Column("meta", JSONDoc),
    )
    known: dict[int, str] = {}
    update = (
        nodes.update()
        .where(nodes.c.id.in_(sa.bindparam("ids", expanding=True)))
        .values(kind_id=sa.bindparam("new_kind_id"))
    )
    after = -1
    while True:
        page = conn.execute(
            sa.select(
                nodes.c.id,
                nodes.c.serializer,
                nodes.c.serializer_version,
                nodes.c.dtype,
                nodes.c.shape,
                nodes.c.meta,
            )
            .where(
                nodes.c.id > after,
                nodes.c.kind == "file",
                nodes.c.serializer.is_not(None),
                nodes.c.serializer_version.is_not(None),
            )
            .order_by(nodes.c.id)
            .limit(PAGE)
        ).all()
        if not page:
            return
        after = page[-1].id
        by_kind: dict[int, list[int]] = defaultdict(list)
        new: list[dict[str, Any]] = []
        for row in page:
            kind = (row.serializer, row.serializer_version, row.dtype, row.shape, row.meta)
            kind_id, key = kind_key(kind)
            seen = known.get(kind_id)
            if seen is None:
                known[kind_id] = key
                values = (kind_id, key, *kind[:4], kind[4] or None)
                new.append(dict(zip(kinds.c.keys(), values, strict=True)))
            elif seen != key:
                raise RuntimeError(f"kinds {seen} and {key} have the same id {kind_id}")
            by_kind[kind_id].append(row.id)
        if new:
            conn.execute(kinds.insert(), new)
        for kind_id, ids in by_kind.items():
            for start in range(0, len(ids), CHUNK):
                conn.execute(update, {"ids": ids[start : start + CHUNK], "new_kind_id": kind_id})


def downgrade() -> None:
    op.drop_column("polystore_nodes", "kind_id")  # (on SQLite 3.35 and later)
    op.drop_table("polystore_kinds")
