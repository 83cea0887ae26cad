"""Ranged reads: part of a file's content, without reading the rest.

A zarr shard index, a slice of a large array, a seek in a file opened through
fsspec: each needs a few bytes of a file, and reading them must not cost a
read of the whole content. Where the bytes travel:

* Content inline in the catalog: the database cuts the range out itself with
  ``substr(data, start + 1, length)`` (SQLite's ``substr`` counts bytes in a
  BLOB; PostgreSQL's takes ``bytea``), so only the range crosses the
  connection. The database engine may still read the whole value from its own
  pages (SQLite does; PostgreSQL reads TOAST slices of uncompressed values
  only) -- inline content is at most ``inline_limit`` bytes.
* Content in an external blob store: one
  :meth:`~polystore.blobs.BlobStore.read_range` call -- a ``pread`` on a local
  file, a ranged GET on S3.

The path is resolved and the blob looked up in one read transaction (a
snapshot on PostgreSQL), so a concurrent overwrite is seen entirely or not at
all; the external read happens after it, holding no connection.

Integrity: a part of the content cannot be checked against the hash of the
whole. A ranged read checks that the range lies within the size the catalog
records and that the store returned all of it, and raises
:class:`~polystore.errors.IntegrityError` otherwise; a full
:meth:`~polystore.SQLBackend.load` still hashes external content.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import sqlalchemy as sa
from sqlalchemy import Connection

from polystore import paths
from polystore.backends._common import is_a_directory, not_found
from polystore.backends.sql import tree
from polystore.backends.sql.content import INLINE
from polystore.backends.sql.models import blobs_table
from polystore.backends.sql.verify import ATTEMPTS, ObjectGone, read_again
from polystore.errors import IntegrityError, NotFoundError, SerializationError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from polystore.arrays import LazyArray
    from polystore.backends.sql.catalog import Catalog
    from polystore.blobs.base import BlobStore

__all__ = ["BlobSource", "open_array", "read_range", "read_suffix"]

blobs = blobs_table

# The range of one blob: its placement, recorded size, and (inline) the bytes.
_SLICE = sa.select(
    blobs.c.store,
    blobs.c.size,
    sa.func.substr(
        blobs.c.data,
        sa.bindparam("first", type_=sa.Integer),  # 1-based, as SQL counts
        sa.bindparam("length", type_=sa.Integer),
    ).label("piece"),
).where(blobs.c.hash == sa.bindparam("hash"))


class _Located(NamedTuple):
    """Where a range of a file's content is: ``piece`` already holds inline bytes."""

    path: str
    hash: str | None
    store: str | None
    start: int
    stop: int
    piece: bytes | None


def read_range(
    catalog: Catalog,
    store: BlobStore | None,
    path: str,
    start: int = 0,
    end: int | None = None,
    *,
    serializer: str | None = None,
) -> bytes:
    """Bytes ``start`` up to ``end`` (exclusive) of the stored content of file ``path``.

    ``end=None`` reads to the end. A range past the end of the content is cut
    short, as slicing ``bytes`` would be (``start`` past the end gives
    ``b""``). The content is what the serializer stored: for a file saved as
    ``bytes``, those bytes; for an array, its raw buffer. ``serializer``, when
    given, must be the one that saved the file, or
    :class:`~polystore.errors.SerializationError` is raised (pass ``"bytes"``
    to read only files saved as bytes).

    Raises :class:`~polystore.errors.NotFoundError` for a missing path and
    :class:`~polystore.errors.IsADirectoryError` for a directory, as
    :meth:`~polystore.SQLBackend.load` does, and ``ValueError``
    for a negative ``start`` or an ``end`` before it.
    """
    if type(start) is not int or start < 0:
        raise ValueError(f"start must be an int >= 0, not {start!r}")
    if end is not None and (type(end) is not int or end < start):
        raise ValueError(f"end must be None or an int >= start ({start}), not {end!r}")
    return _read(
        catalog, store, path, serializer, lambda size: (start, size if end is None else end)
    )


def read_suffix(
    catalog: Catalog,
    store: BlobStore | None,
    path: str,
    length: int,
    *,
    serializer: str | None = None,
) -> bytes:
    """The last ``length`` bytes of the stored content of file ``path`` (all of it if shorter).

    Otherwise as :func:`read_range`.
    """
    if type(length) is not int or length < 0:
        raise ValueError(f"length must be an int >= 0, not {length!r}")
    return _read(catalog, store, path, serializer, lambda size: (size - length, size))


def _read(
    catalog: Catalog, store: BlobStore | None, path: str, serializer: str | None, bounds: Any
) -> bytes:
    norm = paths.normalize_file(path)

    def locate(conn: Connection) -> _Located:
        row = tree.resolve(conn, norm)
        if row is None:
            raise not_found(norm)
        if row.kind == "dir":
            raise is_a_directory(norm)
        if serializer is not None and row.serializer != serializer:
            raise SerializationError(
                f"{norm!r} was saved by serializer {row.serializer!r}, not {serializer!r}"
            )
        size = int(row.size)
        first, last = bounds(size)
        start, stop = max(0, min(first, size)), max(0, min(last, size))
        if stop <= start:
            return _Located(norm, None, None, start, start, b"")
        blob = conn.execute(
            _SLICE, {"hash": row.blob_hash, "first": start + 1, "length": stop - start}
        ).first()
        if blob is None:
            raise NotFoundError(f"content of {norm!r} is missing from the catalog")
        if int(blob.size) != size:
            raise IntegrityError(
                f"content of {norm!r} is recorded as {size} bytes by its file and "
                f"{blob.size} by its blob"
            )
        return _Located(norm, row.blob_hash, blob.store, start, stop, blob.piece)

    attempts, missed = ATTEMPTS, frozenset[str]()
    while True:
        # The caller's transaction if there is one; one snapshot across both statements.
        located = catalog.read(locate, snapshot=True)
        if located.hash is None:
            return b""
        if located.store == INLINE:
            data = located.piece
            where = "inline"
            break
        try:
            data = _read_external(store, located)
        except ObjectGone as gone:
            # rebalance() may have moved the content into the catalog since its
            # row was read, or gc() taken a replaced file's object: again, as a
            # load goes again; the same object missing twice is damage.
            attempts, missed = read_again(gone, attempts, missed)
            continue
        where = f"in blob store {located.store!r}"
        break
    wanted = located.stop - located.start
    if data is None or len(data) != wanted:
        got = "no" if data is None else len(data)
        raise IntegrityError(
            f"content of {located.path!r} gave {got} bytes {where} for bytes "
            f"{located.start}-{located.stop}; the catalog records {wanted} there"
        )
    return bytes(data)


def _holding(store: BlobStore | None, path: str, name: str | None) -> BlobStore:
    """``store``, if it is the blob store named ``name`` that holds the content of ``path``."""
    if store is None or name != store.name:
        here = "no blob store" if store is None else f"blob store {store.name!r}"
        raise NotFoundError(
            f"content of {path!r} is in blob store {name!r}, but this "
            f"backend has {here}; open it with that store (blob_store=...)"
        )
    return store


def _read_external(store: BlobStore | None, located: _Located) -> bytes:
    store = _holding(store, located.path, located.store)
    assert located.hash is not None
    try:
        return store.read_range(located.hash, located.start, located.stop)
    except NotFoundError:
        raise ObjectGone.of(located.path, located.hash, store.name) from None


# -- lazy arrays ----------------------------------------------------------------------

#: One range of one blob, by hash (the content a lazy array was opened on).
_BLOB_SLICE = _SLICE.with_only_columns(_SLICE.selected_columns.piece)


class _Backend(Protocol):
    """What a lazy array needs of its :class:`~polystore.SQLBackend` (which pickles)."""

    _catalog: Catalog
    blob_store: BlobStore | None


class _Blob(NamedTuple):
    """The content a file held when it was opened: immutable, named by its hash."""

    path: str
    hash: str
    store: str
    size: int


class BlobSource:
    """A lazy array's bytes: ranges of one blob of a catalog, by content hash.

    Reading by hash, not by path, keeps every read of one lazy array on the
    content it was opened on, whatever later overwrites the path. Pickles as
    its backend does, by configuration.
    """

    __slots__ = ("backend", "blob")

    def __init__(self, backend: _Backend, blob: _Blob) -> None:
        self.backend = backend
        self.blob = blob

    def __reduce__(self) -> tuple[Any, ...]:
        return (BlobSource, (self.backend, tuple(self.blob)))

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[Any]:
        blob = _Blob(*self.blob)
        pieces = self._read(blob, ranges)
        if pieces is None:
            # rebalance() may have moved the content since it was opened.
            where = self.backend._catalog.read(
                lambda conn: conn.execute(
                    sa.select(blobs.c.store).where(blobs.c.hash == blob.hash)
                ).scalar()
            )
            if where is not None and where != blob.store:
                self.blob = blob = blob._replace(store=where)
                pieces = self._read(blob, ranges)
        if pieces is None:
            raise NotFoundError(
                f"the content {blob.path!r} held when open_array() opened it is gone "
                "(overwritten, then collected by gc?); open the array again"
            )
        for (start, stop), piece in zip(ranges, pieces, strict=True):
            if len(piece) != stop - start:
                raise IntegrityError(
                    f"content of {blob.path!r} gave {len(piece)} bytes for bytes "
                    f"{start}-{stop}; the catalog records {blob.size} bytes in all"
                )
        return pieces

    def _read(self, blob: _Blob, ranges: Sequence[tuple[int, int]]) -> list[Any] | None:
        """The ranges, or None if the content is not where ``blob`` says."""
        if blob.store == INLINE:
            # The database cuts each range out; one read transaction for all.
            def cut(conn: Connection) -> list[Any] | None:
                out = []
                for start, stop in ranges:
                    params = {"hash": blob.hash, "first": start + 1, "length": stop - start}
                    piece = conn.execute(_BLOB_SLICE, params).scalar()
                    if piece is None:
                        return None
                    out.append(piece)
                return out

            return self.backend._catalog.read(cut, snapshot=True)
        store = _holding(self.backend.blob_store, blob.path, blob.store)
        try:
            return [store.read_range(blob.hash, start, stop) for start, stop in ranges]
        except NotFoundError:
            return None


def open_array(
    backend: _Backend,
    path: str,
    resolve: Callable[[Connection, str], Any] = tree.resolve,
) -> LazyArray:
    """A :class:`~polystore.arrays.LazyArray` over the array stored at ``path``.

    ``resolve(conn, path)`` finds the file's row (or None): the live catalog's
    by default; a snapshot's view passes its own.
    """
    from polystore.arrays import LazyArray, array_layout
    from polystore.backends.sql.decoders import decoder_meta, json_column, reading

    norm = paths.normalize_file(path)

    def locate(conn: Connection) -> tuple[Any, Any]:
        row = resolve(conn, norm)
        if row is None:
            raise not_found(norm)
        if row.kind == "dir":
            raise is_a_directory(norm)
        store = conn.execute(
            sa.select(blobs.c.store, blobs.c.size).where(blobs.c.hash == row.blob_hash)
        ).first()
        return row, store

    with reading(norm):
        row, blob = backend._catalog.read(locate, snapshot=True)
        meta = decoder_meta(json_column(norm, row, "meta"), json_column(norm, row, "shape"), None)
    dtype, shape, order = array_layout(norm, row.serializer, meta)
    if blob is None:
        raise NotFoundError(f"content of {norm!r} is missing from the catalog")
    if int(blob.size) != int(row.size) or int(row.size) != dtype.itemsize * math.prod(shape):
        raise IntegrityError(
            f"content of {norm!r} is {blob.size} bytes, but the catalog records "
            f"{row.size} bytes for an array of shape {shape} and dtype {dtype}"
        )
    source = BlobSource(backend, _Blob(norm, row.blob_hash, blob.store, int(blob.size)))
    return LazyArray(source, norm, dtype, shape, order)
