"""Single loads, on the fast path or through SQLAlchemy, and the decoding all loads share.

A single ``load`` outside a transaction is one statement on the fast path
(:mod:`.fast`): the file's row and inline bytes, through the directory ids
cached per tree version. Inside a caller's transaction, or where the fast path
cannot serve, it goes through SQLAlchemy (:meth:`~.catalog.Catalog.read` and
:func:`~.tree.resolve`). Batch loads are :mod:`.load_batch`; both decode with
the backend's :class:`~.decoders.Decoders`.

Fast-path rows are read by position, unpacked into names where they are
read: each is a driver's tuple, and naming its columns (a named tuple per
row) would cost a Python object per file. The layouts are
:func:`~.fast.load_columns` (``kind, kind_id, size, blob_hash, store, data,
checksums``),
followed by ``parent_id, version`` in :func:`~.fast.resolve_sql`'s ``"load"``
rows and by ``name`` in :func:`~.fast.children_sql`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from polystore.backends._common import is_a_directory, not_found
from polystore.backends.sql import tree
from polystore.backends.sql.catalog import Catalog
from polystore.backends.sql.content import INLINE
from polystore.backends.sql.decoders import (
    Decoders,
    buffer_for,
    damaged_record,
    decoder_meta,
    json_column,
    reading,
)
from polystore.backends.sql.fast import (
    FastReader,
    Unavailable,
    cached_load_sql,
    resolve_args,
    resolve_sql,
)
from polystore.backends.sql.inline import ContentGone
from polystore.backends.sql.verify import ATTEMPTS, ContentReader, ObjectGone, read_again
from polystore.blobs.base import is_content_hash

__all__ = ["Loader", "check_file"]

#: Directory ids each backend keeps for single loads.
_MAX_DIRS = 4096


def check_file(row: Any, path: str) -> None:
    """Raise what loading ``path`` raises if ``row`` (its node, or None) is not a file."""
    if row is None:
        raise not_found(path)
    if row.kind == "dir":
        raise is_a_directory(path)


class Loader:
    """Single loads, and the decoding of one row every load shares.

    Holds the ids of directories single loads resolved, each with the tree
    version it was read at.
    """

    def __init__(
        self, catalog: Catalog, fast: FastReader, reader: ContentReader, decoders: Decoders
    ) -> None:
        self.catalog = catalog
        self.fast = fast
        self.reader = reader
        self.decoders = decoders
        self._dialect = catalog.dialect
        self._cached_sql = cached_load_sql(self._dialect)
        self._lean_sql = cached_load_sql(self._dialect, lean=True)
        #: Directory path -> (id, tree version it was read at), for single loads.
        self._dirs: dict[str, tuple[int, int]] = {}
        self._dirs_version = 0

    def decode(self, row: Any, path: str) -> Any:
        """The value of file ``row`` as SQLAlchemy reads it (JSON columns parsed)."""
        shape, meta = json_column(path, row, "shape"), json_column(path, row, "meta")
        into = buffer_for(row.serializer)
        data = self.content(row.store, row.size, row.blob_hash, row.data, path, into, row.checksums)
        full = decoder_meta(meta, shape, row.dtype)
        decoders = self.decoders
        return decoders.serializers.decode(
            row.serializer, data, full, allow_pickle=decoders.allow_pickle
        )

    def decode_row(self, row: Any, path: str) -> Any:
        """The value of file ``row``: node columns, ``store``, ``data`` and ``checksums``.

        As SQLAlchemy reads them (:func:`~.inline.data_column` for ``data``).

        For readers of other relations than the live tree (:mod:`.snapshots`).
        """
        check_file(row, path)
        return self.decode(row, path)

    def decode_fast(self, raw: Sequence[Any], path: str) -> Any:
        """The value of a fast-path row of :func:`~.fast.load_columns`.

        Raises :class:`~.fast.Unavailable` if the file's kind cannot be read.
        """
        kind, kind_id, size, blob_hash, store, data, checksums = raw[:7]
        if kind != "file":
            raise is_a_directory(path)
        # (the decoder first: no content is read for a file the slow path must load)
        decoders = self.decoders
        decode = decoders.single.get(kind_id) or decoders.get(kind_id, many=False)
        if store != INLINE or data is None or self.reader.verify_inline or len(data) != size:
            into = decoders.buffer(kind_id)
            data = self.content(store, size, blob_hash, data, path, into, checksums)
        return decode(data)

    def content(
        self,
        store: str | None,
        size: int,
        blob_hash: str,
        data: Any,
        path: str,
        into: str,
        checksums: bytes | None,
    ) -> Any:
        """The verified content of file ``path`` (see :meth:`.ContentReader.content`).

        A blob store names its objects by hash: a hash polystore never writes
        (another program's row) is damage, not a key to look up.
        """
        if store is not None and store != INLINE and not is_content_hash(blob_hash):
            raise damaged_record(
                path, f"its blob hash {blob_hash!r} is not a content hash (64 lowercase hex digits)"
            )
        return self.reader.content(
            store, size, blob_hash, data, path, into=into, checksums=checksums
        )

    def load(self, path: str) -> Any:
        """The value of file ``path`` (normal).

        Large inline content is read after its file's row: if the file
        changed in between and its content left the catalog
        (:class:`~.inline.ContentGone`), the file is read again. So is a file
        whose external object is missing (:class:`~.verify.ObjectGone`): its
        content may have moved into the catalog, or the file changed and
        ``gc()`` took the object (:func:`~.verify.read_again`).
        """
        attempts = ATTEMPTS
        missed: frozenset[str] = frozenset()  # hashes of external objects found missing
        while True:  # (no call of its own: a load takes a few µs)
            try:
                if not self.catalog.in_transaction:
                    try:
                        return self._load_fast(path)
                    except Unavailable:
                        pass
                with reading(path):
                    row = self.catalog.read(
                        lambda conn: tree.resolve(conn, path, with_content=True)
                    )
                check_file(row, path)
                return self.decode(row, path)
            except (ContentGone, ObjectGone) as moved:
                attempts, missed = read_again(moved, attempts, missed)

    def _load_fast(self, path: str) -> Any:
        """``load`` on the fast path; raises :class:`~.fast.Unavailable` where it cannot."""
        parent, _, name = path.rpartition("/")  # (paths.split, inlined: every load runs it)
        known = self._dirs.get(parent)
        if known is not None:  # one join, whatever the depth
            fetch, args = self.fast.fetch_raw, [known[0], name, known[1]]
            if self.reader.verify_inline:
                rows = fetch(self._cached_sql, args)
            else:
                # Lean first: small inline content of a known kind, the common
                # case, needs only its kind id and bytes. Anything else (a
                # directory, content elsewhere or damaged) is read again in full.
                rows = fetch(self._lean_sql, args)
                if rows:
                    kind_id, size, data = rows[0]
                    if kind_id is not None and data is not None and len(data) == size:
                        decoders = self.decoders
                        decode = decoders.single.get(kind_id) or decoders.get(kind_id, many=False)
                        return decode(data)
                    rows = fetch(self._cached_sql, args)
            if rows:
                return self.decode_fast(rows[0], path)
        parts = path.split("/")
        rows = self.fast.fetch_raw(
            resolve_sql(self._dialect, len(parts), "load"), resolve_args(self._dialect, parts)
        )
        if rows is None:
            raise Unavailable
        if not rows:
            raise not_found(path)
        row = rows[0]
        parent_id, version = row[7:9]
        if parent and version is not None:  # (no version row: no cache)
            self.remember_dir(parent, parent_id, version)
        return self.decode_fast(row, path)

    def known_dir(self, path: str) -> tuple[int, int] | None:
        """``(id, tree version read at)`` of directory ``path`` if cached."""
        return self._dirs.get(path)

    def remember_dir(self, path: str, dir_id: int, version: int) -> None:
        """Cache directory ``path``'s id as read at tree version ``version``.

        Each entry keeps its own version, and a lookup passes that version to
        :func:`~.fast.cached_load_sql`, so an entry can only ever be used while
        it is true, whatever other threads or processes do.
        """
        dirs = self._dirs
        if version > self._dirs_version or len(dirs) >= _MAX_DIRS:
            dirs.clear()  # older entries can no longer match
            self._dirs_version = max(version, self._dirs_version)
        dirs[path] = (dir_id, version)
