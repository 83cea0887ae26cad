"""The upload protocol: external content staged, promoted and released.

No listing of the blob store is ever needed to clean up after it:

1. *Register*: in a short transaction of its own, the writer inserts one
   ``polystore_upload_intents`` row per external content and reads which of
   those contents already have a blob row. The intent is committed before a
   byte is uploaded, and before an existing object is relied on.
2. *Upload*: each content without a usable blob row is written to the store
   (idempotently: an object of the right size is left alone). An object that is
   already there but that no blob row in this store vouches for (a dead
   writer's, or one put there behind polystore's back) is hashed first and
   replaced if its bytes are wrong. An object that has a blob row is trusted
   after the size check: a save of existing content never reads it back.
3. *Promote*: the transaction that commits the catalog rows inserts or updates
   the blob rows and deletes the intents. It checks that every intent it
   deletes still existed: one that ``gc()`` took (an upload outliving the grace
   period) fails the transaction, and the save starts again from step 1.

Whatever is left when a writer dies or a transaction rolls back is an intent;
:meth:`Uploads.settle` (run at once after a failure) or ``gc()`` (after the
grace period) deletes the intent, and the object too when no blob row and no
other intent needs it (``gc()`` deletes the objects of the blob rows it
collects the same way, after those rows' deletion commits). That check -- one
statement, so one snapshot -- and the object's deletion happen in one
transaction holding a per-hash lock (an exclusive ``pg_advisory_xact_lock`` on
PostgreSQL, the database write lock on SQLite) that step 1 takes as well
(shared, so writers do not wait for each other), so a writer can never come to
rely on an object that is being deleted.

Inside :meth:`SQLBackend.transaction` on SQLite the caller's transaction holds
the database's only write lock, so no intent can be committed beside it. There
the uploads run under that lock (so no ``gc()`` can interleave) without
intents, and once the outermost transaction ends, commit or rollback,
:meth:`Uploads.settle` deletes any object the catalog did not keep. Only a
process killed inside such a transaction can leave an object behind unnoticed
by ``gc()``; ``fsck()`` reports it.
"""

from __future__ import annotations

import os
import socket
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import Connection

from polystore.backends.sql.catalog import Catalog, utcnow
from polystore.backends.sql.checksums import Checksummer
from polystore.backends.sql.content import ChunkSource, Content
from polystore.backends.sql.models import blobs_table as blobs
from polystore.backends.sql.models import intents_table as intents
from polystore.backends.sql.staging import Prestaged
from polystore.backends.sql.tree import chunks
from polystore.backends.sql.verify import digest
from polystore.blobs.base import CHUNK_SIZE, BlobStore
from polystore.errors import ConflictError, NotFoundError

__all__ = [
    "LOCK_BATCH",
    "IntentLostError",
    "Staged",
    "Uploads",
    "existing_blobs",
    "lock_hashes",
    "promote",
]

T = TypeVar("T")

# Class id of polystore's per-hash advisory locks ("poly"): the two-int key
# space, which never collides with single-bigint advisory locks.
_LOCK_CLASS = 0x706F6C79


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"[:255]


def _lock_key(content_hash: str) -> int:
    try:
        key = int(content_hash[:8], 16)
    except ValueError:  # a row written by another program: any stable key will do
        key = zlib.crc32(content_hash.encode("utf-8", "surrogatepass"))
    return key - (1 << 32) if key >= 1 << 31 else key


def lock_hashes(conn: Connection, hashes: Iterable[str], *, shared: bool = False) -> None:
    """Take the per-hash locks of the upload protocol, in key order.

    PostgreSQL: transaction-scoped advisory locks, ``shared`` for writers
    registering intents (they do not exclude each other), exclusive for
    deleting objects. SQLite: nothing to do, the write transaction already
    excludes every other writer. Advisory locks live in PostgreSQL's shared lock
    table (about 64 per connection), so callers lock at most :data:`LOCK_BATCH`
    hashes per transaction.
    """
    if conn.dialect.name != "postgresql":
        return
    keys = sorted({_lock_key(h) for h in hashes})
    function = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
    conn.execute(
        sa.text(
            f"SELECT {function}(:cls, k) FROM "
            "(SELECT unnest(CAST(:keys AS integer[])) AS k ORDER BY 1) AS ordered"
        ),
        {"cls": _LOCK_CLASS, "keys": keys},
    ).all()


#: Most hashes locked by one transaction (see :func:`lock_hashes`).
LOCK_BATCH = 256


class IntentLostError(ConflictError):
    """An upload intent vanished before its transaction committed (gc took it).

    ``gc()`` with a grace period shorter than a save in progress takes that
    save's upload. The save is staged again (three times in all) before this
    reaches the caller; nothing of it was written.
    """


@dataclass
class Staged:
    """External content uploaded for one save, waiting for its catalog transaction."""

    #: Name of the store the content was uploaded to.
    store: str
    #: hash -> id of the committed intent protecting it (empty under SQLite
    #: transactions, where no intent can be committed).
    intents: dict[str, int] = field(default_factory=dict)
    #: Hashes whose object is in the store now.
    uploaded: set[str] = field(default_factory=set)
    #: Intents the catalog transaction did not promote (see :func:`promote`).
    leftover: list[int] = field(default_factory=list)
    #: hash -> piece checksums of the uploaded content, for its new blob row.
    checksums: dict[str, bytes] = field(default_factory=dict)


class _Checked:
    """The pieces of a content for an upload, checksummed as the store takes them."""

    def __init__(self, data: Any) -> None:
        self.data = data
        self.summer: Checksummer | None = None

    def __iter__(self) -> Iterator[Any]:
        self.summer = summer = Checksummer()
        for piece in _pieces(self.data):
            summer.update(piece)
            yield piece

    def value(self) -> bytes | None:
        """The checksums, if the store read every piece (None if it skipped the upload)."""
        return None if self.summer is None else self.summer.value()


def _pieces(data: Any) -> Iterator[Any]:
    if isinstance(data, ChunkSource):  # a local file, streamed
        yield from data.chunks()
        return
    view = memoryview(data).cast("B")
    for start in range(0, view.nbytes, CHUNK_SIZE):
        yield view[start : start + CHUNK_SIZE]


def existing_blobs(conn: Connection, hashes: Sequence[str]) -> dict[str, str]:
    """``hash -> store`` of the blob rows among ``hashes``."""
    found: dict[str, str] = {}
    for part in chunks(hashes):
        stmt = sa.select(blobs.c.hash, blobs.c.store).where(blobs.c.hash.in_(part))
        found.update((h, s) for h, s in conn.execute(stmt))
    return found


def promote(conn: Connection, staged: Staged) -> None:
    """Step 3, inside the catalog transaction, after the blob rows are written."""
    if not staged.intents:
        return
    rows = existing_blobs(conn, sorted(staged.uploaded))
    kept = [h for h, store in rows.items() if store == staged.store]
    ids = [staged.intents[h] for h in kept]
    deleted = 0
    for part in chunks(ids):
        deleted += conn.execute(intents.delete().where(intents.c.id.in_(part))).rowcount
    if deleted != len(ids):
        raise IntentLostError(
            "an upload intent was removed by gc() before its save committed "
            "(the upload took longer than gc's grace period)"
        )
    staged.leftover = [i for h, i in staged.intents.items() if h not in kept]


class Uploads:
    """The catalog's side of external content: staging, promoting, releasing."""

    def __init__(self, catalog: Catalog, store: BlobStore) -> None:
        self.catalog = catalog
        self.store = store

    def _register(
        self, contents: Sequence[Content], staged: Staged, existing: dict[str, str]
    ) -> None:
        """Commit an intent per content, :data:`LOCK_BATCH` at a time, into ``staged``."""
        for part in chunks(sorted(contents, key=lambda c: c.hash), LOCK_BATCH):
            ids, found = self.catalog.transact(partial(self._register_part, contents=part))
            staged.intents.update(ids)
            existing.update(found)

    def _register_part(
        self, conn: Connection, contents: Sequence[Content]
    ) -> tuple[dict[str, int], dict[str, str]]:
        hashes = [c.hash for c in contents]
        lock_hashes(conn, hashes, shared=True)
        now, owner = utcnow(), _owner()
        rows = [
            {"hash": c.hash, "store": self.store.name, "size": c.size, "created_at": now,
             "owner": owner}
            for c in contents
        ]  # fmt: skip
        insert = intents.insert().returning(intents.c.id, sort_by_parameter_order=True)
        ids = conn.execute(insert, rows).scalars().all()
        existing = existing_blobs(conn, hashes)
        return {c.hash: int(i) for c, i in zip(contents, ids, strict=True)}, existing

    def stage(
        self,
        contents: Sequence[Content],
        conn: Connection | None,
        *,
        force: bool = False,
        pending: list[Staged] | None = None,
    ) -> Staged:
        """Steps 1 and 2: register intents and upload ``contents``.

        ``conn`` is the caller's open transaction, if any, and ``pending`` its
        list of uploads to settle when it ends. Content that already has a blob
        row elsewhere (inline, another store) is not uploaded unless ``force``.
        On failure whatever was registered or uploaded is settled before the
        error propagates -- at once, or with ``pending`` when the caller's
        transaction ends (on SQLite that transaction holds the only write lock).
        """
        staged = Staged(self.store.name)
        if pending is not None:
            pending.append(staged)
        existing: dict[str, str] = {}
        try:
            if conn is not None and conn.dialect.name == "sqlite":
                existing = existing_blobs(conn, sorted(c.hash for c in contents))
            else:
                self._register(contents, staged, existing)
            for content in contents:
                where = existing.get(content.hash)
                if where is not None and where != self.store.name and not force:
                    # Already inline (or in another store): the save adds a reference.
                    continue
                token = staged.intents.get(content.hash)
                name = None if token is None else str(token)
                checksums = self._upload(content, name, vouched=where == self.store.name)
                if checksums is not None:
                    staged.checksums[content.hash] = checksums
                staged.uploaded.add(content.hash)
        except BaseException as exc:
            # An upload that failed because gc() took its intent (and with it
            # a temporary file) is started again by run(), like a lost promote.
            lost = isinstance(exc, Exception) and self._lost(staged)
            if pending is None:
                self.settle([staged], quiet=True)
            if lost:
                raise IntentLostError(
                    "an upload intent was removed by gc() during the upload "
                    "(the upload took longer than gc's grace period)"
                ) from exc
            raise
        return staged

    def _upload(self, content: Content, token: str | None, *, vouched: bool) -> bytes | None:
        """Put ``content`` in the store; the piece checksums of what is there now.

        An object already there is trusted if a blob row in this store
        (``vouched``) says it is whole; otherwise it is read back, and
        replaced if its bytes are wrong (a dead writer's, a planted one).
        ``None`` when the object was trusted unread.
        """
        data = content.data
        prestaged = data if isinstance(data, Prestaged) else None
        if prestaged is not None:  # written while it was hashed: give it its name
            try:
                if self.store.put_staged(content.hash, prestaged.staging):
                    return prestaged.checksums
            except NotFoundError:  # renamed by an earlier attempt of this save (gc took it)
                prestaged = None
        if prestaged is None:
            pieces = _Checked(data)
            if self.store.put(content.hash, pieces, content.size, token=token):
                return pieces.value()
        if vouched:
            return None
        found = digest(self.store, content.hash, self.catalog.hashing)
        if found is not None and found[:2] == (content.size, content.hash):
            return found.checksums
        if prestaged is not None:
            self.store.put_staged(content.hash, prestaged.staging, replace=True)
            return prestaged.checksums
        pieces = _Checked(data)
        self.store.replace(content.hash, pieces, content.size, token=token)
        return pieces.value()

    def _lost(self, staged: Staged) -> bool:
        """Whether gc() has taken any of ``staged``'s intents."""
        ids = sorted(staged.intents.values())
        if not ids:
            return False

        def count(conn: Connection) -> int:
            # Under the hashes' locks (shared): a gc() taking an intent holds
            # them until it commits, and the count waits to see its outcome.
            for part in chunks(sorted(staged.intents), LOCK_BATCH):
                lock_hashes(conn, part, shared=True)
            return sum(
                conn.execute(sa.select(sa.func.count()).where(intents.c.id.in_(part))).scalar_one()
                for part in chunks(ids)
            )

        try:
            alive = self.catalog.transact(count)
        except Exception:  # noqa: BLE001 -- the original error is the one to report
            return False
        return bool(alive < len(ids))

    # -- cleaning up ------------------------------------------------------------------

    def settle(self, staged: Iterable[Staged], *, quiet: bool = False) -> None:
        """Drop the intents of finished saves and objects the catalog did not keep.

        Safe to call at any time: an intent already promoted is simply gone,
        and an object with a blob row or another intent is left alone.
        ``quiet`` swallows errors (used while another error propagates; ``gc()``
        finishes the job later).
        """
        ids: list[int] = []
        uploaded: set[str] = set()
        for item in staged:
            ids.extend(item.intents.values())
            uploaded |= item.uploaded
        self._settle(ids, uploaded, quiet=quiet)

    def _settle(self, ids: Collection[int], hashes: Collection[str], *, quiet: bool) -> None:
        # A transaction per LOCK_BATCH intents or hashes: each locks that many.
        groups: list[tuple[Sequence[int], Sequence[str]]] = [
            (part, ()) for part in chunks(sorted(ids), LOCK_BATCH)
        ]
        groups += [((), part) for part in chunks(sorted(hashes), LOCK_BATCH)]
        for some_ids, some_hashes in groups:
            try:
                self.catalog.transact(
                    partial(self.release, intent_ids=some_ids, hashes=some_hashes)
                )
            except Exception:
                if not quiet:
                    raise

    def run(
        self,
        contents: Sequence[Content],
        write: Callable[[Staged | None], T],
        *,
        conn: Connection | None = None,
        pending: list[Staged] | None = None,
        force: bool = False,
    ) -> T:
        """Stage ``contents``, then ``write(staged)`` (the catalog transaction).

        Outside a transaction (``conn`` None) intents left over are settled
        at once, and a save whose intent gc() took is staged again. Inside one,
        ``pending`` collects what to settle when the outermost transaction ends.
        """
        if not contents:
            return write(None)
        attempts = 3 if conn is None else 1
        for attempt in range(1, attempts + 1):
            try:
                staged = self.stage(contents, conn, force=force, pending=pending)
            except IntentLostError:
                if attempt == attempts:
                    raise
                continue
            try:
                result = write(staged)
            except IntentLostError:
                if pending is None:
                    self.settle([staged], quiet=True)
                if attempt == attempts:
                    raise
                continue
            except BaseException:
                if pending is None:
                    self.settle([staged], quiet=True)
                raise
            if pending is None:
                self._settle(staged.leftover, (), quiet=True)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def release_intents(self, intent_ids: Collection[int]) -> tuple[int, int]:
        """:meth:`release` in a write transaction of its own; (intents, objects) deleted."""
        return self.catalog.transact(partial(self.release, intent_ids=intent_ids))

    def release(
        self, conn: Connection, intent_ids: Collection[int], hashes: Collection[str] = ()
    ) -> tuple[int, int]:
        """Delete these intents, then every object of ``hashes`` or of the intents
        that no blob row and no remaining intent needs.

        Runs inside a write transaction; the per-hash locks are held from the
        check to the deletion, so no writer starts relying on an object in between.
        Returns how many intents this call deleted and how many objects.
        """
        store_name = self.store.name
        found: list[tuple[int, str]] = []
        for part in chunks(sorted(intent_ids)):
            found += conn.execute(
                sa.select(intents.c.id, intents.c.hash).where(
                    intents.c.id.in_(part), intents.c.store == store_name
                )
            ).all()
        candidates = {h for _, h in found} | set(hashes)
        if not candidates:
            return 0, 0
        lock_hashes(conn, candidates)
        claimed = self._claim(conn, [i for i, _ in found])
        for intent_id, content_hash in found:
            if intent_id in claimed:
                self.store.abort(content_hash, str(intent_id))
        doomed = [
            h for h in sorted(candidates - self.needed(conn, candidates)) if self.store.exists(h)
        ]
        self.store.delete(doomed)
        return len(claimed), len(doomed)

    @staticmethod
    def _claim(conn: Connection, intent_ids: Sequence[int]) -> set[int]:
        """Delete these intents; the ids actually deleted by this transaction."""
        claimed: set[int] = set()
        for part in chunks(sorted(intent_ids)):
            if conn.dialect.name == "postgresql":
                # A writer's open transaction may be deleting the same intent:
                # skip it rather than wait while holding the hash locks.
                stmt = (
                    sa.select(intents.c.id)
                    .where(intents.c.id.in_(part))
                    .with_for_update(skip_locked=True)
                )
                part = list(conn.execute(stmt).scalars())
            if part:
                claimed.update(
                    conn.execute(
                        intents.delete().where(intents.c.id.in_(part)).returning(intents.c.id)
                    ).scalars()
                )
        return claimed

    def needed(self, conn: Connection, hashes: Collection[str]) -> set[str]:
        """Hashes whose object must stay: a blob row in this store, or an intent.

        One statement per chunk, so one snapshot: a writer's transaction that
        turns its intent into a blob row (:func:`promote`) and commits between
        two statements would otherwise be seen in neither, and its object
        deleted under it (PostgreSQL's READ COMMITTED gives each statement a
        snapshot of its own).
        """
        keep: set[str] = set()
        for part in chunks(sorted(hashes)):
            rows = sa.select(blobs.c.hash).where(
                blobs.c.hash.in_(part), blobs.c.store == self.store.name
            )
            pending = sa.select(intents.c.hash).where(intents.c.hash.in_(part))
            keep.update(conn.execute(sa.union(rows, pending)).scalars())
        return keep
