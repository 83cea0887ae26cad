"""Checks on a SQL catalog's bookkeeping that several test modules share."""

from __future__ import annotations

import sqlalchemy as sa

from polystore.backends.sql import SQLBackend


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
