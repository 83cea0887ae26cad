"""Content: blobs deduplicated by hash (:mod:`polystore.hashing`), with reference counts.

Reference counts change in the same transaction as the nodes that point at the
blobs, so a rolled-back save leaves counts exactly as they were. Inline blobs
whose count drops to zero are deleted at once, in that same transaction.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any, Protocol, runtime_checkable

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.dialects import postgresql, sqlite

from polystore.backends.sql.bulk import LITERALS_FROM, BulkStatement, bound, params_for
from polystore.backends.sql.engine import driver_fetch
from polystore.backends.sql.inline import WHOLE, insert_in_pieces
from polystore.backends.sql.models import blobs_table, history_table
from polystore.backends.sql.tree import chunks
from polystore.serializers import Buffer

__all__ = [
    "INLINE",
    "ChunkSource",
    "Content",
    "add_blobs",
    "add_references",
    "fetch_blobs",
    "lock_blobs",
    "release_blobs",
    "stored_checksums",
]

INLINE = "inline"
blobs = blobs_table


@runtime_checkable
class ChunkSource(Protocol):
    """Content too large to hold in memory: read again, a chunk at a time, for each upload.

    :mod:`polystore.backends.sql.stream` makes one of a local file.
    """

    def chunks(self) -> Iterator[Buffer]:
        """The content from its first byte, in pieces; raises if it is not what was hashed."""
        ...


def stored_checksums(conn: Connection, content_hash: str) -> bytes | None:
    """The piece checksums a blob's row records (:mod:`.checksums`), if any."""
    return conn.execute(sa.select(blobs.c.checksums).where(blobs.c.hash == content_hash)).scalar()


@dataclass(frozen=True)
class Content:
    """Bytes about to be stored (in memory, or a :class:`ChunkSource`), with their hash."""

    hash: str
    data: Buffer | ChunkSource
    size: int


def add_blobs(
    conn: Connection,
    hashes: Sequence[str],
    sizes: Sequence[int],
    datas: Sequence[Buffer],
    now: dt.datetime,
    external: Mapping[str, str] | None = None,
    existing: set[str] | None = None,
    checksums: Mapping[str, bytes] | None = None,
) -> None:
    """Store each content (if new) and add one reference per entry.

    Entry ``i`` is content ``datas[i]`` of ``sizes[i]`` bytes and hash
    ``hashes[i]``; a hash may repeat (so may its reference). A blob that exists
    gets its count raised (and keeps its placement), a new one is inserted with
    the count: inline, or, for hashes in ``external`` (already uploaded), as a
    row naming that store and recording the hash's ``checksums``. ``existing`` is what :func:`lock_blobs` found: when
    known (PostgreSQL), new rows go in by binary COPY and existing ones get a
    plain UPDATE; otherwise one upsert per blob, streamed as a single
    executemany. Rows go in hash order.
    """
    where = external or {}
    sums = checksums or {}
    statement = _UPSERT_BLOBS if existing is None else _INSERT_BLOBS
    processors = statement.processors(conn)
    created = bound(processors, "created_at", now)
    if conn.dialect.name == "sqlite" and max(sizes, default=0) > WHOLE:
        hashes, sizes, datas = _add_large_inline(conn, hashes, sizes, datas, where, created)
        if not hashes:
            return
    first = dict(zip(hashes, range(len(hashes)), strict=True))  # hash -> an entry holding it
    counts: Counter[str] | None = None if len(first) == len(hashes) else Counter(hashes)
    data_processor = processors.get("data")

    def some_rows() -> Iterator[tuple[Any, ...]]:
        for h in sorted(first):
            if existing is not None and h in existing:
                continue
            i = first[h]
            data = None if h in where else datas[i]
            if data is not None and data_processor is not None:
                data = data_processor(data)
            count = 1 if counts is None else counts[h]
            yield (h, sizes[i], where.get(h, INLINE), count, created, sums.get(h), data)

    if counts is None and not where and not existing:
        _add_distinct_inline(conn, statement, hashes, sizes, datas, created, data_processor)
        return
    # A concurrent writer inserting the same new content makes the COPY fail on
    # the primary key; the whole transaction is then retried and finds it.
    statement.execute_processed(conn, some_rows())
    if existing:
        add_references(
            conn, Counter({h: 1 if counts is None else counts[h] for h in existing if h in first})
        )


def _add_large_inline(
    conn: Connection,
    hashes: Sequence[str],
    sizes: Sequence[int],
    datas: Sequence[Buffer],
    external: Mapping[str, str],
    created: Any,
) -> tuple[Sequence[str], Sequence[int], Sequence[Buffer]]:
    """:func:`add_blobs` of the inline contents over :data:`~.inline.WHOLE` bytes (SQLite).

    A content stored already gets its references; a new one is written
    through a BLOB handle (:func:`~.inline.insert_in_pieces`), with no copy of
    it made. Returns the other entries, for the rest of :func:`add_blobs`.
    """
    large: dict[str, list[int]] = {}
    for i, (h, size) in enumerate(zip(hashes, sizes, strict=True)):
        if size > WHOLE and h not in external:
            large.setdefault(h, []).append(i)
    if not large:
        return hashes, sizes, datas
    for h in sorted(large):
        entries = large[h]
        stored = driver_fetch(
            conn,
            "UPDATE polystore_blobs SET refcount = refcount + ? WHERE hash = ? RETURNING 1",
            (len(entries), h),
        )
        if not stored:
            i = entries[0]
            insert_in_pieces(conn, (h, sizes[i], len(entries), created), datas[i])
    rest = [i for i, h in enumerate(hashes) if h not in large]
    return [hashes[i] for i in rest], [sizes[i] for i in rest], [datas[i] for i in rest]


def _add_distinct_inline(
    conn: Connection,
    statement: BulkStatement,
    hashes: Sequence[str],
    sizes: Sequence[int],
    datas: Sequence[Buffer],
    created: Any,
    data_processor: Any,
) -> None:
    """:func:`add_blobs` of the common batch: distinct new contents, all inline.

    The rows are zipped together in C: no Python code runs per row.
    """
    order = sorted(range(len(hashes)), key=hashes.__getitem__)
    keys, lengths = map(hashes.__getitem__, order), map(sizes.__getitem__, order)
    contents = map(datas.__getitem__, order)
    if data_processor is not None:
        contents = map(data_processor, contents)
    if conn.dialect.name == "sqlite" and len(hashes) >= LITERALS_FROM:
        # Store, count and time are one value for every row: SQLite gets
        # them as literals, and binds only hash, size and bytes. (Not for a
        # few rows: see BulkStatement.execute_groups.)
        shared = {"store": INLINE, "refcount": 1, "created_at": created, "checksums": None}
        statement.execute_groups(conn, [(shared, zip(keys, lengths, contents, strict=True))])
        return
    # (A concurrent writer inserting the same content fails the COPY: retried.)
    statement.execute_processed(
        conn, zip(keys, lengths, repeat(INLINE), repeat(1), repeat(created), repeat(None), contents)
    )


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
    blobs.c.created_at,
    blobs.c.checksums,
    blobs.c.data,  # (the table's last column: see models.Blob)
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
    # One statement, not chunks of IN lists, and one text parameter, not an
    # array: psycopg dumps a list of 10,000 strings in Python (~3 µs each).
    rows = conn.exec_driver_sql(
        "SELECT hash FROM polystore_blobs WHERE hash = ANY(string_to_array(%(hashes)s, ',')) "
        "ORDER BY hash FOR UPDATE",
        {"hashes": ",".join(wanted)},
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
    """Drop references; delete inline blobs nobody references any more.

    A blob a history row refers to (a kept snapshot's old version of a file)
    stays, at count zero: ``gc()`` deletes it once no snapshot needs it. Only
    live files count in ``refcount``; snapshots keep content by existing.
    """
    counts = Counter({h: n for h, n in counts.items() if h is not None and n})
    if not counts:
        return
    if conn.dialect.name != "postgresql":
        # SQLite writers run one at a time: no lock order to keep. The hashes
        # dropping the same count (nearly always 1) go as IN lists, one
        # statement per 500 instead of one per hash (a recursive delete of
        # 100,000 files: ~0.6 s less). Inline blobs left with no reference go
        # first, deleted outright rather than updated to zero and then
        # deleted: a recursive delete of files of distinct content touches
        # each blob row once.
        by_count: dict[int, list[str]] = {}
        for h, n in sorted(counts.items()):
            by_count.setdefault(n, []).append(h)
        for n, group in by_count.items():
            for part in chunks(group):
                conn.execute(_DROP_UNREFERENCED, {"n": n, "hashes": part})
                conn.execute(_DROP_REFERENCES, {"n": n, "hashes": part})
        return
    # One row at a time in hash order: the order every writer locks blob
    # rows in (docs/reliability.rst), which an IN list does not promise.
    conn.execute(
        blobs.update()
        .where(blobs.c.hash == sa.bindparam("h"))
        .values(refcount=blobs.c.refcount - sa.bindparam("n")),
        [{"h": h, "n": n} for h, n in sorted(counts.items())],
    )
    for part in chunks(sorted(counts)):
        conn.execute(blobs.delete().where(blobs.c.hash.in_(part), *_left_unreferenced(0)))


def _left_unreferenced(count: Any) -> tuple[Any, ...]:
    """Conditions on a blob row: inline, held by ``count`` references, and by no
    history row (a kept snapshot's file): dropping ``count`` leaves it unused.

    Not "refcount = :count" but "refcount + 0": with 0, the planners would
    read the partial index of unreferenced blobs, which every blob a delete
    freed is in, for each chunk (SQLite: a recursive delete of 1,000,000
    files read ~10**9 entries), instead of the primary key.
    """
    return (
        blobs.c.refcount + 0 == count,
        blobs.c.store == INLINE,
        ~sa.exists().where(history_table.c.blob_hash == blobs.c.hash),
    )


_DROP_REFERENCES = (
    blobs.update()
    .where(blobs.c.hash.in_(sa.bindparam("hashes", expanding=True)))
    .values(refcount=blobs.c.refcount - sa.bindparam("n"))
)

#: The inline blobs among ``hashes`` that dropping ``n`` references leaves
#: unreferenced, deleted (SQLite, before :data:`_DROP_REFERENCES`).
_DROP_UNREFERENCED = blobs.delete().where(
    blobs.c.hash.in_(sa.bindparam("hashes", expanding=True)),
    *_left_unreferenced(sa.bindparam("n")),
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
