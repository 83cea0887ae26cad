"""Where content lives: inline in the catalog, or in the external blob store.

Content of at most ``inline_limit`` bytes goes into ``polystore_blobs.data``;
larger content goes to the backend's :class:`~polystore.blobs.BlobStore`, and
its blob row records the store's name. The placement of a blob is decided once,
when its row is first inserted; later saves of the same content (under any
limit) only add references, and :func:`polystore.backends.sql.gc.rebalance`
moves existing blobs.

The upload protocol (no bucket listing is ever needed to clean up):

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
:meth:`Placement.settle` (run at once after a failure) or ``gc()`` (after the
grace period) deletes the intent, and the object too when no blob row and no
other intent needs it. That check and the object's deletion happen in one
transaction holding a per-hash lock (an exclusive ``pg_advisory_xact_lock`` on
PostgreSQL, the database write lock on SQLite) that step 1 takes as well
(shared, so writers do not wait for each other), so a writer can never come to
rely on an object that is being deleted.

Inside :meth:`SQLBackend.transaction` on SQLite the caller's transaction holds
the database's only write lock, so no intent can be committed beside it. There
the uploads run under that lock (so no ``gc()`` can interleave) without
intents, and once the outermost transaction ends, commit or rollback,
:meth:`Placement.settle` deletes any object the catalog did not keep. Only a
process killed inside such a transaction can leave an object behind unnoticed
by ``gc()``; ``fsck()`` reports it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import socket
import sqlite3
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar
from urllib.parse import unquote

import sqlalchemy as sa
from sqlalchemy import Connection

from polystore.backends.sql.catalog import Catalog
from polystore.backends.sql.content import INLINE, Content
from polystore.backends.sql.models import blobs_table as blobs
from polystore.backends.sql.models import intents_table as intents
from polystore.backends.sql.tree import chunks
from polystore.blobs.base import CHUNK_SIZE, BlobStore, from_url
from polystore.errors import ConflictError, IntegrityError, NotFoundError, SerializationError

__all__ = [
    "BLOB_STORE_ENV",
    "IntentLostError",
    "Placement",
    "Staged",
    "default_blob_store",
    "lock_hashes",
    "resolve_blob_store",
]

#: Environment variable naming the blob store when ``blob_store=None``.
BLOB_STORE_ENV = "POLYSTORE_BLOB_STORE"

T = TypeVar("T")

# Class id of polystore's per-hash advisory locks ("poly"): the two-int key
# space, which never collides with single-bigint advisory locks.
_LOCK_CLASS = 0x706F6C79
# PostgreSQL cannot allocate a value of 1 GB or more (MaxAllocSize), and gives
# bytea to a client that reads text (SQLAlchemy's psycopg, pg_dump, COPY TO) as
# hex, two characters a byte: a larger value could be stored, but not read back
# inside a transaction, nor dumped. Half of that, less 1 MiB for the rest of a row.
_PG_MAX_VALUE = (0x3FFFFFFF - (1 << 20)) // 2
# SQLite's length limit applies to a whole row, not only to the value.
_ROW_OVERHEAD = 1024


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


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


# -- choosing the store ---------------------------------------------------------


def default_blob_store(url: sa.URL) -> BlobStore | None:
    """The store used when none is given: ``<database file>.blobs/`` for a SQLite file.

    PostgreSQL catalogs and in-memory SQLite have no default: their content
    stays inline (up to the database's value limit) unless a store is given.
    """
    from polystore.blobs.local import LocalBlobStore

    if url.get_backend_name() != "sqlite":
        return None
    database = url.database or ""
    if database in ("", ":memory:") or url.query.get("mode") == "memory":
        return None
    if database.startswith("file:"):  # a URI filename (?uri=true)
        database = unquote(database[5:].partition("?")[0])
    return LocalBlobStore(os.path.abspath(database) + ".blobs")


def resolve_blob_store(blob_store: Any, url: sa.URL) -> BlobStore | None:
    """A :class:`BlobStore` from what ``SQLBackend(blob_store=...)`` was given."""
    if isinstance(blob_store, BlobStore):
        return blob_store
    if blob_store is None:
        blob_store = os.environ.get(BLOB_STORE_ENV) or None
        if blob_store is None:
            return default_blob_store(url)
    return from_url(blob_store)


# -- staging uploads ------------------------------------------------------------


class IntentLostError(ConflictError):
    """An upload intent vanished before its transaction committed (gc took it).

    ``gc()`` with a grace period shorter than a save in progress takes that
    save's upload. The save is staged again (three times in all) before this
    reaches the caller; nothing of it was written.
    """


@dataclass
class Staged:
    """External content uploaded for one save, waiting for its catalog transaction."""

    #: hash -> id of the committed intent protecting it (empty under SQLite
    #: transactions, where no intent can be committed).
    intents: dict[str, int] = field(default_factory=dict)
    #: Hashes whose object is in the store now.
    uploaded: set[str] = field(default_factory=set)
    #: Intents the catalog transaction did not promote (see :meth:`Placement.promote`).
    leftover: list[int] = field(default_factory=list)


def _pieces(data: Any) -> Iterator[memoryview]:
    view = memoryview(data).cast("B")
    for start in range(0, view.nbytes, CHUNK_SIZE):
        yield view[start : start + CHUNK_SIZE]


class Placement:
    """The catalog's side of external content: staging, promoting, reading, cleaning."""

    def __init__(
        self, catalog: Catalog, store: BlobStore | None, *, verify_inline: bool = False
    ) -> None:
        self.catalog = catalog
        self.engine = catalog.engine
        self.store = store
        #: Hash inline content on every read too (external content always is).
        self.verify_inline = verify_inline
        self._max_inline: int | None = None

    # -- placement decisions ----------------------------------------------------

    def max_inline(self) -> int:
        """The largest value the database accepts in one column."""
        if self._max_inline is None:
            if self.engine.dialect.name == "postgresql":
                self._max_inline = _PG_MAX_VALUE
            else:
                raw = self.engine.raw_connection()
                try:
                    driver = raw.driver_connection
                    limit = int(driver.getlimit(sqlite3.SQLITE_LIMIT_LENGTH))  # type: ignore[union-attr]
                    # The limit bounds the whole row: leave room for the other columns.
                    self._max_inline = limit - _ROW_OVERHEAD
                finally:
                    raw.close()
        return self._max_inline

    def external(self, contents: Iterable[Content], inline_limit: int) -> list[Content]:
        """The contents to put in the external store (each hash once)."""
        big = {c.hash: c for c in contents if c.size > inline_limit}
        if self.store is not None:
            return list(big.values())
        for content in big.values():
            if content.size > self.max_inline():
                raise SerializationError(
                    f"content of {content.size} bytes is more than this "
                    f"{self.engine.dialect.name} database stores in one value "
                    f"({self.max_inline()} bytes) and the catalog has no external blob "
                    "store; open the backend with blob_store='file:///path' or 's3://...'"
                )
        return []

    # -- the upload protocol ------------------------------------------------------

    def _existing(self, conn: Connection, hashes: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for part in chunks(hashes):
            stmt = sa.select(blobs.c.hash, blobs.c.store).where(blobs.c.hash.in_(part))
            found.update((h, s) for h, s in conn.execute(stmt))
        return found

    def _register(
        self, contents: Sequence[Content], staged: Staged, existing: dict[str, str]
    ) -> None:
        """Commit an intent per content, :data:`LOCK_BATCH` at a time, into ``staged``."""
        for part in chunks(sorted(contents, key=lambda c: c.hash), LOCK_BATCH):
            ids, found = self.transact(partial(self._register_part, contents=part))
            staged.intents.update(ids)
            existing.update(found)

    def _register_part(
        self, conn: Connection, contents: Sequence[Content]
    ) -> tuple[dict[str, int], dict[str, str]]:
        assert self.store is not None
        hashes = [c.hash for c in contents]
        lock_hashes(conn, hashes, shared=True)
        now, owner = _now(), _owner()
        rows = [
            {"hash": c.hash, "store": self.store.name, "size": c.size, "created_at": now,
             "owner": owner}
            for c in contents
        ]  # fmt: skip
        insert = intents.insert().returning(intents.c.id, sort_by_parameter_order=True)
        ids = conn.execute(insert, rows).scalars().all()
        existing = self._existing(conn, hashes)
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
        assert self.store is not None
        staged = Staged()
        if pending is not None:
            pending.append(staged)
        existing: dict[str, str] = {}
        try:
            if conn is not None and conn.dialect.name == "sqlite":
                existing = self._existing(conn, sorted(c.hash for c in contents))
            else:
                self._register(contents, staged, existing)
            for content in contents:
                where = existing.get(content.hash)
                if where is not None and where != self.store.name and not force:
                    # Already inline (or in another store): the save adds a reference.
                    continue
                token = staged.intents.get(content.hash)
                name = None if token is None else str(token)
                wrote = self.store.put(
                    content.hash, _pieces(content.data), content.size, token=name
                )
                if not wrote and where != self.store.name and not self._intact(content):
                    # No blob row vouches for this object (a dead writer's, a
                    # planted one) and its bytes are wrong: the caller's replace them.
                    self.store.replace(
                        content.hash, _pieces(content.data), content.size, token=name
                    )
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

    def _intact(self, content: Content) -> bool:
        """Whether the stored object of ``content`` has its size and hash."""
        return self.digest(content.hash) == (content.size, content.hash)

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
            alive = self.transact(count)
        except Exception:  # noqa: BLE001 -- the original error is the one to report
            return False
        return bool(alive < len(ids))

    def placements(self, staged: Staged | None) -> dict[str, str]:
        """hash -> store name, for the contents ``add_blobs`` must not put inline."""
        if staged is None or self.store is None:
            return {}
        return dict.fromkeys(staged.uploaded, self.store.name)

    def promote(self, conn: Connection, staged: Staged | None) -> None:
        """Step 3, inside the catalog transaction, after the blob rows are written."""
        if staged is None or not staged.intents:
            return
        assert self.store is not None
        rows = self._existing(conn, sorted(staged.uploaded))
        kept = [h for h, store in rows.items() if store == self.store.name]
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
                self.transact(partial(self.release, intent_ids=some_ids, hashes=some_hashes))
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

    def transact(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` in a write transaction of its own, again on lock conflicts."""
        return self.catalog.transact(work)

    def release(
        self, conn: Connection, intent_ids: Collection[int], hashes: Collection[str] = ()
    ) -> tuple[int, int]:
        """Delete these intents, then every object of ``hashes`` or of the intents
        that no blob row and no remaining intent needs.

        Runs inside a write transaction; the per-hash locks are held from the
        check to the deletion, so no writer starts relying on an object in between.
        Returns how many intents this call deleted and how many objects.
        """
        assert self.store is not None
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
        """Hashes whose object must stay: a blob row in this store, or an intent."""
        assert self.store is not None
        keep: set[str] = set()
        for part in chunks(sorted(hashes)):
            keep.update(
                conn.execute(
                    sa.select(blobs.c.hash).where(
                        blobs.c.hash.in_(part), blobs.c.store == self.store.name
                    )
                ).scalars()
            )
            keep.update(
                conn.execute(
                    sa.select(intents.c.hash).where(intents.c.hash.in_(part)).distinct()
                ).scalars()
            )
        return keep

    # -- reading ------------------------------------------------------------------------

    def content(self, store: str | None, size: int, content_hash: str, data: Any, path: str) -> Any:
        """The verified content of the file at ``path`` (inline ``data`` or from ``store``).

        Inline content is checked against the recorded size (and hash, with
        ``verify_inline``); external content is streamed from the store into one
        buffer, hashed on the way. Any mismatch raises
        :class:`~polystore.errors.IntegrityError`.
        """
        if store is None:
            raise NotFoundError(f"content of {path!r} is missing from the catalog")
        if store == INLINE:
            if data is None:
                raise NotFoundError(f"content of {path!r} is missing from the catalog")
            view = memoryview(data)
            if view.nbytes != size:
                raise IntegrityError(
                    f"content of {path!r} is {view.nbytes} bytes inline, the catalog records {size}"
                )
            if self.verify_inline and hashlib.sha256(view).hexdigest() != content_hash:
                raise IntegrityError(
                    f"content of {path!r} does not match its hash {content_hash} (stored inline)"
                )
            return data
        if self.store is None or store != self.store.name:
            here = "no blob store" if self.store is None else f"blob store {self.store.name!r}"
            raise NotFoundError(
                f"content of {path!r} is in blob store {store!r}, but this backend has "
                f"{here}; open it with that store (blob_store=...)"
            )
        return self.read(content_hash, int(size), path)

    def read(self, content_hash: str, size: int, path: str) -> bytearray:
        """The external object of ``content_hash`` in a new buffer, verified."""
        assert self.store is not None
        try:
            reader = self.store.open(content_hash)
        except NotFoundError:
            raise IntegrityError(
                f"content of {path!r} is missing: blob {content_hash} is not in blob store "
                f"{self.store.name!r}"
            ) from None
        with reader:
            if reader.size != size:
                raise IntegrityError(
                    f"content of {path!r} is {reader.size} bytes in blob store "
                    f"{self.store.name!r}, the catalog records {size}"
                )
            buffer = bytearray(size)
            hasher = hashlib.sha256()
            with memoryview(buffer) as view:
                done = 0
                while done < size:
                    n = reader.readinto(view[done : done + CHUNK_SIZE])
                    if not n:
                        break
                    hasher.update(view[done : done + n])
                    done += n
            if done != size or reader.read(1):
                raise IntegrityError(
                    f"content of {path!r} changed size while being read from blob store "
                    f"{self.store.name!r}"
                )
        if hasher.hexdigest() != content_hash:
            raise IntegrityError(
                f"content of {path!r} does not match its hash {content_hash} "
                f"(blob store {self.store.name!r})"
            )
        return buffer

    def digest(self, content_hash: str) -> tuple[int, str] | None:
        """Size and SHA-256 of the stored object, streamed through one small buffer.

        ``None`` when there is no such object.
        """
        assert self.store is not None
        try:
            reader = self.store.open(content_hash)
        except NotFoundError:
            return None
        hasher = hashlib.sha256()
        size = 0
        buffer = bytearray(min(CHUNK_SIZE, max(reader.size, 1)))
        with reader, memoryview(buffer) as view:
            while n := reader.readinto(view):
                hasher.update(view[:n])
                size += n
        return size, hasher.hexdigest()
