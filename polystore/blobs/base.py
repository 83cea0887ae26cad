"""The external blob-store interface, and building a store from a URL.

A blob store keeps content that is too large for a row of the catalog. It is
*content-addressed*: every object is named by the hex hash of its bytes (BLAKE3,
or SHA-256 in older catalogs: the catalog's algorithm), so a
store never holds two copies of the same content and an object never changes
once written. The store knows nothing of the catalog: which blobs are
referenced, and when one may be deleted, is the SQL backend's business.

Two stores ship with polystore:

================================ =================================================
URL                              store
================================ =================================================
``file:///data/blobs``           :class:`~polystore.blobs.local.LocalBlobStore`: a
(or a plain path)                local directory, sharded by hash prefix
``s3://bucket/prefix``           :class:`~polystore.blobs.s3.S3BlobStore`: any
                                 S3-compatible object store, through obstore
================================ =================================================

Write your own by subclassing :class:`BlobStore` and passing an instance as
``SQLBackend(url, blob_store=MyStore(...))``.

A store can also record who it belongs to: one small object beside the blobs,
the *owner marker* (:data:`OWNER_KEY`), written once, create-if-absent. The
store neither knows nor cares what an owner is; it keeps the first one it is
given (:meth:`BlobStore.claim`) and reports it. The SQL catalog uses it so
that two catalogs never share one store (their ``gc()`` would delete each
other's content).
"""

from __future__ import annotations

import abc
import datetime as dt
import io
import json
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import parse_qsl, unquote, urlsplit

from polystore.errors import BackendConfigError, UnsupportedOperationError

__all__ = [
    "CHUNK_SIZE",
    "OWNER_KEY",
    "BlobReader",
    "BlobStore",
    "BytesReader",
    "Staging",
    "StoreOwner",
    "StoredObject",
    "check_hash",
    "check_range",
    "from_url",
    "hash_key",
    "is_content_hash",
]

Buffer = bytes | bytearray | memoryview

#: Bytes moved per read or write call when streaming content.
CHUNK_SIZE = 8 << 20

_HASH = re.compile(r"[0-9a-f]{64}")

#: The key of a store's owner marker (see :meth:`BlobStore.claim`), at the top
#: of the store beside the shard directories. Never a hash key, so ``gc()``
#: (which deletes by hash) cannot reach it, and :meth:`BlobStore.scan` leaves
#: it out, so ``fsck()`` never reports it.
OWNER_KEY = "polystore-owner.json"
# What a marker says it is, so a stray file of that name is not taken for one.
_MARKER_KIND = "polystore blob store owner"
# How long to wait for a marker whose writer is still writing it (only stores
# that cannot create an object whole, such as a local directory on a file
# system without hard links, ever show one half-written).
_MARKER_PATIENCE = 2.0


def is_content_hash(value: object) -> bool:
    """Whether ``value`` is 64 lowercase hex digits: a content hash as polystore writes them."""
    return isinstance(value, str) and _HASH.fullmatch(value) is not None


def check_hash(content_hash: str) -> str:
    """``content_hash`` if it is 64 lowercase hex digits; otherwise ValueError.

    Keys are built from hashes, so a malformed one must never reach a path.
    """
    if not is_content_hash(content_hash):
        raise ValueError(f"not a content hash (64 lowercase hex digits): {content_hash!r}")
    return content_hash


def hash_key(content_hash: str) -> str:
    """The object key of a hash: ``ab/abcd...`` (one level of 256 shards by hash prefix).

    One level keeps a local directory at a few thousand entries per million
    blobs, and stops creating (and fsyncing) new directories after the first few
    hundred blobs; a second level would create a directory for nearly every one
    of the first hundred thousand. Object stores need no sharding, but one
    layout everywhere keeps keys identical.
    """
    check_hash(content_hash)
    return f"{content_hash[:2]}/{content_hash}"


def check_range(start: int, end: int) -> None:
    """ValueError unless ``start`` and ``end`` are ints with ``0 <= start <= end``."""
    if type(start) is not int or type(end) is not int or not 0 <= start <= end:
        raise ValueError(f"a byte range is two ints with 0 <= start <= end, not {start!r}, {end!r}")


def _read_upto(readinto: Any, length: int) -> bytes:
    """Up to ``length`` bytes from ``readinto`` (fewer at the end of the data)."""
    buffer = bytearray(length)
    done = 0
    with memoryview(buffer) as view:
        while done < length:
            n = readinto(view[done : done + CHUNK_SIZE])
            if not n:
                break
            done += n
    del buffer[done:]
    return bytes(buffer)


@dataclass(frozen=True)
class StoredObject:
    """An object found by :meth:`BlobStore.scan`.

    ``hash`` is the content hash the key names, or ``None`` for a key that is
    not a blob (a stray file). ``token`` is set for the temporary file of an
    upload in progress (the upload's token, see :meth:`BlobStore.put`).
    """

    key: str
    size: int
    hash: str | None
    token: str | None = None
    #: A staged file (:meth:`BlobStore.stage`): a save in progress, or one
    #: that died, which ``gc()`` removes after the grace period.
    staged: bool = False


@dataclass(frozen=True)
class Staging:
    """Content written by :meth:`BlobStore.stage`, not yet under its hash."""

    #: Where the store keeps it (a key that :meth:`BlobStore.scan` lists as staged).
    key: str
    size: int


@dataclass(frozen=True)
class StoreOwner:
    """Who a blob store belongs to, as its owner marker records it.

    ``id`` is what is compared: two owners are the same owner when their ids
    are equal (polystore gives each catalog a UUID). ``description`` tells
    people which owner it is (polystore: the catalog's URL and host);
    ``claimed_at`` is when the marker was written (ISO 8601, UTC), filled in
    by :meth:`BlobStore.claim`.
    """

    id: str
    description: str = ""
    claimed_at: str = ""

    def to_bytes(self) -> bytes:
        """The marker's content: a small JSON object."""
        record = {
            "kind": _MARKER_KIND,
            "owner": self.id,
            "description": self.description,
            "claimed_at": self.claimed_at,
        }
        return (json.dumps(record, indent=1) + "\n").encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> StoreOwner:
        """The owner a marker records; ValueError if ``data`` is not a marker."""
        try:
            record = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"not an owner marker: {exc}") from None
        if not isinstance(record, dict) or record.get("kind") != _MARKER_KIND:
            raise ValueError("not an owner marker: no 'kind' of polystore's")
        owner = record.get("owner")
        if not isinstance(owner, str) or not owner:
            raise ValueError("not an owner marker: no 'owner'")
        return cls(owner, str(record.get("description", "")), str(record.get("claimed_at", "")))


class BlobReader(io.RawIOBase):
    """A readable, unbuffered stream over one stored object; ``size`` is its length."""

    size: int

    def readable(self) -> bool:
        return True


class BytesReader(BlobReader):
    """A :class:`BlobReader` over bytes already in memory (for simple custom stores)."""

    def __init__(self, data: Buffer) -> None:
        super().__init__()
        self._view = memoryview(data).cast("B")
        self.size = self._view.nbytes
        self._position = 0

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        n = min(out.nbytes, self.size - self._position)
        out[:n] = self._view[self._position : self._position + n]
        self._position += n
        return n


class BlobStore(abc.ABC):
    """A content-addressed store of immutable objects, each named by its hash.

    Subclasses implement :meth:`put`, :meth:`open`, :meth:`size`,
    :meth:`delete` and :meth:`scan`; the rest is derived. Every method is safe
    to call from several threads and processes at once.
    """

    #: What the catalog records in ``polystore_blobs.store`` for blobs kept
    #: here (at most 64 characters). Two stores with the same name are assumed
    #: to hold the same objects.
    name: str

    #: Whether the store keeps an owner marker: it implements
    #: :meth:`read_marker` and :meth:`create_marker`. A store that does not
    #: cannot tell two catalogs sharing it apart; give each its own.
    records_owner: ClassVar[bool] = False

    #: Whether the store implements :meth:`stage`, :meth:`put_staged`,
    #: :meth:`discard` and :meth:`sweep_staged`: content written before its
    #: hash is known, so that a save hashes and writes at once.
    can_stage: ClassVar[bool] = False

    @abc.abstractmethod
    def put(
        self, content_hash: str, chunks: Iterable[Buffer], size: int, *, token: str | None = None
    ) -> bool:
        """Store ``size`` bytes, given as ``chunks``, under ``content_hash``.

        Idempotent: when an object of that size is already there nothing is
        written and the result is ``False``; otherwise the object is written and
        the result is ``True``. Atomic: readers see the whole object or none of
        it, and a failed or killed upload never leaves a partial object under
        the final key. ``token`` names the upload (polystore passes the id of its
        upload intent) so that :meth:`abort` can remove what a killed upload left
        behind without listing the store.
        """

    @abc.abstractmethod
    def open(self, content_hash: str) -> BlobReader:
        """A reader over the object; :class:`~polystore.errors.NotFoundError` if absent."""

    @abc.abstractmethod
    def size(self, content_hash: str) -> int | None:
        """The object's size in bytes, or ``None`` when there is no such object."""

    @abc.abstractmethod
    def delete(self, content_hashes: Iterable[str]) -> None:
        """Delete these objects; hashes with no object are ignored."""

    @abc.abstractmethod
    def scan(self) -> Iterator[StoredObject]:
        """Every object in the store, in no particular order.

        Listing a large bucket is slow and costs money: polystore calls this only
        from ``fsck()``, never from ``gc()`` or on any read or write path.
        """

    # -- derived ---------------------------------------------------------------------

    def exists(self, content_hash: str) -> bool:
        """Whether an object is stored under ``content_hash``."""
        return self.size(content_hash) is not None

    def get(self, content_hash: str) -> bytes:
        """The object's bytes (in memory at once: prefer :meth:`open` for large ones)."""
        with self.open(content_hash) as reader:
            return reader.readall()

    def read_range(self, content_hash: str, start: int, end: int) -> bytes:
        """Bytes ``start`` up to ``end`` (exclusive) of the object.

        Fewer bytes, or none, when the object ends before ``end``;
        :class:`~polystore.errors.NotFoundError` when there is no object. The
        default reads the object from its start and keeps only the range: a
        store that can seek or ask for a range overrides it, as the built-in
        ones do (a ``pread`` on a local file, an HTTP range request on S3).
        """
        check_range(start, end)
        with self.open(content_hash) as reader:
            skip = start
            scratch = bytearray(min(CHUNK_SIZE, max(skip, 1)))
            with memoryview(scratch) as view:
                while skip:
                    n = reader.readinto(view[: min(skip, len(scratch))])
                    if not n:
                        return b""
                    skip -= n
            return _read_upto(reader.readinto, end - start)

    def replace(
        self, content_hash: str, chunks: Iterable[Buffer], size: int, *, token: str | None = None
    ) -> None:
        """Write the object even when one of that size is already there.

        polystore calls this only to repair an object whose bytes do not hash
        to its name. The default deletes the object, then calls :meth:`put`
        (so for a moment there is none); stores that can overwrite
        atomically override it, as the built-in ones do.
        """
        self.delete([content_hash])
        self.put(content_hash, chunks, size, token=token)

    def abort(self, content_hash: str, token: str) -> None:  # noqa: B027 -- optional hook
        """Remove what an interrupted upload with ``token`` left behind, if anything.

        The default does nothing, which is right for stores whose uploads are
        atomic on the server (S3).
        """

    def close(self) -> None:  # noqa: B027 -- optional hook
        """Release connections or handles; the default has none."""

    # -- staging (stores with can_stage) ----------------------------------------------

    def stage(self, chunks: Iterable[Buffer], size: int) -> Staging:
        """Write ``size`` bytes, durably, where no reader looks, before their hash is known.

        :meth:`put_staged` then gives them their hash; :meth:`discard` drops
        them. Whatever a killed writer leaves staged, :meth:`sweep_staged`
        removes. The default raises
        :class:`~polystore.errors.UnsupportedOperationError` (:attr:`can_stage`).
        """
        raise UnsupportedOperationError(f"{type(self).__name__} cannot stage content")

    def put_staged(self, content_hash: str, staging: Staging, *, replace: bool = False) -> bool:
        """Make staged content the object of ``content_hash``, as :meth:`put` would.

        Without ``replace``, an object of that size already there is kept and
        the result is ``False`` (the staged copy stays, for :meth:`discard`).
        :class:`~polystore.errors.NotFoundError` if the content must be moved
        but is no longer staged (given its name already, or discarded).
        """
        raise UnsupportedOperationError(f"{type(self).__name__} cannot stage content")

    def discard(self, staging: Staging) -> None:  # noqa: B027 -- optional hook
        """Remove staged content, if it is still staged."""

    def sweep_staged(self, older_than: float) -> int:
        """Remove staged content older than ``older_than`` seconds; how many were removed."""
        return 0

    # -- the owner marker ------------------------------------------------------------

    def read_marker(self) -> bytes | None:
        """The bytes of the owner marker (:data:`OWNER_KEY`), or ``None`` when there is none.

        Stores with :attr:`records_owner` implement it; the default raises
        :class:`~polystore.errors.UnsupportedOperationError`.
        """
        raise UnsupportedOperationError(f"{type(self).__name__} keeps no owner marker")

    def create_marker(self, data: bytes) -> bool:
        """Write the owner marker as ``data`` unless there is one: whether this call wrote it.

        Atomic create-if-absent: of several writers racing on a store without a
        marker exactly one gets ``True``, and a reader never sees part of a
        marker. A store that cannot be written raises ``PermissionError``
        (:class:`~polystore.errors.ReadOnlyError` is one). Stores with
        :attr:`records_owner` implement it; the default raises
        :class:`~polystore.errors.UnsupportedOperationError`.
        """
        raise UnsupportedOperationError(f"{type(self).__name__} keeps no owner marker")

    def where(self) -> str:
        """Where the store is, for messages (a directory, a bucket and prefix)."""
        return repr(self)

    def owner(self) -> StoreOwner | None:
        """The owner the store records, or ``None`` (no marker, or :attr:`records_owner` false).

        A marker that is not one polystore wrote raises
        :class:`~polystore.errors.BackendConfigError`.
        """
        if not self.records_owner:
            return None
        deadline = time.monotonic() + _MARKER_PATIENCE
        while True:
            data = self.read_marker()
            if data is None:
                return None
            try:
                return StoreOwner.from_bytes(data)
            except ValueError as exc:
                if time.monotonic() > deadline:
                    raise BackendConfigError(
                        f"the owner marker {OWNER_KEY} of blob store {self.name!r} "
                        f"({self.where()}) is damaged ({exc}); if no catalog but yours uses "
                        "this store, delete the marker and open the catalog again"
                    ) from None
                time.sleep(0.05)  # a writer without atomic creation, half-way through

    def claim(self, owner: StoreOwner) -> StoreOwner | None:
        """Record ``owner`` as the store's owner unless it has one; the owner it has now.

        The result is the owner recorded in the store: ``owner`` (with
        ``claimed_at`` set) when this call claimed it, whoever claimed it
        first otherwise -- compare the ids. ``None`` when the store records no
        owner (:attr:`records_owner` false) or has none and cannot be written
        (a read-only directory or bucket: reading it needs no marker).
        """
        found = self.owner()
        if found is not None or not self.records_owner:
            return found
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        mine = StoreOwner(owner.id, owner.description, stamp)
        try:
            created = self.create_marker(mine.to_bytes())
        except PermissionError:
            return None
        return mine if created else self.owner()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# -- building stores from URLs ----------------------------------------------------

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(value: str) -> Any:
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    return value


def from_url(url: str | os.PathLike[str], **options: Any) -> BlobStore:
    """Build a blob store from a URL.

    * ``file:///abs/path`` or a plain filesystem path: a
      :class:`~polystore.blobs.local.LocalBlobStore` (options: ``name``,
      ``fsync``).
    * ``s3://bucket/prefix``: an :class:`~polystore.blobs.s3.S3BlobStore`
      (options: ``endpoint``, ``region``, ``access_key_id``,
      ``secret_access_key``, ``session_token``, ``allow_http``, ``part_size``,
      ``name``, ``config``, ``client_options``).

    Options may also be given as query parameters
    (``s3://bucket/prefix?endpoint=http://127.0.0.1:9000&allow_http=true``);
    keyword arguments win over the query.
    """
    if isinstance(url, os.PathLike):
        url = os.fspath(url)
    if not isinstance(url, str) or not url:
        raise BackendConfigError(f"a blob store URL must be a non-empty str, not {url!r}")
    if "://" not in url:
        from polystore.blobs.local import LocalBlobStore

        return LocalBlobStore(url, **options)
    parts = urlsplit(url)
    query = {key: _coerce(value) for key, value in parse_qsl(parts.query)}
    merged = query | options
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise BackendConfigError(
                f"file URLs name a local directory (file:///abs/path), not a host: {url!r}"
            )
        from polystore.blobs.local import LocalBlobStore

        return LocalBlobStore(unquote(parts.path), **merged)
    if scheme in ("s3", "s3a"):
        if not parts.netloc:
            raise BackendConfigError(
                f"an S3 blob store URL needs a bucket: s3://bucket/prefix, not {url!r}"
            )
        from polystore.blobs.s3 import S3BlobStore

        return S3BlobStore(parts.netloc, prefix=unquote(parts.path).strip("/"), **merged)
    raise BackendConfigError(
        f"unsupported blob store URL {url!r}: use file:///path/to/dir or s3://bucket/prefix, "
        "or pass a BlobStore instance"
    )
