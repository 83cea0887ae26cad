"""Garbage collection and rebalancing of blobs, from the catalog's own records.

``gc()`` never lists the external store. It knows what may be garbage from two
tables: blob rows whose reference count fell to zero (external blobs are kept
at zero until gc, inline ones are deleted at once), and upload intents older
than the grace period (uploads whose writer died or whose transaction rolled
back). Each object is deleted inside a transaction that holds its hash's lock
and has just checked that no blob row and no intent needs it, so a writer
running at the same time either protected the object first or uploads it again
afterwards; see :mod:`polystore.backends.sql.placement`.

``rebalance()`` moves blobs between inline and external placement to match an
inline limit, one blob per transaction, so an interruption leaves every blob
whole in one place or the other.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from polystore.backends.sql.content import INLINE, Content
from polystore.backends.sql.models import blobs_table as blobs
from polystore.backends.sql.models import intents_table as intents
from polystore.backends.sql.placement import Placement, Staged, lock_hashes
from polystore.backends.sql.tree import chunks
from polystore.errors import IntegrityError

__all__ = ["DEFAULT_GRACE", "GCReport", "RebalanceReport", "collect_garbage", "rebalance"]

#: How old an upload intent must be before gc() treats its upload as abandoned.
#: It must outlast the longest save: a writer whose intent expires mid-upload
#: does not lose data, but its save fails and is retried.
DEFAULT_GRACE = dt.timedelta(hours=24)
#: Blobs examined per gc transaction.
GC_BATCH = 100


#: Written out, not bound, so both databases plan it on the partial index
#: polystore_blobs_unreferenced_idx.
UNREFERENCED = blobs.c.refcount == sa.literal_column("0")


@dataclass(frozen=True)
class GCReport:
    """What :meth:`SQLBackend.gc` removed."""

    #: Blob rows no file referenced, deleted (inline and external).
    blobs_deleted: int = 0
    #: Their total size in bytes.
    bytes_freed: int = 0
    #: Upload intents older than the grace period, deleted.
    intents_expired: int = 0
    #: Objects deleted from the external store (unreferenced blobs and abandoned uploads).
    objects_deleted: int = 0


@dataclass(frozen=True)
class RebalanceReport:
    """What :meth:`SQLBackend.rebalance` moved."""

    #: Blobs moved out of the database into the external store.
    to_external: int = 0
    #: Blobs moved from the external store into the database.
    to_inline: int = 0
    #: Bytes moved, both ways.
    bytes_moved: int = 0


def _read(placement: Placement, work: Any) -> Any:
    with placement.engine.connect() as conn:
        return work(conn)


def _as_timedelta(grace: dt.timedelta | float) -> dt.timedelta:
    if isinstance(grace, dt.timedelta):
        return grace
    return dt.timedelta(seconds=float(grace))


def collect_garbage(
    placement: Placement, *, grace: dt.timedelta | float = DEFAULT_GRACE
) -> GCReport:
    """Remove unreferenced blobs and abandoned uploads; see :meth:`SQLBackend.gc`."""
    cutoff = dt.datetime.now(dt.UTC) - _as_timedelta(grace)
    blobs_deleted, bytes_freed = placement.transact(_drop_inline_garbage)
    objects = intents_expired = 0
    store = placement.store
    if store is not None:
        # Abandoned uploads first: an expired intent may be all that keeps an
        # unreferenced blob from being collected, and it should go in this run.
        expired = _read(
            placement,
            lambda conn: list(
                conn.execute(
                    sa.select(intents.c.id).where(
                        intents.c.created_at < cutoff, intents.c.store == store.name
                    )
                ).scalars()
            ),
        )
        for part in chunks(expired, GC_BATCH):
            claimed, deleted = placement.transact(partial(placement.release, intent_ids=part))
            intents_expired += claimed
            objects += deleted
        candidates = _read(
            placement,
            lambda conn: list(
                conn.execute(
                    sa.select(blobs.c.hash).where(UNREFERENCED, blobs.c.store == store.name)
                ).scalars()
            ),
        )
        for part in chunks(candidates, GC_BATCH):
            n, size = placement.transact(partial(_drop_external, placement=placement, hashes=part))
            blobs_deleted += n
            bytes_freed += size
            objects += n
    return GCReport(blobs_deleted, bytes_freed, intents_expired, objects)


def _drop_inline_garbage(conn: Connection) -> tuple[int, int]:
    # release_blobs deletes inline rows as their count reaches zero; this catches
    # any left by older versions or by hand edits.
    sizes = (
        conn.execute(
            blobs.delete().where(UNREFERENCED, blobs.c.store == INLINE).returning(blobs.c.size)
        )
        .scalars()
        .all()
    )
    return len(sizes), int(sum(sizes))


def _drop_external(
    conn: Connection, placement: Placement, hashes: Sequence[str]
) -> tuple[int, int]:
    store = placement.store
    assert store is not None
    lock_hashes(conn, hashes)
    stmt = sa.select(blobs.c.hash, blobs.c.size).where(
        blobs.c.hash.in_(list(hashes)), blobs.c.refcount == 0, blobs.c.store == store.name
    )
    if conn.dialect.name == "postgresql":
        # A writer adding a reference holds the row: leave it to that writer.
        stmt = stmt.with_for_update(skip_locked=True)
    rows = {h: int(size) for h, size in conn.execute(stmt)}
    busy = set(
        conn.execute(
            sa.select(intents.c.hash).where(intents.c.hash.in_(list(rows))).distinct()
        ).scalars()
    )
    doomed = sorted(set(rows) - busy)
    if not doomed:
        return 0, 0
    # The objects go first, inside this transaction: if deleting one fails the
    # rows stay (with nothing referring to them) and the next gc tries again.
    store.delete(doomed)
    conn.execute(blobs.delete().where(blobs.c.hash.in_(doomed), blobs.c.refcount == 0))
    return len(doomed), int(sum(rows[h] for h in doomed))


# -- rebalance --------------------------------------------------------------------


def rebalance(placement: Placement, inline_limit: int) -> RebalanceReport:
    """Move blobs so that exactly those over ``inline_limit`` bytes are external.

    Only blobs in this backend's store (or inline) move; each move is its own
    transaction. Content is verified against its hash before it moves, so
    corruption is never copied: an :class:`~polystore.errors.IntegrityError`
    stops the rebalance with every blob moved so far in its new place.
    """
    store = placement.store
    if store is None:
        return RebalanceReport()
    outgoing = _read(
        placement,
        lambda conn: conn.execute(
            sa.select(blobs.c.hash, blobs.c.size).where(
                blobs.c.store == INLINE, blobs.c.size > inline_limit, blobs.c.refcount > 0
            )
        ).all(),
    )
    incoming = _read(
        placement,
        lambda conn: conn.execute(
            sa.select(blobs.c.hash, blobs.c.size).where(
                blobs.c.store == store.name, blobs.c.size <= inline_limit, blobs.c.refcount > 0
            )
        ).all(),
    )
    moved_out = moved_in = moved_bytes = 0
    for content_hash, size in outgoing:
        if _move_out(placement, content_hash, size):
            moved_out += 1
            moved_bytes += size
    for content_hash, size in incoming:
        if _move_in(placement, content_hash, size):
            moved_in += 1
            moved_bytes += size
    return RebalanceReport(moved_out, moved_in, moved_bytes)


def _move_out(placement: Placement, content_hash: str, size: int) -> bool:
    data = _read(
        placement,
        lambda conn: conn.execute(
            sa.select(blobs.c.data).where(blobs.c.hash == content_hash, blobs.c.store == INLINE)
        ).scalar(),
    )
    if data is None:
        return False  # deleted or moved meanwhile
    if len(data) != size or hashlib.sha256(data).hexdigest() != content_hash:
        raise IntegrityError(f"inline blob {content_hash} does not match its size or hash")
    assert placement.store is not None
    store_name = placement.store.name

    def switch(staged: Staged | None) -> bool:
        def work(conn: Connection) -> bool:
            moved = conn.execute(
                blobs.update()
                .where(blobs.c.hash == content_hash, blobs.c.store == INLINE)
                .values(store=store_name, data=None)
            ).rowcount
            placement.promote(conn, staged)
            return bool(moved)

        return placement.transact(work)

    return placement.run([Content(content_hash, data, size)], switch, force=True)


def _move_in(placement: Placement, content_hash: str, size: int) -> bool:
    store = placement.store
    assert store is not None
    data = placement.read(content_hash, size, f"blob {content_hash}")

    def work(conn: Connection) -> int | None:
        moved = conn.execute(
            blobs.update()
            .where(blobs.c.hash == content_hash, blobs.c.store == store.name)
            .values(store=INLINE, data=data)
        ).rowcount
        if not moved:
            return None
        # The object is garbage once this commits. An intent marks it, so that
        # if this process dies before the release below, gc() still finds it.
        return int(
            conn.execute(
                intents.insert()
                .values(
                    hash=content_hash,
                    store=store.name,
                    size=size,
                    created_at=dt.datetime.now(dt.UTC),
                    owner="rebalance",
                )
                .returning(intents.c.id)
            ).scalar_one()
        )

    intent_id = placement.transact(work)
    if intent_id is None:
        return False
    placement.settle([Staged(intents={content_hash: intent_id})], quiet=True)
    return True
