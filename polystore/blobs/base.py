"""The external blob-store interface, and building a store from a URL.

A blob store keeps content that is too large for a row of the catalog. It is
*content-addressed*: every object is named by the hex SHA-256 of its bytes, so a
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
"""

from __future__ import annotations

import abc
import io
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from polystore.errors import BackendConfigError

__all__ = [
    "CHUNK_SIZE",
    "BlobReader",
    "BlobStore",
    "BytesReader",
    "StoredObject",
    "check_hash",
    "check_range",
    "from_url",
    "hash_key",
]

Buffer = bytes | bytearray | memoryview

#: Bytes moved per read or write call when streaming content.
CHUNK_SIZE = 8 << 20

_HASH = re.compile(r"[0-9a-f]{64}")


def check_hash(content_hash: str) -> str:
    """``content_hash`` if it is a lowercase hex SHA-256; otherwise ValueError.

    Keys are built from hashes, so a malformed one must never reach a path.
    """
    if not isinstance(content_hash, str) or not _HASH.fullmatch(content_hash):
        raise ValueError(f"not a hex SHA-256 content hash: {content_hash!r}")
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
    """A content-addressed store of immutable objects, each named by its SHA-256.

    Subclasses implement :meth:`put`, :meth:`open`, :meth:`size`,
    :meth:`delete` and :meth:`scan`; the rest is derived. Every method is safe
    to call from several threads and processes at once.
    """

    #: What the catalog records in ``polystore_blobs.store`` for blobs kept
    #: here (at most 64 characters). Two stores with the same name are assumed
    #: to hold the same objects.
    name: str

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
