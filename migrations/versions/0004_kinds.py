"""The table of kinds, and each file's kind id.

``polystore_kinds`` holds one row per distinct (serializer, version, dtype,
shape, meta) that files record, under an id derived from those values
(``polystore.backends.sql.kinds``); ``polystore_nodes.kind_id`` points each
file at its row. The node keeps its own serializer columns, which the view and
SQL users read; a batch load reads the one integer instead of four columns.

Existing files are given their kind ids here, a page of node ids at a time:
one ``UPDATE`` per kind and 500 nodes, so every file row is rewritten. Files
whose serializer, version or JSON columns are missing or not plain JSON
(written by something other than polystore) keep no kind id and load from
their own columns. Stop every process running an older polystore before
upgrading: one opened before the upgrade would go on overwriting files
without their kind ids.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

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


def _kind_key(kind: tuple[Any, ...]) -> tuple[int, str] | None:
    """``(id, key)`` of a kind, as ``polystore.backends.sql.kinds.kind_key`` makes them.

    Written out here, not imported: a revision must never change with today's
    code (the format is part of the schema, and a test holds the two to it).
    None if the kind is not plain JSON.
    """
    serializer, version, dtype, shape, meta = kind
    try:
        stored = json.loads(json.dumps([serializer, version, dtype, shape, meta or None]))
        key = json.dumps(stored, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return None
    return int.from_bytes(hashlib.sha256(key.encode("ascii")).digest()[:8], "big") >> 1, key


def _json(text: str | None) -> Any:
    """A JSON column's text parsed; raises ValueError (or RecursionError) if it is not JSON."""
    return None if text is None else json.loads(text)


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
                # As text, parsed here: another program's bad JSON must not stop the upgrade.
                sa.cast(nodes.c.shape, sa.Text()).label("shape"),
                sa.cast(nodes.c.meta, sa.Text()).label("meta"),
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
            try:
                shape, meta = _json(row.shape), _json(row.meta)
            except (ValueError, RecursionError):
                continue
            kind = (row.serializer, row.serializer_version, row.dtype, shape, meta)
            found = _kind_key(kind)
            if found is None:
                continue
            kind_id, key = found
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
    op.drop_column("polystore_nodes", "kind_id")  # (SQLite: 3.35 or later)
    op.drop_table("polystore_kinds")
