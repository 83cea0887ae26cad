"""The catalog's tables, as SQLAlchemy 2.x typed models.

Every name is prefixed ``polystore_`` so a catalog can share a database with an
application. The schema itself is created and evolved only by the Alembic
migrations in ``migrations/``; these models are what those migrations must match
(``polystore db check`` compares them).

* ``polystore_nodes`` -- the directory tree as an adjacency list: one row per file
  or directory, ``UNIQUE(parent_id, name)``. The root is the row with ``id = 0``
  and no parent. Moving a directory rewrites one row.
* ``polystore_blobs`` -- content, keyed by its hash (:mod:`polystore.hashing`),
  with a reference count kept in the same transaction as the nodes that point
  at it. ``store`` says where the bytes live: ``'inline'`` (the deferred
  ``data`` column) or the name of an external blob store; external rows also
  record the checksums a load checks (``checksums``, revision 0007).
* ``polystore_upload_intents`` -- uploads to external blob stores in flight. An
  intent is committed before the upload starts and deleted in the transaction
  that commits the blob row, so ``gc()`` finds abandoned uploads without listing
  the bucket.
* ``polystore_tree_version`` -- one row, a counter that every directory move
  or delete raises in its own transaction. Readers cache directory ids by path
  and use a cached id only while the counter is unchanged.
* ``polystore_kinds`` -- one row per distinct kind of file: serializer, its
  version, dtype, shape and meta, as every file of that kind records them.
  The id is derived from those values (:mod:`~polystore.backends.sql.kinds`),
  so it means the same in every catalog; rows are only ever added. A file's
  ``kind_id`` lets a batch load read one integer per file instead of four
  columns (revision 0004).
* ``polystore_identity`` -- one row, the catalog's identity: a UUID drawn
  once, when the row is created, and never changed (revision 0005). An
  external blob store records the identity of the catalog it belongs to
  (:mod:`~polystore.backends.sql.identity`). Since revision 0010 it also
  names the hash algorithm of the catalog's content
  (:mod:`~polystore.hashing`).
* ``polystore_epoch`` -- one row, the catalog's current epoch: what
  :meth:`~polystore.SQLBackend.snapshot` records and raises (revision 0006).
* ``polystore_snapshots`` -- one row per kept snapshot: its name and the epoch
  it sees (revision 0006).
* ``polystore_node_history`` -- old versions of node rows that a kept snapshot
  can still see, each valid from ``epoch`` until ``valid_to``; written by
  triggers on ``polystore_nodes`` (revision 0006, :mod:`.history`).
* ``polystore_catalog`` -- a read-only view with one row per node and its full
  path (defined in the migrations, not here).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, deferred, mapped_column

__all__ = [
    "ROOT_ID",
    "Base",
    "Blob",
    "Epoch",
    "Identity",
    "Kind",
    "Node",
    "NodeHistory",
    "SnapshotRecord",
    "TreeVersion",
    "UploadIntent",
    "blobs_table",
    "epoch_table",
    "history_table",
    "identity_table",
    "intents_table",
    "kinds_table",
    "nodes_table",
    "snapshots_table",
    "tree_version_table",
]

#: The root directory's fixed id.
ROOT_ID = 0

# Every constraint and index name starts with its polystore_ table's name (the
# style PostgreSQL itself uses), so everything polystore owns is polystore_*.
NAMING_CONVENTION = {
    "ix": "%(table_name)s_%(column_0_N_name)s_idx",
    "uq": "%(table_name)s_%(column_0_N_name)s_key",
    "ck": "%(table_name)s_%(constraint_name)s_check",
    "fk": "%(table_name)s_%(column_0_name)s_fkey",
    "pk": "%(table_name)s_pkey",
}

# Node ids are 64-bit on PostgreSQL; on SQLite a plain INTEGER PRIMARY KEY is the
# rowid alias (BIGINT would not be).
Id = Annotated[int, mapped_column(BigInteger().with_variant(Integer(), "sqlite"))]
# Names compare by code point everywhere: the "C" collation on PostgreSQL,
# SQLite's default BINARY on UTF-8 text.
Name = Annotated[str, mapped_column(Text().with_variant(Text(collation="C"), "postgresql"))]
JSONDoc = Annotated[
    Any,
    mapped_column(
        JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
    ),
]
Timestamp = Annotated[dt.datetime, mapped_column(DateTime(timezone=True))]
Hash = Annotated[str, mapped_column(String(64))]


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Blob(Base):
    __tablename__ = "polystore_blobs"

    hash: Mapped[Hash] = mapped_column(primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    store: Mapped[str] = mapped_column(String(64))
    refcount: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[Timestamp]
    #: A digest of each piece of external content, what a load checks (revision
    #: 0007, :mod:`.checksums`); NULL inline and for rows written before.
    checksums: Mapped[bytes | None] = deferred(mapped_column(LargeBinary, nullable=True))
    #: Last (on SQLite since revision 0009): large inline content is saved
    #: through a BLOB handle into a row inserted with ``zeroblob(size)``, which
    #: SQLite stores without allocating it only as the last non-empty column.
    data: Mapped[bytes | None] = deferred(mapped_column(LargeBinary, nullable=True))

    __table_args__ = (
        CheckConstraint("refcount >= 0", name="refcount_nonnegative"),
        CheckConstraint("store <> 'inline' OR data IS NOT NULL", name="inline_has_data"),
        # gc()'s candidates, without a scan of every blob (revision 0003).
        Index(
            "polystore_blobs_unreferenced_idx",
            "store",
            sqlite_where=text("refcount = 0"),
            postgresql_where=text("refcount = 0"),
        ),
    )


class Node(Base):
    __tablename__ = "polystore_nodes"

    id: Mapped[Id] = mapped_column(primary_key=True)
    parent_id: Mapped[int | None] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"),
        ForeignKey("polystore_nodes.id", ondelete="CASCADE"),
    )
    name: Mapped[Name]
    kind: Mapped[str] = mapped_column(String(4))
    size: Mapped[int | None] = mapped_column(BigInteger)
    serializer: Mapped[str | None] = mapped_column(String(64))
    serializer_version: Mapped[int | None] = mapped_column(Integer)
    dtype: Mapped[str | None] = mapped_column(Text)
    shape: Mapped[JSONDoc | None]
    meta: Mapped[JSONDoc | None]
    attrs: Mapped[JSONDoc | None]
    blob_hash: Mapped[str | None] = mapped_column(String(64), ForeignKey("polystore_blobs.hash"))
    created_at: Mapped[Timestamp]
    modified_at: Mapped[Timestamp]
    #: The id in ``polystore_kinds`` of the columns above (files only; revision
    #: 0004). Derived from them, not a foreign key; ``fsck`` checks it. Last,
    #: as the migration adds it.
    kind_id: Mapped[int | None] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"))
    #: The epoch in which the row was last written (revision 0006): a
    #: snapshot of epoch ``e`` sees the row if ``epoch <= e``; see
    #: :mod:`~polystore.backends.sql.history`.
    epoch: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))

    __table_args__ = (
        UniqueConstraint("parent_id", "name"),
        CheckConstraint("kind IN ('file', 'dir')", name="kind_valid"),
        CheckConstraint("(parent_id IS NULL) = (id = 0)", name="only_root_has_no_parent"),
        CheckConstraint("kind = 'dir' OR blob_hash IS NOT NULL", name="file_has_blob"),
        Index(None, "blob_hash"),
        Index(None, "dtype"),
    )


class Kind(Base):
    """What every file of one kind shares (revision 0004); see :mod:`.kinds`."""

    __tablename__ = "polystore_kinds"

    id: Mapped[Id] = mapped_column(primary_key=True, autoincrement=False)
    #: The canonical JSON text the id is derived from, to tell a collision.
    key: Mapped[str] = mapped_column(Text)
    serializer: Mapped[str] = mapped_column(String(64))
    serializer_version: Mapped[int] = mapped_column(Integer)
    dtype: Mapped[str | None] = mapped_column(Text)
    shape: Mapped[JSONDoc | None]
    meta: Mapped[JSONDoc | None]


class UploadIntent(Base):
    __tablename__ = "polystore_upload_intents"

    id: Mapped[Id] = mapped_column(primary_key=True)
    hash: Mapped[Hash]
    store: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[Timestamp]
    #: Who is uploading ("host:pid"), to help a human reading a stuck intent.
    owner: Mapped[str] = mapped_column(String(255))

    __table_args__ = (Index(None, "hash"), Index(None, "created_at"))


class TreeVersion(Base):
    """One row: a counter every directory move or delete raises (revision 0003)."""

    __tablename__ = "polystore_tree_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)


class Identity(Base):
    """One row: the catalog's identity (revision 0005)."""

    __tablename__ = "polystore_identity"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: A UUID (its 36-character text form), drawn once and never changed.
    catalog_id: Mapped[str] = mapped_column(String(36))
    #: When the catalog was given it: created, or upgraded to revision 0005.
    created_at: Mapped[Timestamp]
    #: The hash that names its content: ``blake3``, or ``sha256`` for content
    #: stored before revision 0010 (:mod:`~polystore.hashing`).
    hash_algorithm: Mapped[str] = mapped_column(String(16), server_default=text("'sha256'"))

    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)


class Epoch(Base):
    """One row: the catalog's current epoch (revision 0006)."""

    __tablename__ = "polystore_epoch"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    epoch: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)


class SnapshotRecord(Base):
    """One kept snapshot (revision 0006): it sees what was written up to ``epoch``."""

    __tablename__ = "polystore_snapshots"

    id: Mapped[Id] = mapped_column(primary_key=True)
    name: Mapped[str | None] = mapped_column(
        Text().with_variant(Text(collation="C"), "postgresql"), unique=True
    )
    epoch: Mapped[int] = mapped_column(BigInteger, unique=True)
    created_at: Mapped[Timestamp]
    message: Mapped[str | None] = mapped_column(Text)


class NodeHistory(Base):
    """An old version of a node row, valid over epochs ``[epoch, valid_to)`` (revision 0006).

    Written only by the triggers on ``polystore_nodes``, and only while a kept
    snapshot can see the version; removed by ``delete_snapshot`` and ``gc``.
    """

    __tablename__ = "polystore_node_history"

    id: Mapped[Id] = mapped_column(primary_key=True, autoincrement=False)
    parent_id: Mapped[int | None] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"))
    name: Mapped[Name]
    kind: Mapped[str] = mapped_column(String(4))
    size: Mapped[int | None] = mapped_column(BigInteger)
    serializer: Mapped[str | None] = mapped_column(String(64))
    serializer_version: Mapped[int | None] = mapped_column(Integer)
    dtype: Mapped[str | None] = mapped_column(Text)
    shape: Mapped[JSONDoc | None]
    meta: Mapped[JSONDoc | None]
    attrs: Mapped[JSONDoc | None]
    #: Not a foreign key: PostgreSQL would check every blob row deleted against
    #: this table in a trigger of its own (measured: a recursive delete of
    #: 10,000 files ~30% slower). The deletes of blobs check ``NOT EXISTS``
    #: here themselves, and ``fsck`` checks every hash has its blob.
    blob_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[Timestamp]
    modified_at: Mapped[Timestamp]
    kind_id: Mapped[int | None] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"))
    epoch: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    valid_to: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (
        Index(None, "parent_id", "name"),
        Index(None, "blob_hash"),
        Index(None, "valid_to"),
    )


# Core handles on the tables, typed as tables (``__table__`` is typed as a
# plain FromClause) for the hot paths that bypass the ORM.
nodes_table = cast(Table, Node.__table__)
blobs_table = cast(Table, Blob.__table__)
intents_table = cast(Table, UploadIntent.__table__)
kinds_table = cast(Table, Kind.__table__)
tree_version_table = cast(Table, TreeVersion.__table__)
identity_table = cast(Table, Identity.__table__)
epoch_table = cast(Table, Epoch.__table__)
snapshots_table = cast(Table, SnapshotRecord.__table__)
history_table = cast(Table, NodeHistory.__table__)
