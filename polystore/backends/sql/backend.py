"""``SQLBackend``: the catalog backend on SQLite or PostgreSQL.

Paths, directories and serializer metadata live in ``polystore_nodes``; content
lives in ``polystore_blobs``, deduplicated by hash. Every public operation runs
in one database transaction (or in a savepoint of the caller's
:meth:`SQLBackend.transaction`), so it either happens entirely or not at all.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Self

from polystore import paths
from polystore.backends._common import MAX_ATTRS_BYTES, KindLookups, reject_kwargs
from polystore.backends._common import check_attrs as _check_attrs
from polystore.backends.base import StatResult, StorageBackend
from polystore.backends.sql import edit, tree
from polystore.backends.sql.catalog import Catalog, utcnow
from polystore.backends.sql.decoders import Decoders
from polystore.backends.sql.engine import default_url, load_json_column
from polystore.backends.sql.fast import FastReader
from polystore.backends.sql.identity import claim_store
from polystore.backends.sql.listing import Listing
from polystore.backends.sql.load import Loader
from polystore.backends.sql.load_batch import BatchLoader
from polystore.backends.sql.maintenance_methods import MaintenanceMethods
from polystore.backends.sql.placement import Placement, resolve_blob_store
from polystore.backends.sql.save import SaveOptions, Saver
from polystore.backends.sql.schema import ensure_schema
from polystore.backends.sql.snapshot_methods import SnapshotMethods
from polystore.backends.sql.uploads import Uploads
from polystore.backends.sql.verify import ContentReader
from polystore.serializers import SerializerRegistry

if TYPE_CHECKING:
    from polystore.arrays import LazyArray

__all__ = ["DEFAULT_INLINE_LIMIT", "MAX_ATTRS_BYTES", "SQLBackend"]

#: Content up to this many bytes is stored in the database itself; larger content
#: goes to the blob store. Where saving externally stops costing more than inline,
#: on SQLite and PostgreSQL (benchmarks/inline_sweep.py, docs/blob-stores.rst).
DEFAULT_INLINE_LIMIT = 1 << 20


class SQLBackend(KindLookups, SnapshotMethods, MaintenanceMethods, StorageBackend):
    """A catalog of paths and metadata in SQLite or PostgreSQL, content in blobs.

    ``url`` defaults to ``POLYSTORE_URL`` or ``sqlite:///polystore.db``. A fresh
    database is brought to the current schema by the migrations; an older one
    raises :class:`~polystore.errors.SchemaVersionError` unless
    ``auto_upgrade=True``.

    Content is named by a hash of its bytes: BLAKE3, or SHA-256 in catalogs
    that held content before revision 0010 (:attr:`hash_algorithm`). Every
    load checks content against its recorded size, and content from an
    external blob store against its piece checksums (or its hash) as well;
    ``verify_inline=True`` hashes content stored in the database on every
    load too (a few µs per 4 KiB). ``fsck(verify=True)`` hashes everything.

    The methods delegate to the modules of ``polystore/backends/sql``
    (:doc:`architecture`); the snapshot and maintenance methods come from mixins.
    """

    _backend_type = "sql"
    supports_transactions: ClassVar[bool] = True

    def __init__(
        self,
        url: str | None = None,
        *,
        blob_store: Any = None,
        inline_limit: int = DEFAULT_INLINE_LIMIT,
        allow_pickle: bool = False,
        verify_inline: bool = False,
        auto_upgrade: bool = False,
        serializers: SerializerRegistry | None = None,
        engine_options: dict[str, Any] | None = None,
    ) -> None:
        self.url = url or default_url()
        self.allow_pickle = allow_pickle
        self.inline_limit = inline_limit
        self.serializers = serializers or SerializerRegistry.default()
        self._engine_options = engine_options  # (carried by pickling: reopen.py)
        # Text another program left in a JSON column raises CatalogDamagedError.
        self._catalog = Catalog(
            self.url, {"json_deserializer": load_json_column, **(engine_options or {})}
        )
        #: The SQLAlchemy engine of the catalog database.
        self.engine = self._catalog.engine
        self._fast = FastReader(self.engine)
        with self._catalog.errors():
            try:
                ensure_schema(self.engine, self.url, auto_upgrade=auto_upgrade)
                # Read now, outside any transaction (an in-memory database is
                # the pool's one connection, and giving it back to the pool
                # rolls back whatever it was doing), and before the store is
                # claimed: an algorithm this polystore does not know is refused.
                self._catalog.hashing  # noqa: B018
                #: Where content over ``inline_limit`` goes (None: everything inline).
                self.blob_store = resolve_blob_store(blob_store, self.engine.url)
                if self.blob_store is not None:  # refused if another catalog owns it
                    claim_store(self.blob_store, self.engine)
                placement = Placement(self._catalog, self.blob_store)
                placement.max_inline()  # (read now, for the same reason)
            except BaseException:
                self._catalog.close()
                raise
            self._placement = placement
            self._reader = ContentReader(
                self.blob_store, self._catalog, verify_inline=verify_inline
            )
            self._uploads = (
                None if self.blob_store is None else Uploads(self._catalog, self.blob_store)
            )
            self._saver = Saver(self._catalog, placement, self._uploads)
            self._decoders = Decoders(self._fast, self._catalog.dialect)
            self._loader = Loader(self._catalog, self._fast, self._reader, self._decoders)
            self._batch_loader = BatchLoader(self._loader)
            self._listing = Listing(self._catalog, self._fast, self._loader)

    @property
    def inline_limit(self) -> int:
        """Content of at most this many bytes is stored in the database itself.

        What was asked, capped at the largest value the database holds in one
        column (:meth:`.Placement.max_inline`: about 10**9 bytes on SQLite,
        about 511 MiB on PostgreSQL): larger content goes to the blob store, or,
        without one, raises :class:`~polystore.errors.SerializationError`.
        """
        return min(self._inline_limit, self._placement.max_inline())

    @inline_limit.setter
    def inline_limit(self, limit: int) -> None:
        if not isinstance(limit, int) or limit < 0:
            raise ValueError(f"inline_limit must be an int >= 0, not {limit!r}")
        self._inline_limit = limit

    @property
    def hash_algorithm(self) -> str:
        """The hash that names this catalog's content: ``"blake3"`` or ``"sha256"``.

        What ``polystore_blobs.hash``, ``StatResult.hash`` and the keys of
        external objects are: BLAKE3 for catalogs made since revision 0010,
        SHA-256 for those that held content before it. Fixed for the catalog's life; hashes of
        two catalogs compare only when their algorithms are the same.
        """
        return self._catalog.hashing.name

    def __repr__(self) -> str:
        return f"SQLBackend({self.engine.url.render_as_string(hide_password=True)!r})"

    def close(self) -> None:
        # docstring inherited
        self._fast.close()
        self._catalog.close()
        if self.blob_store is not None:
            self.blob_store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions ----------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[SQLBackend]:
        """Group operations: all commit together, or none do (on any exception).

        Nested calls use savepoints: an exception inside the inner block rolls
        back only that block if the outer block catches it.
        """
        if self._catalog.in_transaction:
            with self._catalog.transaction():
                yield self
            return
        with self._saver.transaction():
            yield self

    # -- saving --------------------------------------------------------------------

    def save(self, data: Any, file_path: str, **kwargs: Any) -> None:
        """Save ``data`` at ``file_path``.

        Keyword arguments: ``overwrite`` (default True; False raises
        :class:`~polystore.errors.AlreadyExistsError` if the file exists) and
        ``attrs``, a JSON object stored with the file.
        """
        self.save_batch([data], [file_path], **kwargs)

    def save_batch(
        self, data_list: Sequence[Any], output_paths: Sequence[str], **kwargs: Any
    ) -> None:
        """Save every value, all-or-nothing, in one transaction.

        Every value is serialized before the database is touched, so a value that
        cannot be stored fails the batch with nothing written. A path given twice
        (after normalization) keeps the last value, as a loop of single saves
        would; with ``overwrite=False`` it raises
        :class:`~polystore.errors.AlreadyExistsError` and nothing is written.
        """
        overwrite = bool(kwargs.pop("overwrite", True))
        attrs = _check_attrs(kwargs.pop("attrs", None))
        reject_kwargs(self, "save_batch", kwargs)
        data_list, output_paths = list(data_list), list(output_paths)
        if len(data_list) != len(output_paths):
            raise ValueError(
                f"save_batch got {len(data_list)} values but {len(output_paths)} paths"
            )
        self._saver.save(
            data_list, output_paths, self._save_options(), overwrite=overwrite, attrs=attrs
        )

    def _save_options(self) -> SaveOptions:
        return SaveOptions(self.serializers, self.allow_pickle, self.inline_limit)

    # -- loading -------------------------------------------------------------------

    def load(self, file_path: str, **kwargs: Any) -> Any:
        # docstring inherited
        if kwargs:
            reject_kwargs(self, "load", kwargs)
        path = paths.normalize_file(file_path)
        self._decoders.use(self.serializers, self.allow_pickle)
        return self._loader.load(path)

    def load_batch(self, file_paths: Sequence[str], **kwargs: Any) -> list[Any]:
        """Load every path in order, from one consistent snapshot of the catalog."""
        if kwargs:
            reject_kwargs(self, "load_batch", kwargs)
        norm = paths.normalize_files(file_paths)
        self._decoders.use(self.serializers, self.allow_pickle)
        return self._batch_loader.load_batch(norm)

    # -- ranged reads ------------------------------------------------------------------

    def read_range(
        self, path: str, start: int = 0, end: int | None = None, *, serializer: str | None = None
    ) -> bytes:
        """Bytes ``start`` up to ``end`` of the stored content of ``path``, reading no others.

        See :func:`polystore.backends.sql.ranges.read_range`: inline content is
        cut by the database, external content read with one ranged read; the
        range is size-checked, not hashed.
        """
        from polystore.backends.sql.ranges import read_range

        return read_range(self._catalog, self.blob_store, path, start, end, serializer=serializer)

    def read_suffix(self, path: str, length: int, *, serializer: str | None = None) -> bytes:
        """The last ``length`` bytes of the stored content of ``path`` (see :meth:`read_range`)."""
        from polystore.backends.sql.ranges import read_suffix

        return read_suffix(self._catalog, self.blob_store, path, length, serializer=serializer)

    def open_array(self, path: str) -> LazyArray:
        """A lazy, sliceable view of the numpy array at ``path`` (see :mod:`polystore.arrays`).

        Slices read only their byte ranges: inline content is cut by the
        database, external content read by ranged reads. The view reads the
        content the path held when it was opened, by its hash.
        """
        from polystore.backends.sql.ranges import open_array

        return open_array(self, path)

    # -- streaming files in and out ----------------------------------------------------

    def save_file(
        self,
        local_path: str | os.PathLike[str],
        file_path: str,
        *,
        serializer: str = "bytes",
        attrs: dict[str, Any] | None = None,
        overwrite: bool = True,
        known: tuple[int, str] | None = None,
        advance: Callable[[int], None] | None = None,
    ) -> None:
        """Save local file ``local_path``'s bytes at ``file_path``, streaming large ones.

        The result is what ``save(open(local_path, "rb").read(), file_path)``
        gives (``serializer="str"``: the file as UTF-8 text), but content over
        the inline limit goes to the external blob store a chunk at a time,
        never whole in memory; see ``polystore/backends/sql/stream.py``.
        ``known`` is the file's ``(size, hex hash)`` if already computed (by
        :attr:`hash_algorithm`; checked as the file is read);
        ``advance(n)`` is called as bytes are uploaded.
        """
        from polystore.backends.sql.stream import save_file

        save_file(
            self._saver,
            self._save_options(),
            local_path,
            file_path,
            serializer=serializer,
            attrs=attrs,
            overwrite=overwrite,
            known=known,
            advance=advance,
        )

    def iter_content(self, file_path: str, *, chunk_size: int = 8 << 20) -> Iterator[bytes]:
        """The stored content of ``file_path`` (its serializer's bytes), a chunk at a time.

        Checked against the recorded size and hash; on a mismatch
        :class:`~polystore.errors.IntegrityError` is raised before the last
        chunk. See ``polystore/backends/sql/stream.py``.
        """
        from polystore.backends.sql.stream import iter_content

        return iter_content(self._catalog, self.blob_store, file_path, chunk_size=chunk_size)

    # -- inspecting ------------------------------------------------------------------

    def _kind(self, path: str) -> str | None:
        found = self._listing.lookup(paths.normalize(path))
        return None if found is None else found[1]

    def list_dir(self, path: str) -> list[str]:
        # docstring inherited
        return self._listing.list_dir(paths.normalize(path))

    def iter_dir(self, path: str = "", *, page_size: int = 1000) -> Iterator[str]:
        """Yield the names in directory ``path`` in code-point order, a page at a time.

        Each page is one indexed query that starts after the last name seen, so
        memory stays flat for directories of millions of entries.
        """
        return self._listing.iter_dir(paths.normalize(path), page_size)

    def list_files(
        self,
        directory: str = "",
        pattern: str | None = None,
        extensions: Any = None,
        recursive: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        # docstring inherited
        return self._listing.list_files(paths.normalize(directory), pattern, extensions, recursive)

    def stat(self, path: str) -> StatResult:
        # docstring inherited
        return self._listing.stat(paths.normalize(path))

    def scan_dir(self, path: str = "") -> list[StatResult]:
        """What :meth:`stat` says of each entry of directory ``path``, in name order.

        One query however many entries there are (like :func:`os.scandir`):
        ``list_dir`` and a ``stat`` for each name would be a query per entry.
        """
        return self._listing.scan_dir(paths.normalize(path))

    # -- changing the tree -------------------------------------------------------------

    def ensure_directory(self, path: str) -> None:
        # docstring inherited
        norm = paths.normalize(path)
        self._catalog.write(lambda conn: tree.ensure_dirs(conn, norm, utcnow(), tree.DirCache()))

    def delete(self, path: str, recursive: bool = False) -> None:
        # docstring inherited
        norm = paths.normalize_file(path)
        self._catalog.write(partial(edit.delete, norm=norm, recursive=recursive))

    def move(self, src: str, dst: str) -> None:
        """Move a file or directory tree. A directory move rewrites one row."""
        src, dst = paths.normalize_file(src), paths.normalize_file(dst)
        self._catalog.write(partial(edit.move, src=src, dst=dst))

    def copy(self, src: str, dst: str) -> None:
        """Copy a file or directory tree: catalog rows only, the blobs are shared."""
        src, dst = paths.normalize_file(src), paths.normalize_file(dst)
        self._catalog.write(partial(edit.copy, src=src, dst=dst))

    # -- querying -----------------------------------------------------------------------

    def query(
        self,
        *,
        under: str = "",
        kind: str | None = None,
        serializer: str | None = None,
        dtype: str | None = None,
        attrs: dict[str, Any] | None = None,
        limit: int | None = None,
    ) -> list[StatResult]:
        """Nodes under ``under`` matching every filter given, ordered by path.

        ``attrs`` matches files whose attributes hold each given key with exactly
        that value (str, int, float, bool or None). A filter no file can hold
        (another type, or what ``save(attrs=...)`` refuses: NaN, infinities,
        NUL characters, lone surrogates) raises
        :class:`~polystore.errors.SerializationError`.
        """
        return self._listing.query(
            paths.normalize(under),
            kind=kind,
            serializer=serializer,
            dtype=dtype,
            attrs=attrs,
            limit=limit,
        )

    # -- for tests and tools -----------------------------------------------------------

    def count_nodes(self) -> int:
        """Files and directories in the catalog, the root excluded."""
        return self._listing.count_nodes()

    # -- pickling ------------------------------------------------------------------------

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle by configuration; the copy opens the catalog on first use.

        See :mod:`polystore.backends.sql.reopen` for what is carried.
        """
        from polystore.backends.sql.reopen import reduce_backend

        return reduce_backend(self)
