"""Content: blobs deduplicated by SHA-256 with reference counts.

Reference counts change in the same transaction as the nodes that point at the
blobs, so a rolled-back save leaves counts exactly as they were. Inline blobs
whose count drops to zero are deleted at once, in that same transaction.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.dialects import postgresql, sqlite

from polystore.backends.sql.bulk import BulkStatement, params_for
from polystore.backends.sql.models import blobs_table
from polystore.backends.sql.tree import chunks
from polystore.serializers import Buffer

__all__ = [
    "INLINE",
    "Content",
    "add_blobs",
    "add_references",
    "content_hash",
    "fetch_blobs",
    "lock_blobs",
    "release_blobs",
]

INLINE = "inline"
blobs = blobs_table


def content_hash(data: Buffer) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Content:
    """Bytes about to be stored, with their hash."""

    hash: str
    data: Buffer
    size: int


def add_blobs(
    conn: Connection,
    contents: Mapping[str, tuple[Content, int]],
    now: dt.datetime,
    external: Mapping[str, str] | None = None,
    existing: set[str] | None = None,
) -> None:
    """Store each content (if new) and add ``count`` references to it.

    A blob that exists gets its count raised (and keeps its placement), a new one
    is inserted with the count: inline, or, for hashes in ``external`` (already
    uploaded), as a row naming that store. ``existing`` is what
    :func:`lock_blobs` found: when known (PostgreSQL), new rows go in by binary
    COPY and existing ones get a plain UPDATE; otherwise one upsert per blob,
    sent as a single executemany.
    """
    where = external or {}
    rows = [
        (
            content.hash,
            content.size,
            where.get(content.hash, INLINE),
            count,
            None if content.hash in where else content.data,
            now,
        )
        for content, count in contents.values()
        if existing is None or content.hash not in existing
    ]
    if existing is None:
        _UPSERT_BLOBS.execute(conn, rows)
        return
    # A concurrent writer inserting the same new content makes the COPY fail on
    # the primary key; the whole transaction is then retried and finds it.
    _INSERT_BLOBS.execute(conn, rows)
    add_references(conn, Counter({h: count for h, (_, count) in contents.items() if h in existing}))


def _upsert_blobs(dialect: str) -> Any:
    insert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(blobs)
    return insert.values(params_for(_BLOB_COLUMNS)).on_conflict_do_update(
        index_elements=["hash"],
        set_={"refcount": blobs.c.refcount + insert.excluded.refcount},
    )


_BLOB_COLUMNS = [
    blobs.c.hash,
    blobs.c.size,
    blobs.c.store,
    blobs.c.refcount,
    blobs.c.data,
    blobs.c.created_at,
]
_UPSERT_BLOBS = BulkStatement(_upsert_blobs, _BLOB_COLUMNS)
_INSERT_BLOBS = BulkStatement(
    lambda dialect: blobs.insert().values(params_for(_BLOB_COLUMNS)),
    _BLOB_COLUMNS,
    copy_into="polystore_blobs",
)


def lock_blobs(conn: Connection, hashes: Iterable[str]) -> set[str] | None:
    """Lock existing blob rows in hash order; return which exist (PostgreSQL).

    Every writer takes its blob locks in the same order, so two transactions that
    add and release the same contents wait for each other instead of deadlocking.
    SQLite writers are serial already: nothing to lock, and None is returned.
    """
    if conn.dialect.name != "postgresql":
        return None
    wanted = sorted(h for h in hashes if h is not None)
    if not wanted:
        return set()
    # One statement with an array parameter, not chunks of IN lists.
    rows = conn.exec_driver_sql(
        "SELECT hash FROM polystore_blobs WHERE hash = ANY(%(hashes)s) ORDER BY hash FOR UPDATE",
        {"hashes": wanted},
    )
    return {h for (h,) in rows}


def add_references(conn: Connection, counts: Counter[str]) -> None:
    """Add references to blobs that already exist (copying nodes)."""
    if counts:
        conn.execute(
            blobs.update()
            .where(blobs.c.hash == sa.bindparam("h"))
            .values(refcount=blobs.c.refcount + sa.bindparam("n")),
            [{"h": h, "n": n} for h, n in sorted(counts.items())],
        )


def release_blobs(conn: Connection, counts: Counter[str]) -> None:
    """Drop references; delete inline blobs nobody references any more."""
    counts = Counter({h: n for h, n in counts.items() if h is not None and n})
    if not counts:
        return
    conn.execute(
        blobs.update()
        .where(blobs.c.hash == sa.bindparam("h"))
        .values(refcount=blobs.c.refcount - sa.bindparam("n")),
        [{"h": h, "n": n} for h, n in sorted(counts.items())],
    )
    for part in chunks(sorted(counts)):
        conn.execute(
            blobs.delete().where(
                blobs.c.hash.in_(part), blobs.c.refcount == 0, blobs.c.store == INLINE
            )
        )


def fetch_blobs(conn: Connection, hashes: list[str]) -> dict[str, Any]:
    """``hash -> bytes`` for inline blobs."""
    found: dict[str, Any] = {}
    for part in chunks(sorted(set(hashes))):
        for h, data in conn.execute(
            sa.select(blobs.c.hash, blobs.c.data).where(blobs.c.hash.in_(part))
        ):
            found[h] = data
    return found
