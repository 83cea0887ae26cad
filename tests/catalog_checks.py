"""Checks on a SQL catalog's bookkeeping that several test modules share."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from polystore import StorageBackend
from polystore.backends.sql import SQLBackend
from polystore.backends.sql.models import nodes_table
from polystore.hashing import named


def content_hash(backend: SQLBackend, data: Any) -> str:
    """The name ``backend``'s catalog gives content ``data`` (by its own hash algorithm)."""
    return named(backend.hash_algorithm).of(data)


def made_before_0010(url: str) -> None:
    """Make a fresh catalog at ``url`` as one that held content before revision 0010 was:
    its content named by SHA-256. Only such a catalog goes below 0010 with its content
    (a catalog whose content BLAKE3 names refuses: see
    ``test_a_catalog_of_blake3_content_refuses_to_go_below_0010``)."""
    with SQLBackend(url) as backend, backend.engine.begin() as conn:
        conn.execute(sa.text("UPDATE polystore_identity SET hash_algorithm = 'sha256'"))


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


def catalog_rows(backend: SQLBackend) -> dict[str, list[str]]:
    """Every row of every polystore table, as text: what "nothing written" compares."""
    tables = ["polystore_nodes", "polystore_blobs", "polystore_kinds", "polystore_upload_intents"]
    with backend.engine.connect() as conn:
        return {
            table: sorted(
                repr(tuple(row)) for row in conn.execute(sa.text(f"SELECT * FROM {table}"))
            )
            for table in tables
        }


def plant_files(backend: SQLBackend, rows: list[tuple[str, str, str]]) -> None:
    """Insert ``(name, hash, store)`` file rows under ``planted/``, and their blob rows."""
    now = dt.datetime.now(dt.UTC)
    with backend.engine.begin() as conn:
        parent = conn.execute(
            sa.text(
                "INSERT INTO polystore_nodes (parent_id, name, kind, created_at, modified_at) "
                "VALUES (0, 'planted', 'dir', :t, :t) RETURNING id"
            ),
            {"t": now},
        ).scalar_one()
        for name, digest, store in rows:
            conn.execute(
                sa.text(
                    "INSERT INTO polystore_blobs (hash, size, store, refcount, data, created_at) "
                    "VALUES (:h, 1, :s, 1, :d, :t)"
                ),
                {"h": digest, "s": store, "d": b"y" if store == "inline" else None, "t": now},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO polystore_nodes (parent_id, name, kind, size, serializer, "
                    "serializer_version, blob_hash, created_at, modified_at) "
                    "VALUES (:p, :n, 'file', 1, 'bytes', 1, :h, :t, :t)"
                ),
                {"p": parent, "n": name, "h": digest, "t": now},
            )


def damage_columns(
    backend: SQLBackend, name: str, *, without_kind: bool = False, **columns: str
) -> None:
    """Overwrite JSON columns of the node named ``name`` with raw text, as another program
    could (PostgreSQL's ``jsonb`` takes only JSON); ``without_kind`` clears its kind id."""
    cast = "CAST(:{} AS JSONB)" if backend.engine.dialect.name == "postgresql" else ":{}"
    sets = [f"{column} = {cast.format(column)}" for column in columns]
    if without_kind:
        sets.append("kind_id = NULL")
    with backend.engine.begin() as conn:
        changed = conn.execute(
            sa.text(f"UPDATE polystore_nodes SET {', '.join(sets)} WHERE name = :name"),
            {"name": name, **columns},
        ).rowcount
    assert changed == 1
