"""Snapshots: an epoch counter, node history kept by triggers, and the snapshot list.

A snapshot is one row of ``polystore_snapshots`` naming an *epoch*. The
catalog's current epoch is the one row of ``polystore_epoch``; taking a
snapshot records the current epoch ``c`` and raises the counter to ``c + 1``
(two rows, whatever the catalog's size). Every node row carries the epoch in
which it was last written (``polystore_nodes.epoch``, 0 for every existing
row). When a row last written before the current epoch is updated or deleted
while a kept snapshot may still see it (a snapshot whose epoch is at least the
row's), triggers copy the old row into ``polystore_node_history`` with
``valid_to`` = the current epoch. A row is visible at snapshot epoch ``e`` if
it is live with ``epoch <= e``, or a history row with ``epoch <= e < valid_to``.

Without snapshots nothing is ever copied: the triggers' conditions are false
and the history stays empty. The triggers are here, in the migration, so every
statement that changes a node -- polystore's own, cascaded deletes, and SQL
another program runs -- keeps the history right.

PostgreSQL: one ``BEFORE UPDATE OR DELETE`` trigger in PL/pgSQL that copies
the old row and stamps the new one with the current epoch. polystore's own
write transactions publish the epoch they read in the transaction-local
setting ``polystore.epoch``, and the trigger's ``WHEN`` clause (which cannot
read a table) compares with it: a row already at the current epoch -- every
row, while no snapshot was ever taken -- does not even call the function.
Without the setting (another program's SQL) the function always runs and
reads the epoch from its table. SQLite cannot
change ``NEW`` in a ``BEFORE`` trigger: a ``BEFORE`` trigger copies the old
row, and an ``AFTER UPDATE`` trigger stamps a row an update left at an older
epoch (polystore's own updates set it, so that trigger only runs for other
programs' SQL; the copy it causes is the same history row again, and is
ignored: the history's key is ``(id, epoch)``). Inserts carry the current
epoch, set by whoever inserts (polystore reads it once per write transaction).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Name = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")
JSONDoc = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")

#: The node columns a history row copies, in the table's order (written out: a
#: revision never imports today's definitions).
NODE_COLUMNS = (
    "id",
    "parent_id",
    "name",
    "kind",
    "size",
    "serializer",
    "serializer_version",
    "dtype",
    "shape",
    "meta",
    "attrs",
    "blob_hash",
    "created_at",
    "modified_at",
    "kind_id",
)
_COLUMNS = ", ".join(NODE_COLUMNS)
_OLD = ", ".join(f"OLD.{c}" for c in NODE_COLUMNS)
_CURRENT = "(SELECT epoch FROM polystore_epoch WHERE id = 1)"
_SEEN = "EXISTS (SELECT 1 FROM polystore_snapshots AS s WHERE s.epoch >= OLD.epoch)"

_SQLITE_COPY = f"""
    INSERT OR IGNORE INTO polystore_node_history ({_COLUMNS}, epoch, valid_to)
    SELECT {_OLD}, OLD.epoch, {_CURRENT} WHERE {_SEEN};
"""
SQLITE_TRIGGERS = (
    f"""CREATE TRIGGER polystore_nodes_history_update BEFORE UPDATE ON polystore_nodes
WHEN OLD.epoch < {_CURRENT}
BEGIN{_SQLITE_COPY}END""",
    f"""CREATE TRIGGER polystore_nodes_history_delete BEFORE DELETE ON polystore_nodes
WHEN OLD.epoch < {_CURRENT}
BEGIN{_SQLITE_COPY}END""",
    f"""CREATE TRIGGER polystore_nodes_stamp_epoch AFTER UPDATE ON polystore_nodes
WHEN NEW.epoch < {_CURRENT}
BEGIN
    UPDATE polystore_nodes SET epoch = {_CURRENT} WHERE id = NEW.id;
END""",
)
PG_FUNCTION = f"""CREATE FUNCTION polystore_nodes_history() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    current_epoch BIGINT;
BEGIN
    current_epoch := COALESCE(
        NULLIF(current_setting('polystore.epoch', true), '')::BIGINT,
        (SELECT epoch FROM polystore_epoch WHERE id = 1)
    );
    IF OLD.epoch < current_epoch AND {_SEEN} THEN
        INSERT INTO polystore_node_history ({_COLUMNS}, epoch, valid_to)
        VALUES ({_OLD}, OLD.epoch, current_epoch)
        ON CONFLICT DO NOTHING;
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    NEW.epoch := current_epoch;
    RETURN NEW;
END
$$"""
PG_TRIGGER = """CREATE TRIGGER polystore_nodes_history BEFORE UPDATE OR DELETE ON polystore_nodes
FOR EACH ROW
WHEN (OLD.epoch < COALESCE(NULLIF(current_setting('polystore.epoch', true), '')::BIGINT,
                           9223372036854775807))
EXECUTE FUNCTION polystore_nodes_history()"""


def upgrade() -> None:
    epoch = op.create_table(
        "polystore_epoch",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("polystore_epoch_single_row_check")),
        sa.PrimaryKeyConstraint("id", name=op.f("polystore_epoch_pkey")),
    )
    op.bulk_insert(epoch, [{"id": 1, "epoch": 0}])
    op.create_table(
        "polystore_snapshots",
        sa.Column("id", Id, nullable=False),
        sa.Column("name", Name, nullable=True),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("polystore_snapshots_pkey")),
        sa.UniqueConstraint("name", name=op.f("polystore_snapshots_name_key")),
        sa.UniqueConstraint("epoch", name=op.f("polystore_snapshots_epoch_key")),
    )
    op.add_column(
        "polystore_nodes",
        sa.Column("epoch", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
    )
    op.create_table(
        "polystore_node_history",
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
        sa.Column("kind_id", Id, nullable=True),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("valid_to", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", "epoch", name=op.f("polystore_node_history_pkey")),
    )
    for columns in (["parent_id", "name"], ["blob_hash"], ["valid_to"]):
        op.create_index(
            op.f(f"polystore_node_history_{'_'.join(columns)}_idx"),
            "polystore_node_history",
            columns,
        )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_FUNCTION)
        op.execute(PG_TRIGGER)
    else:
        for trigger in SQLITE_TRIGGERS:
            op.execute(trigger)


def downgrade() -> None:
    # The snapshots go with their history; the live catalog is untouched.
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER polystore_nodes_history ON polystore_nodes")
        op.execute("DROP FUNCTION polystore_nodes_history()")
    else:
        for name in ("history_update", "history_delete", "stamp_epoch"):
            op.execute(f"DROP TRIGGER polystore_nodes_{name}")
    op.drop_table("polystore_node_history")
    op.drop_column("polystore_nodes", "epoch")  # (SQLite: 3.35 or later)
    op.drop_table("polystore_snapshots")
    op.drop_table("polystore_epoch")
