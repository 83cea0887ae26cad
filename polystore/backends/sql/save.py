"""Saving: a batch encoded in Python, external content staged, rows written, uploads settled.

:class:`Saver` runs a save top to bottom: :func:`encode_batch`, then the
external content staged under the upload protocol (:mod:`.uploads`), then
:func:`write_batch` in one catalog transaction, then the uploads settled.
:func:`encode_batch` serializes and hashes every value before the database
is touched, so a value that cannot be stored fails the batch with nothing
written. :func:`write_batch` then writes, inside the caller's transaction:
the parent directories (held against deletion), the existing file rows
(locked), the blob rows (locked in hash order, inserted or counted), the
kinds, and the file rows. External content has been uploaded before, under
the upload protocol (:mod:`polystore.backends.sql.uploads`).
"""

from __future__ import annotations

import datetime as dt
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from polystore import paths
from polystore.backends._common import already_exists, is_a_directory, strict_json
from polystore.backends.sql import epochs, tree
from polystore.backends.sql.bulk import BulkStatement, bound, params_for
from polystore.backends.sql.catalog import Catalog, utcnow
from polystore.backends.sql.content import Content, add_blobs, lock_blobs, release_blobs
from polystore.backends.sql.kinds import Kind, ensure_kinds, kind_key
from polystore.backends.sql.models import nodes_table as nodes
from polystore.backends.sql.placement import Placement
from polystore.backends.sql.staging import Prestaged, discard, hash_batch
from polystore.backends.sql.uploads import Staged, Uploads, promote
from polystore.blobs.base import BlobStore
from polystore.errors import SerializationError
from polystore.hashing import HashAlgorithm
from polystore.serializers import Buffer, SerializerRegistry

__all__ = ["Batch", "SaveOptions", "Saver", "encode_batch", "write_batch"]

#: What a save writes of a new file row: every node column
#: (:data:`~.tree.NODE_COLUMNS`, in the table's order, which is the order the
#: compiled INSERT binds them) but the id, and the epoch it is stamped with.
_INSERT_COLUMNS = [*tree.NODE_COLUMNS[1:], nodes.c.epoch]
#: What overwriting a file changes: all but where it is and when it was created.
_FILE_VALUES = [
    c for c in _INSERT_COLUMNS if c.key not in ("parent_id", "name", "kind", "created_at")
]
# New file rows cannot conflict (their names were just checked under lock;
# a concurrent insert of the same name fails the transaction, which is retried).
_INSERT_FILES = BulkStatement(
    lambda dialect: nodes.insert().values(params_for(_INSERT_COLUMNS)),
    _INSERT_COLUMNS,
    copy_into="polystore_nodes",
)
_UPDATE_FILES = BulkStatement(
    lambda dialect: (
        nodes.update()
        .where(nodes.c.id == sa.bindparam("node_id", type_=nodes.c.id.type))
        .values(params_for(_FILE_VALUES))
    ),
    [*_FILE_VALUES, sa.column("node_id", nodes.c.id.type)],
)


def _check_kind(kind: Kind) -> None:
    """Refuse what a serializer recorded if a catalog column cannot hold it.

    PostgreSQL's text and JSON cannot hold the NUL character, nor JSON the
    NaN and infinities, nor its integer column a version past 2**31 - 1; they
    are refused on SQLite too, so a catalog means the same on both. Checked
    once per distinct kind of a batch.
    """
    serializer, version, dtype, _, meta = kind
    if type(version) is not int or not 0 <= version < 2**31:
        raise SerializationError(
            f"serializer {serializer!r} recorded version {version!r}; "
            "a version is an int from 0 to 2**31 - 1"
        )
    strict_json(meta, f"the metadata serializer {serializer!r} recorded")
    if "\x00" in serializer or (dtype is not None and "\x00" in dtype):
        raise SerializationError(
            f"serializer {serializer!r} recorded a NUL character in its name or dtype, "
            "which the catalog cannot store"
        )


def _plain_ndarray(serializers: SerializerRegistry, allow_pickle: bool) -> Any:
    """``numpy.ndarray`` if the registry encodes plain arrays with the built-in serializer."""
    np = sys.modules.get("numpy")  # no array without numpy imported
    if np is None or not serializers.encodes_arrays_first(allow_pickle=allow_pickle):
        return None
    return np.ndarray


def _bytes_as_is(array: Any, size: int) -> bool:
    """Whether the built-in serializer stores ``array`` as its own bytes, C order."""
    if not size or not array.flags.c_contiguous or array.ndim == 0:
        return False
    try:
        memoryview(array).cast("B")  # (datetime64 arrays refuse)
    except (TypeError, ValueError, NotImplementedError):
        return False
    return True


class Batch:
    """The files of one ``save_batch``, column by column, one entry per path.

    Columns, not an object per file: a batch of 10,000 small arrays then leaves
    the cyclic garbage collector almost nothing to walk. A path added again
    replaces its entry (the last value wins).
    """

    __slots__ = ("datas", "hashes", "index", "kind_ids", "kinds", "prestaged", "sizes", "wanted")

    def __init__(self) -> None:
        self.index: dict[str, int] = {}  # path -> entry
        self.hashes: list[str] = []
        self.sizes: list[int] = []
        self.datas: list[Buffer] = []
        self.kinds: list[Kind] = []  # one shared tuple per distinct kind
        self.kind_ids: dict[int, int] = {}  # id() of a kind tuple -> its kind id
        self.wanted: dict[int, tuple[str, Kind]] = {}  # kind id -> (key, kind)
        self.prestaged: dict[int, Prestaged] = {}  # entry -> its content, staged in a store

    def add_kind(self, kind: Kind) -> None:
        """Check a new kind tuple and give it its kind id."""
        _check_kind(kind)
        kind_id, key = kind_key(kind)
        self.kind_ids[id(kind)] = kind_id
        self.wanted[kind_id] = (key, kind)

    def contents(self, over: int) -> Iterator[Content]:
        """The contents of more than ``over`` bytes."""
        staged = self.prestaged
        for i, (h, size, data) in enumerate(zip(self.hashes, self.sizes, self.datas, strict=True)):
            if size > over:
                yield Content(h, staged.get(i, data), size)

    def hash(self, algorithm: HashAlgorithm, store: BlobStore | None, over: int) -> None:
        """Hash every content; stage the large ones over ``over`` bytes in ``store`` meanwhile.

        See :func:`~.staging.hash_batch`; what the save does not use of the
        staged content, :meth:`discard` removes.
        """
        self.hashes, self.prestaged = hash_batch(self.datas, self.sizes, store, over, algorithm)

    def discard(self, store: BlobStore | None) -> None:
        """Remove the staged content the save did not give a name."""
        discard(store, self.prestaged.values())


def encode_batch(
    serializers: SerializerRegistry,
    allow_pickle: bool,
    data_list: list[Any],
    output_paths: list[str],
    overwrite: bool,
    *,
    algorithm: HashAlgorithm,
    stage_in: BlobStore | None = None,
    stage_over: int = 0,
) -> Batch:
    """Normalize, serialize and hash every value by ``algorithm`` (the database is not touched).

    Content of more than ``stage_over`` bytes is staged in ``stage_in`` while
    it is hashed (:meth:`Batch.hash`); the caller then owns what is staged
    (:meth:`Batch.discard`).
    """
    batch = Batch()
    index, sizes, datas, kinds = batch.index, batch.sizes, batch.datas, batch.kinds
    shared: dict[tuple[object, ...], Kind] = {}
    encode = serializers.encoder(allow_pickle=allow_pickle)
    # A C-ordered ndarray of a (dtype, shape) already encoded in this batch
    # is encoded here: its bytes, and the kind of the first (what the
    # built-in serializer would give, for a third of the time).
    ndarray = _plain_ndarray(serializers, allow_pickle)
    array_kinds: dict[tuple[object, object], Kind] = {}
    for value, path in zip(data_list, paths.normalize_files(output_paths), strict=True):
        at = index.get(path)
        if at is not None and not overwrite:
            raise already_exists(path)
        kind = None
        data: Buffer
        if value.__class__ is ndarray and value.flags.c_contiguous:
            kind = array_kinds.get((value.dtype, value.shape))
            if kind is not None:
                data = memoryview(value).cast("B")
                size = data.nbytes
        if kind is None:
            encoded = encode(value)
            data = encoded.data
            view = data if data.__class__ is memoryview else memoryview(data)
            if not view.c_contiguous:  # (a serializer's own, handing over a strided view)
                raise SerializationError(
                    f"serializer {encoded.serializer!r} gave the content of {path!r} as a buffer "
                    "that is not C-contiguous; give its bytes in one piece (bytes, or a "
                    "memoryview of a contiguous array)"
                )
            size = view.nbytes
            shape, meta = encoded.shape, encoded.meta or None
            key = (encoded.serializer, encoded.version, encoded.dtype, shape)
            kind = shared.get(key)
            if kind is None or kind[4] is not meta:
                kind = shared[key] = (*key[:3], None if shape is None else list(shape), meta)
                batch.add_kind(kind)
            if value.__class__ is ndarray and _bytes_as_is(value, size):
                array_kinds[value.dtype, value.shape] = kind
        if at is None:
            index[path] = len(datas)
            sizes.append(size)
            datas.append(data)
            kinds.append(kind)
        else:
            sizes[at], datas[at], kinds[at] = size, data, kind
    batch.hash(algorithm, stage_in, stage_over)
    return batch


def write_batch(
    conn: Connection,
    batch: Batch,
    overwrite: bool,
    attrs: dict[str, Any] | None,
    staged: Staged | None = None,
) -> None:
    """Write the rows of ``batch``: directories, blobs, kinds and files, in that order.

    Runs inside one write transaction. ``staged`` is the batch's external
    content, uploaded and protected by intents (:mod:`.uploads`); its blob
    rows name the store, and its intents are promoted here.
    """
    epoch = epochs.current(conn)  # (first: see epochs.py)
    now = utcnow()
    cache = tree.DirCache()
    by_dir, parent_ids = _resolve_parents(conn, batch, now, cache)
    rows = _FileRows(conn, batch, overwrite, attrs, now, epoch)
    for parent, entries in by_dir.items():
        parent_id = parent_ids[parent]
        rows.plan(parent, parent_id, entries, _existing(conn, parent, parent_id, entries, cache))
    # Node rows are locked above; blob rows are locked next, in hash order, so
    # writers sharing content queue instead of deadlocking.
    hashes = batch.hashes
    stored = (
        lock_blobs(conn, set(hashes) | rows.released.keys())
        if conn.dialect.name == "postgresql"
        else None
    )
    placed = {} if staged is None else dict.fromkeys(staged.uploaded, staged.store)
    sums = None if staged is None else staged.checksums
    add_blobs(conn, hashes, batch.sizes, batch.datas, now, placed, stored, sums)
    ensure_kinds(conn, batch.wanted)
    if staged is not None:
        promote(conn, staged)
    rows.write(conn)


def _resolve_parents(
    conn: Connection, batch: Batch, now: dt.datetime, cache: tree.DirCache
) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """``parent path -> name -> entry`` of ``batch``, and each parent's id, created if missing.

    The distinct parents are looked up together, and the missing ones created
    (:func:`~.tree.find_dirs`): every directory exists before any name is
    looked up (a batch may name "a" and "a/x"). The parents that existed are
    held against deletion.
    """
    by_dir: dict[str, dict[str, int]] = defaultdict(dict)
    for path, i in batch.index.items():
        parent, name = paths.split(path)
        by_dir[parent][name] = i
    tree.find_dirs(conn, by_dir.keys(), now, cache)
    parent_ids = {parent: tree.ensure_dirs(conn, parent, now, cache) for parent in by_dir}
    tree.hold_dirs(conn, {i for i in parent_ids.values() if i not in cache.created})
    return by_dir, parent_ids


def _existing(
    conn: Connection, parent: str, parent_id: int, entries: dict[str, int], cache: tree.DirCache
) -> dict[str, Any]:
    """The rows already at ``entries``' names in directory ``parent``, locked."""
    if parent_id not in cache.created:
        return tree.children(conn, parent_id, list(entries), for_update=True)
    # Created by this very transaction: nothing to replace in it, but it may
    # hold a directory the batch also names as a file.
    clash = cache.subdirectories(parent) & entries.keys()
    if clash:
        raise is_a_directory(paths.join(parent, next(n for n in entries if n in clash)))
    return {}


class _FileRows:
    """The file rows one batch writes: new rows grouped by kind, updates of existing
    rows, and the references the overwritten content loses."""

    def __init__(
        self,
        conn: Connection,
        batch: Batch,
        overwrite: bool,
        attrs: dict[str, Any] | None,
        now: dt.datetime,
        epoch: int,
    ) -> None:
        self._batch = batch
        self._overwrite = overwrite
        self._attrs = attrs
        self._now = now
        self._epoch = epoch
        # New rows get their values as the driver takes them, each distinct
        # value (the timestamp, a kind's JSON documents) converted once: a row
        # then holds only strings and numbers, which the garbage collector
        # does not track.
        self._processors = processors = _INSERT_FILES.processors(conn)
        self._constants = {
            "kind": "file",
            "attrs": bound(processors, "attrs", attrs),
            "created_at": bound(processors, "created_at", now),
            "modified_at": bound(processors, "modified_at", now),
            "epoch": epoch,
        }
        #: id(kind) -> (its constant columns, converted; rows of the other columns)
        self.new: dict[int, tuple[dict[str, object], list[tuple[object, ...]]]] = {}
        #: Rows of :data:`_UPDATE_FILES`.
        self.updates: list[tuple[object, ...]] = []
        #: Hash -> references the overwritten files held.
        self.released: Counter[str] = Counter()

    def plan(
        self, parent: str, parent_id: int, entries: dict[str, int], existing: dict[str, Any]
    ) -> None:
        """Plan the rows of ``entries`` (name -> entry) in directory ``parent``.

        ``existing``: the rows already at those names. Overwriting a directory,
        or a file with ``overwrite=False``, raises.
        """
        batch, new = self._batch, self.new
        hashes, sizes, kinds, kind_ids = batch.hashes, batch.sizes, batch.kinds, batch.kind_ids
        for name, i in entries.items():
            kind = kinds[i]
            row = existing.get(name) if existing else None
            if row is None:
                group = new.get(id(kind))
                if group is None:
                    group = new[id(kind)] = (self._kind_constants(kind), [])
                group[1].append((parent_id, name, sizes[i], hashes[i]))
                continue
            path = paths.join(parent, name)
            if row.kind == "dir":
                raise is_a_directory(path)
            if not self._overwrite:
                raise already_exists(path)
            self.updates.append(
                (
                    sizes[i],
                    *kind,
                    self._attrs,
                    hashes[i],
                    self._now,
                    kind_ids[id(kind)],
                    self._epoch,
                    row.id,
                )
            )
            self.released[row.blob_hash] += 1

    def _kind_constants(self, kind: Kind) -> dict[str, object]:
        """The columns every new file of ``kind`` in this batch holds alike, converted."""
        processors = self._processors
        serializer, version, dtype, shape, meta = kind
        return {
            **self._constants,
            "serializer": serializer,
            "serializer_version": version,
            "dtype": dtype,
            "shape": bound(processors, "shape", shape),
            "meta": bound(processors, "meta", meta),
            "kind_id": self._batch.kind_ids[id(kind)],
        }

    def write(self, conn: Connection) -> None:
        """Insert the new rows, update the existing ones, release what they held."""
        _INSERT_FILES.execute_groups(conn, self.new.values())
        _UPDATE_FILES.execute(conn, self.updates)
        release_blobs(conn, self.released)


@dataclass(frozen=True)
class SaveOptions:
    """What a save takes from its backend's settings, as they are when it starts."""

    serializers: SerializerRegistry
    allow_pickle: bool
    #: Content over this many bytes goes to the blob store.
    inline_limit: int


class Saver:
    """The save path of one backend: encode, stage external content, write, settle.

    Holds the uploads made inside the caller's current ``transaction()``
    (:attr:`pending`), which its end settles (:meth:`transaction`).
    """

    def __init__(self, catalog: Catalog, placement: Placement, uploads: Uploads | None) -> None:
        self.catalog = catalog
        self.placement = placement
        #: The upload protocol, if the backend has a blob store.
        self.uploads = uploads
        #: Uploads made inside the current transaction(), settled when it ends.
        self.pending: ContextVar[list[Staged] | None] = ContextVar(
            f"polystore_staged_{id(self)}", default=None
        )

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """The caller's outermost transaction, whose uploads are settled when it ends."""
        staged: list[Staged] = []
        try:
            with self.catalog.transaction():
                token = self.pending.set(staged)
                try:
                    yield
                finally:
                    self.pending.reset(token)
        finally:
            # Committed or rolled back, and the connection (with SQLite's write
            # lock) given back: drop the uploads the catalog did not keep.
            if self.uploads is not None:
                self.uploads.settle(staged, quiet=True)

    def save(
        self,
        values: list[Any],
        output_paths: list[str],
        options: SaveOptions,
        *,
        overwrite: bool,
        attrs: dict[str, Any] | None,
    ) -> None:
        """Save ``values`` at ``output_paths``, all or nothing (:meth:`SQLBackend.save_batch`)."""
        store, limit = self.placement.store, options.inline_limit
        batch = encode_batch(
            options.serializers,
            options.allow_pickle,
            values,
            output_paths,
            overwrite,
            algorithm=self.catalog.hashing,
            stage_in=store,
            stage_over=limit,
        )
        if not batch.index:
            return
        try:
            external = self.placement.external(batch.contents(limit), limit)
            self.write(batch, external, overwrite=overwrite, attrs=attrs)
        finally:
            batch.discard(store)

    def write(
        self,
        batch: Batch,
        external: Sequence[Content],
        *,
        overwrite: bool,
        attrs: dict[str, Any] | None,
        force: bool = False,
    ) -> None:
        """Upload ``external`` (if any) under the upload protocol, then write ``batch``.

        ``force``: upload even content that already has a blob row
        (:meth:`.Uploads.run`).
        """

        def write(staged: Staged | None) -> None:
            self.catalog.write(lambda conn: write_batch(conn, batch, overwrite, attrs, staged))

        if not external:
            write(None)
            return
        assert self.uploads is not None  # (content goes external only to a store)
        self.uploads.run(
            external, write, conn=self.catalog.connection, pending=self.pending.get(), force=force
        )
