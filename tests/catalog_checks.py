"""Checks on a SQL catalog's bookkeeping that several test modules share."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from polystore import StorageBackend
from polystore.backends.sql import SQLBackend
from polystore.backends.sql.models import nodes_table


def file_kinds(conn: sa.Connection) -> list[Any]:
    """``(kind_id, serializer, serializer_version, dtype, shape, meta)`` of every file."""
    nodes = nodes_table
    columns = ("kind_id", "serializer", "serializer_version", "dtype", "shape", "meta")
    query = sa.select(*(nodes.c[name] for name in columns)).where(nodes.c.kind == "file")
    return list(conn.execute(query).all())


def refcounts(backend: SQLBackend) -> tuple[dict[str, int], dict[str, int]]:
    """``(stored, referenced)``: each live blob's refcount, and how many file nodes point at it."""
    with backend.engine.connect() as conn:
        stored = dict(conn.execute(sa.text("SELECT hash, refcount FROM polystore_blobs")).all())
        referenced = dict(
            conn.execute(
                sa.text(
                    "SELECT blob_hash, COUNT(*) FROM polystore_nodes "
                    "WHERE kind = 'file' GROUP BY blob_hash"
                )
            ).all()
        )
    return {h: n for h, n in stored.items() if n}, referenced


def assert_refcounts_consistent(backend: SQLBackend) -> None:
    """Every blob's reference count equals the number of files that use it."""
    stored, referenced = refcounts(backend)
    assert stored == referenced


def write_calls(b: StorageBackend) -> dict[str, Callable[[], Any]]:
    """One call of each kind of write, by name, on a backend holding ``keep/existing.bin``."""

    def in_transaction() -> None:
        with b.transaction():
            b.save(b"t", "t.bin")

    return {
        "save": lambda: b.save(b"x", "new.bin"),
        "save over": lambda: b.save(b"x", "keep/existing.bin"),
        "save_batch": lambda: b.save_batch([b"1", b"2"], ["n/1.bin", "n/2.bin"]),
        "delete": lambda: b.delete("keep/existing.bin"),
        "delete tree": lambda: b.delete("keep", recursive=True),
        "move": lambda: b.move("keep/existing.bin", "moved.bin"),
        "copy": lambda: b.copy("keep", "copied"),
        "ensure_directory": lambda: b.ensure_directory("newdir"),
        "transaction": in_transaction,
    }


def damage_sqlite_table(db: Path, table: str) -> None:
    """Flip the bits of the page-type byte of ``table``'s root page in SQLite file ``db``.

    Everything is checkpointed into the file first (no connection may be open).
    A root page whose type byte is not one of SQLite's four b-tree page types
    makes every statement that reads the table fail with "database disk image
    is malformed", whatever the rest of the page holds; other tables stay
    readable.
    """
    import sqlite3

    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,))
    finally:
        conn.close()
    offset = (root[0] - 1) * page_size + (100 if root[0] == 1 else 0)  # (page 1: file header)
    with db.open("r+b") as fh:
        fh.seek(offset)
        page_type = fh.read(1)[0]
        assert page_type in (0x02, 0x05, 0x0A, 0x0D), page_type
        fh.seek(offset)
        fh.write(bytes([page_type ^ 0xFF]))
