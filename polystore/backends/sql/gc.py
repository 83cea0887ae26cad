"""Garbage collection and rebalancing of blobs, from the catalog's own records.

``gc()`` never lists the external store. It knows what may be garbage from two
tables: blob rows whose reference count fell to zero (external blobs are kept
at zero until gc, inline ones are deleted at once), and upload intents older
than the grace period (uploads whose writer died or whose transaction rolled
back).

A blob row is deleted in a transaction that re-checks, in the same statement,
that its count is zero *and* that no file refers to it, and that locks it
(PostgreSQL, ``SKIP LOCKED``: a writer adding a reference holds the row, and
gc leaves it alone). That transaction leaves an upload intent in the row's
place. Only after it commits does the object go, through the upload
protocol's release (:meth:`~polystore.backends.sql.uploads.Uploads.release`):
under the hash's lock, and only if no blob row and no other intent needs the
object by then, so a writer running at the same time either protected the
object first or uploads it again afterwards. A row whose hash is not 64
lowercase hex digits (written by another program) is skipped and counted,
never a reason to stop; docs/reliability.rst has the whole protocol.

``rebalance()`` moves blobs between inline and external placement to match an
inline limit, one blob per transaction, so an interruption leaves every blob
whole in one place or the other.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from polystore.backends.sql.catalog import Catalog, utcnow
from polystore.backends.sql.content import INLINE, Content
from polystore.backends.sql.history import prune as prune_history
from polystore.backends.sql.inline import WHOLE, write_in_pieces
from polystore.backends.sql.models import blobs_table as blobs
from polystore.backends.sql.models import history_table as history
from polystore.backends.sql.models import intents_table as intents
from polystore.backends.sql.models import nodes_table as nodes
from polystore.backends.sql.tree import chunks
from polystore.backends.sql.uploads import LOCK_BATCH, Staged, Uploads, promote
from polystore.backends.sql.verify import ContentReader
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
    #: Unreferenced blob rows left alone because their hash is not 64 lowercase
    #: hex digits (written by another program; ``fsck()`` names them).
    rows_skipped: int = 0
    #: Old versions of files no kept snapshot can see any more, removed
    #: (``polystore_node_history``); their content is collected in the same run.
    history_pruned: int = 0


@dataclass(frozen=True)
class RebalanceReport:
    """What :meth:`SQLBackend.rebalance` moved."""

    #: Blobs moved out of the database into the external store.
    to_external: int = 0
    #: Blobs moved from the external store into the database.
    to_inline: int = 0
    #: Bytes moved, both ways.
    bytes_moved: int = 0


def _as_timedelta(grace: dt.timedelta | float) -> dt.timedelta:
    if isinstance(grace, dt.timedelta):
        return grace
    return dt.timedelta(seconds=float(grace))


def collect_garbage(
    catalog: Catalog, uploads: Uploads | None, *, grace: dt.timedelta | float = DEFAULT_GRACE
) -> GCReport:
    """Remove unreferenced blobs and abandoned uploads; see :meth:`SQLBackend.gc`."""
    cutoff = utcnow() - _as_timedelta(grace)
    # Old versions no snapshot sees first: what only they kept is garbage now.
    pruned = catalog.transact(prune_history)
    blobs_deleted, bytes_freed = catalog.transact(_drop_inline_garbage)
    objects = intents_expired = skipped = 0
    if uploads is not None:
        store = uploads.store
        # Abandoned uploads first: an expired intent may be all that keeps an
        # unreferenced blob from being collected, and it should go in this run.
        expired = catalog.read(
            lambda conn: list(
                conn.execute(
                    sa.select(intents.c.id).where(
                        intents.c.created_at < cutoff, intents.c.store == store.name
                    )
                ).scalars()
            ),
        )
        for part in chunks(expired, GC_BATCH):
            claimed, deleted = uploads.release_intents(part)
            intents_expired += claimed
            objects += deleted
        # Content a killed save staged before it had a hash, so no intent.
        objects += store.sweep_staged(_as_timedelta(grace).total_seconds())
        candidates = catalog.read(
            lambda conn: list(
                conn.execute(
                    sa.select(blobs.c.hash).where(UNREFERENCED, blobs.c.store == store.name)
                ).scalars()
            ),
        )
        valid = [h for h in candidates if _HEX_SHA256.fullmatch(h)]
        skipped += len(candidates) - len(valid)  # (fsck names them)
        for part in chunks(valid, GC_BATCH):
            dropped, size = catalog.transact(
                partial(_drop_external, store_name=store.name, hashes=part)
            )
            blobs_deleted += len(dropped)
            bytes_freed += size
            # The rows are gone and committed; each object goes now, in a
            # transaction of its own that holds the hash's lock and checks that
            # no writer came to need the object meanwhile (Uploads.release).
            # If this process dies first, the intents expire and a later gc()
            # deletes the objects.
            for some in chunks(sorted(dropped.values()), LOCK_BATCH):
                objects += uploads.release_intents(some)[1]
    return GCReport(blobs_deleted, bytes_freed, intents_expired, objects, skipped, pruned)


#: No file refers to the blob row ``polystore_blobs`` (a check that does not
#: trust ``refcount``: a row a file still uses is never deleted), and no old
#: version of a file that a kept snapshot can see (``polystore_node_history``).
_UNUSED = ~sa.exists().where(nodes.c.blob_hash == blobs.c.hash) & ~sa.exists().where(
    history.c.blob_hash == blobs.c.hash
)
_HEX_SHA256 = re.compile("[0-9a-f]{64}")


def _drop_inline_garbage(conn: Connection) -> tuple[int, int]:
    # release_blobs deletes inline rows as their count reaches zero; this catches
    # any left by older versions or by hand edits.
    sizes = (
        conn.execute(
            blobs.delete()
            .where(UNREFERENCED, blobs.c.store == INLINE, _UNUSED)
            .returning(blobs.c.size)
        )
        .scalars()
        .all()
    )
    return len(sizes), int(sum(sizes))


def _drop_external(
    conn: Connection, store_name: str, hashes: Sequence[str]
) -> tuple[dict[str, int], int]:
    """Delete the unused blob rows among ``hashes``; ``({hash: intent id}, bytes)``.

    A row is deleted only if its count is zero, no file refers to it, no
    upload intent names its hash and no writer holds it. Each deleted row
    leaves an intent (owner ``gc``) in its place, committed with the delete:
    the object goes afterwards, under the upload protocol's lock, through
    :meth:`.Uploads.release` -- never before the rows' deletion commits.
    """
    stmt = sa.select(blobs.c.hash, blobs.c.size).where(
        blobs.c.hash.in_(list(hashes)), UNREFERENCED, blobs.c.store == store_name, _UNUSED
    )
    if conn.dialect.name == "postgresql":
        # A writer adding a reference holds the row: leave it to that writer.
        stmt = stmt.with_for_update(of=blobs, skip_locked=True)
    rows = {h: int(size) for h, size in conn.execute(stmt)}
    busy = set(
        conn.execute(
            sa.select(intents.c.hash).where(intents.c.hash.in_(list(rows))).distinct()
        ).scalars()
    )
    doomed = sorted(set(rows) - busy)
    if not doomed:
        return {}, 0
    deleted = sorted(
        conn.execute(
            blobs.delete()
            .where(blobs.c.hash.in_(doomed), UNREFERENCED, _UNUSED)
            .returning(blobs.c.hash)
        ).scalars()
    )
    if not deleted:
        return {}, 0
    now = utcnow()
    ids = (
        conn.execute(
            intents.insert().returning(intents.c.id, sort_by_parameter_order=True),
            [
                {"hash": h, "store": store_name, "size": rows[h], "created_at": now, "owner": "gc"}
                for h in deleted
            ],
        )
        .scalars()
        .all()
    )
    return dict(zip(deleted, map(int, ids), strict=True)), sum(rows[h] for h in deleted)


# -- rebalance --------------------------------------------------------------------


def rebalance(
    catalog: Catalog, uploads: Uploads | None, reader: ContentReader, inline_limit: int
) -> RebalanceReport:
    """Move blobs so that exactly those over ``inline_limit`` bytes are external.

    Only blobs in this backend's store (or inline) move; each move is its own
    transaction. Content is verified against its hash before it moves, so
    corruption is never copied: an :class:`~polystore.errors.IntegrityError`
    stops the rebalance with every blob moved so far in its new place.
    """
    if uploads is None:
        return RebalanceReport()
    store_name = uploads.store.name

    def listed(where: Any) -> list[Any]:
        stmt = sa.select(blobs.c.hash, blobs.c.size).where(where, blobs.c.refcount > 0)
        return list(catalog.read(lambda conn: conn.execute(stmt).all()))

    outgoing = listed(sa.and_(blobs.c.store == INLINE, blobs.c.size > inline_limit))
    incoming = listed(sa.and_(blobs.c.store == store_name, blobs.c.size <= inline_limit))
    mover = _Mover(catalog, uploads, reader)
    moved_out = moved_in = moved_bytes = 0
    for content_hash, size in outgoing:
        if mover.move_out(content_hash, size):
            moved_out += 1
            moved_bytes += size
    for content_hash, size in incoming:
        if mover.move_in(content_hash, size):
            moved_in += 1
            moved_bytes += size
    return RebalanceReport(moved_out, moved_in, moved_bytes)


class _Mover:
    """Moves one blob at a time between the database and the external store."""

    def __init__(self, catalog: Catalog, uploads: Uploads, reader: ContentReader) -> None:
        self.catalog = catalog
        self.uploads = uploads
        self.reader = reader
        self.store_name = uploads.store.name

    def move_out(self, content_hash: str, size: int) -> bool:
        stmt = sa.select(blobs.c.data).where(blobs.c.hash == content_hash, blobs.c.store == INLINE)
        data = self.catalog.read(lambda conn: conn.execute(stmt).scalar())
        if data is None:
            return False  # deleted or moved meanwhile
        if len(data) != size or self.catalog.hashing.of(data) != content_hash:
            raise IntegrityError(f"inline blob {content_hash} does not match its size or hash")

        def switch(staged: Staged | None) -> bool:
            def work(conn: Connection) -> bool:
                checksums = None if staged is None else staged.checksums.get(content_hash)
                moved = conn.execute(
                    blobs.update()
                    .where(blobs.c.hash == content_hash, blobs.c.store == INLINE)
                    .values(store=self.store_name, data=None, checksums=checksums)
                ).rowcount
                if staged is not None:
                    promote(conn, staged)
                return bool(moved)

            return self.catalog.transact(work)

        return self.uploads.run([Content(content_hash, data, size)], switch, force=True)

    def _in_use(self, content_hash: str) -> bool:
        """Whether blob ``content_hash`` is in this store with references."""
        stmt = sa.select(blobs.c.hash).where(
            blobs.c.hash == content_hash,
            blobs.c.store == self.store_name,
            blobs.c.refcount > 0,
        )
        return bool(self.catalog.read(lambda conn: conn.execute(stmt).first()))

    def move_in(self, content_hash: str, size: int) -> bool:
        label = f"blob {content_hash}"
        try:
            data = self.reader.read(content_hash, size, label)
        except IntegrityError:
            # The list of blobs to move was read earlier: gc() may have
            # collected this one since (its last file deleted meanwhile). Only a
            # blob still in use without its object is damage -- read once more
            # first, in case a writer has just stored the same content again.
            if not self._in_use(content_hash):
                return False
            data = self.reader.read(content_hash, size, label)
        store_name = self.store_name

        def work(conn: Connection) -> int | None:
            if conn.dialect.name == "sqlite" and size > WHOLE:  # (no copies of it: see inline.py)
                moved: bool | int = write_in_pieces(
                    conn,
                    "UPDATE polystore_blobs SET store = 'inline', checksums = NULL, "
                    "data = zeroblob(?) WHERE hash = ? AND store = ? RETURNING rowid",
                    (size, content_hash, store_name),
                    data,
                )
            else:
                moved = conn.execute(
                    blobs.update()
                    .where(blobs.c.hash == content_hash, blobs.c.store == store_name)
                    .values(store=INLINE, data=data, checksums=None)
                ).rowcount
            if not moved:
                return None
            # The object is garbage once this commits. An intent marks it, so
            # that if this process dies before the release below, gc() still
            # finds it.
            return int(
                conn.execute(
                    intents.insert()
                    .values(
                        hash=content_hash,
                        store=store_name,
                        size=size,
                        created_at=utcnow(),
                        owner="rebalance",
                    )
                    .returning(intents.c.id)
                ).scalar_one()
            )

        intent_id = self.catalog.transact(work)
        if intent_id is None:
            return False
        self.uploads.settle([Staged(store_name, intents={content_hash: intent_id})], quiet=True)
        return True
