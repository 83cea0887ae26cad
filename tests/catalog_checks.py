"""Checks on a SQL catalog's bookkeeping that several test modules share."""

from __future__ import annotations

from collections.abc import Callable
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
