"""Saving: a batch encoded in Python, then its rows written in one transaction.

:func:`encode_batch` serializes and hashes every value before the database
is touched, so a value that cannot be stored fails the batch with nothing
written. :func:`write_batch` then writes, inside the caller's transaction:
the parent directories (held against deletion), the existing file rows
(locked), the blob rows (locked in hash order, inserted or counted), the
kinds, and the file rows. External content has been uploaded before, under
the upload protocol (:mod:`polystore.backends.sql.uploads`).
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from polystore import paths
from polystore.backends._common import already_exists, is_a_directory, strict_json
from polystore.backends.sql import epochs, tree
from polystore.backends.sql.bulk import BulkStatement, bound, params_for
from polystore.backends.sql.catalog import utcnow
from polystore.backends.sql.content import Content, add_blobs, lock_blobs, release_blobs
from polystore.backends.sql.kinds import Kind, ensure_kinds, kind_key
from polystore.backends.sql.models import nodes_table as nodes
from polystore.backends.sql.staging import Prestaged, hash_batch
from polystore.backends.sql.uploads import Staged, promote
from polystore.blobs.base import BlobStore
from polystore.errors import SerializationError
from polystore.serializers import Buffer, SerializerRegistry

__all__ = ["Batch", "encode_batch", "write_batch"]

_FILE_VALUES = [
    nodes.c.size,
    nodes.c.serializer,
    nodes.c.serializer_version,
    nodes.c.dtype,
    nodes.c.shape,
    nodes.c.meta,
    nodes.c.attrs,
    nodes.c.blob_hash,
    nodes.c.modified_at,
    nodes.c.kind_id,
    nodes.c.epoch,
]
# In the table's order, which is the order the compiled INSERT binds them.
_INSERT_COLUMNS = [
    nodes.c.parent_id,
    nodes.c.name,
    nodes.c.kind,
    *_FILE_VALUES[:-3],
    nodes.c.created_at,
    nodes.c.modified_at,
    nodes.c.kind_id,
    nodes.c.epoch,
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

    def hash(self, store: BlobStore | None, over: int) -> None:
        """Hash every content; stage the large ones over ``over`` bytes in ``store`` meanwhile.

        See :func:`~.staging.hash_batch`; what the save does not use of the
        staged content, :meth:`discard` removes.
        """
        self.hashes, self.prestaged = hash_batch(self.datas, self.sizes, store, over)

    def discard(self, store: BlobStore | None) -> None:
        """Remove the staged content the save did not give a name."""
        if store is not None:
            for staged in self.prestaged.values():
                store.discard(staged.staging)


def encode_batch(
    serializers: SerializerRegistry,
    allow_pickle: bool,
    data_list: list[Any],
    output_paths: list[str],
    overwrite: bool,
    *,
    stage_in: BlobStore | None = None,
    stage_over: int = 0,
) -> Batch:
    """Normalize, serialize and hash every value (the database is not touched).

    Content of more than ``stage_over`` bytes is staged in ``stage_in`` while
    it is hashed (:meth:`Batch.hash`); the caller then owns what is staged
    (:meth:`Batch.discard`).
    """
    batch = Batch()
    index, sizes, datas, kinds = batch.index, batch.sizes, batch.datas, batch.kinds
    shared: dict[tuple[Any, ...], Kind] = {}
    encode = serializers.encoder(allow_pickle=allow_pickle)
    # A C-ordered ndarray of a (dtype, shape) already encoded in this batch
    # is encoded here: its bytes, and the kind of the first (what the
    # built-in serializer would give, for a third of the time).
    ndarray = _plain_ndarray(serializers, allow_pickle)
    array_kinds: dict[tuple[Any, Any], Kind] = {}
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
            size = data.nbytes if data.__class__ is memoryview else memoryview(data).nbytes
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
    batch.hash(stage_in, stage_over)
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
    # parent path -> name -> entry; each distinct parent is resolved once, in
    # the order the batch first names it, and every directory exists before
    # any name is looked up (a batch may name "a" and "a/x").
    by_dir: dict[str, dict[str, int]] = defaultdict(dict)
    for path, i in batch.index.items():
        parent, name = paths.split(path)
        by_dir[parent][name] = i
    parent_ids = {parent: tree.ensure_dirs(conn, parent, now, cache) for parent in by_dir}
    tree.hold_dirs(conn, {i for i in parent_ids.values() if i not in cache.created})

    # New rows get their values as the driver takes them, each distinct value
    # (the timestamp, a kind's JSON documents) converted once: a row then holds
    # only strings and numbers, which the garbage collector does not track.
    processors = _INSERT_FILES.processors(conn)
    created, modified = (
        bound(processors, "created_at", now),
        bound(processors, "modified_at", now),
    )
    bound_attrs = bound(processors, "attrs", attrs)
    hashes, sizes, kinds, kind_ids = batch.hashes, batch.sizes, batch.kinds, batch.kind_ids
    released: Counter[str] = Counter()
    # id(kind) -> (its constant columns, converted; rows of the other columns)
    new_files: dict[int, tuple[dict[str, Any], list[tuple[Any, ...]]]] = {}
    updates: list[tuple[Any, ...]] = []
    for parent, entries in by_dir.items():
        parent_id = parent_ids[parent]
        if parent_id in cache.created:
            # Created by this very transaction: nothing to replace in it, but
            # it may hold a directory the batch also names as a file.
            existing = {}
            clash = cache.subdirectories(parent) & entries.keys()
            if clash:
                raise is_a_directory(paths.join(parent, next(n for n in entries if n in clash)))
        else:
            existing = tree.children(conn, parent_id, list(entries), for_update=True)
        for name, i in entries.items():
            kind = kinds[i]
            row = existing.get(name) if existing else None
            if row is None:
                group = new_files.get(id(kind))
                if group is None:
                    group = new_files[id(kind)] = (
                        {
                            "kind": "file",
                            "serializer": kind[0],
                            "serializer_version": kind[1],
                            "dtype": kind[2],
                            "shape": bound(processors, "shape", kind[3]),
                            "meta": bound(processors, "meta", kind[4]),
                            "attrs": bound_attrs,
                            "created_at": created,
                            "modified_at": modified,
                            "kind_id": kind_ids[id(kind)],
                            "epoch": epoch,
                        },
                        [],
                    )
                group[1].append((parent_id, name, sizes[i], hashes[i]))
                continue
            path = paths.join(parent, name)
            if row.kind == "dir":
                raise is_a_directory(path)
            if not overwrite:
                raise already_exists(path)
            updates.append(
                (sizes[i], *kind, attrs, hashes[i], now, kind_ids[id(kind)], epoch, row.id)
            )
            released[row.blob_hash] += 1
    # Node rows are locked above; blob rows are locked next, in hash order, so
    # writers sharing content queue instead of deadlocking.
    stored = (
        lock_blobs(conn, set(hashes) | released.keys())
        if conn.dialect.name == "postgresql"
        else None
    )
    placed = {} if staged is None else dict.fromkeys(staged.uploaded, staged.store)
    sums = None if staged is None else staged.checksums
    add_blobs(conn, hashes, sizes, batch.datas, now, placed, stored, sums)
    ensure_kinds(conn, batch.wanted)
    if staged is not None:
        promote(conn, staged)
    _INSERT_FILES.execute_groups(conn, new_files.values())
    _UPDATE_FILES.execute(conn, updates)
    release_blobs(conn, released)
