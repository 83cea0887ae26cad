"""``SQLBackend``: the catalog backend on SQLite or PostgreSQL.

Paths, directories and serializer metadata live in ``polystore_nodes``; content
lives in ``polystore_blobs``, deduplicated by hash. Every public operation runs
in one database transaction (or in a savepoint of the caller's
:meth:`SQLBackend.transaction`), so it either happens entirely or not at all.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import closing, contextmanager
from contextvars import ContextVar
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

import sqlalchemy as sa
from sqlalchemy import Connection

from polystore import paths
from polystore.backends._common import (
    MAX_ATTRS_BYTES,
    already_exists,
    directory_not_empty,
    is_a_directory,
    not_a_directory,
    not_found,
    reject_kwargs,
    strict_json,
)
from polystore.backends._common import check_attrs as _check_attrs
from polystore.backends.base import StatResult, StorageBackend
from polystore.backends.sql import tree
from polystore.backends.sql.bulk import BulkStatement, bound, params_for
from polystore.backends.sql.content import (
    INLINE,
    Content,
    add_blobs,
    add_references,
    content_hashes,
    lock_blobs,
    release_blobs,
)
from polystore.backends.sql.engine import (
    WRITE,
    CatalogChanged,
    create_catalog_engine,
    default_url,
    retrying,
    translate_errors,
)
from polystore.backends.sql.fast import (
    STREAM_ROWS,
    FastReader,
    Unavailable,
    cached_load_sql,
    children_sql,
    names_sql,
    parse_json,
    resolve_args,
    resolve_sql,
)
from polystore.backends.sql.kinds import Kind, ensure_kinds, kind_key, kinds_args, kinds_sql
from polystore.backends.sql.models import ROOT_ID, nodes_table
from polystore.backends.sql.placement import Placement, Staged, resolve_blob_store
from polystore.backends.sql.schema import ensure_schema
from polystore.errors import InvalidPathError, SerializationError, UnsupportedOperationError
from polystore.serializers import SHARED_ARRAY_BYTES, Buffer, SerializerRegistry

if TYPE_CHECKING:
    from polystore.backends.sql.fsck import FsckReport
    from polystore.backends.sql.gc import GCReport, RebalanceReport

__all__ = ["DEFAULT_INLINE_LIMIT", "MAX_ATTRS_BYTES", "SQLBackend"]

T = TypeVar("T")
nodes = nodes_table

#: Content up to this many bytes is stored in the database itself; larger content
#: goes to the blob store. Where saving externally stops costing more than inline,
#: on SQLite and PostgreSQL (benchmarks/inline_sweep.py, docs/blob-stores.rst).
DEFAULT_INLINE_LIMIT = 1 << 20
#: Decoders each backend keeps (one per distinct serializer, dtype, shape, meta).
_MAX_DECODERS = 4096
# How many kinds there are (up to one more than are read whole), and the largest id.
_COUNT_KINDS = (
    f"SELECT count(*), max(id) FROM (SELECT id FROM polystore_kinds LIMIT {_MAX_DECODERS + 1}) AS k"
)
#: Kinds each backend knows (what an id means: a few short strings each).
_MAX_KINDS = 1 << 16
#: Directory ids each backend keeps for single loads.
_MAX_DIRS = 4096


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
]
# In the table's order, which is the order the compiled INSERT binds them.
_INSERT_COLUMNS = [
    nodes.c.parent_id,
    nodes.c.name,
    nodes.c.kind,
    *_FILE_VALUES[:-2],
    nodes.c.created_at,
    nodes.c.modified_at,
    nodes.c.kind_id,
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


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _decoder_meta(meta: dict[str, Any] | None, shape: Any, dtype: str | None) -> dict[str, Any]:
    """What a serializer's decoder is given: its recorded meta, plus shape and dtype."""
    full = dict(meta or {})
    if shape is not None:
        full["shape"] = shape
    if dtype is not None:
        full["dtype"] = dtype
    return full


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


class _Batch:
    """The files of one ``save_batch``, column by column, one entry per path.

    Columns, not an object per file: a batch of 10,000 small arrays then leaves
    the cyclic garbage collector almost nothing to walk. A path added again
    replaces its entry (the last value wins).
    """

    __slots__ = ("datas", "hashes", "index", "kind_ids", "kinds", "sizes", "wanted")

    def __init__(self) -> None:
        self.index: dict[str, int] = {}  # path -> entry
        self.hashes: list[str] = []
        self.sizes: list[int] = []
        self.datas: list[Buffer] = []
        self.kinds: list[Kind] = []  # one shared tuple per distinct kind
        self.kind_ids: dict[int, int] = {}  # id() of a kind tuple -> its kind id
        self.wanted: dict[int, tuple[str, Kind]] = {}  # kind id -> (key, kind)

    def add_kind(self, kind: Kind) -> None:
        """Check a new kind tuple and give it its kind id."""
        _check_kind(kind)
        kind_id, key = kind_key(kind)
        self.kind_ids[id(kind)] = kind_id
        self.wanted[kind_id] = (key, kind)

    def contents(self, over: int) -> Iterator[Content]:
        """The contents of more than ``over`` bytes."""
        for h, size, data in zip(self.hashes, self.sizes, self.datas, strict=True):
            if size > over:
                yield Content(h, data, size)


class _Loading:
    """What one fast-path ``load_batch`` has decoded so far, and what waits."""

    __slots__ = ("closer", "decoded", "later", "repeated", "stream", "waiting")

    def __init__(self, repeated: set[str]) -> None:
        self.repeated = repeated  # paths asked for more than once
        self.stream = False  # results are streaming: no other query meanwhile
        self.decoded: dict[str, Any] = {}  # path -> value
        self.later: dict[str, Any] = {}  # path -> row, for _decode_fast after the snapshot
        # kind id -> (paths, contents) of small files of a kind not known yet
        self.waiting: dict[int, tuple[list[str], list[Any]]] = {}
        # prefix -> names whose lean rows need a closer look (read again in full)
        self.closer: dict[str, list[str]] = {}


class SQLBackend(StorageBackend):
    """A catalog of paths and metadata in SQLite or PostgreSQL, content in blobs.

    ``url`` defaults to ``POLYSTORE_URL`` or ``sqlite:///polystore.db``. A fresh
    database is brought to the current schema by the migrations; an older one
    raises :class:`~polystore.errors.SchemaVersionError` unless
    ``auto_upgrade=True``.

    Every load checks content against its recorded size, and content from an
    external blob store against its SHA-256 as well; ``verify_inline=True``
    hashes content stored in the database on every load too (about 3 µs per
    4 KiB). ``fsck(verify=True)`` hashes everything.
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
        if not isinstance(inline_limit, int) or inline_limit < 0:
            raise ValueError(f"inline_limit must be an int >= 0, not {inline_limit!r}")
        self.inline_limit = inline_limit
        self.serializers = serializers or SerializerRegistry.default()
        # Decoders by kind id, and what each kind id means (serializer, dtype,
        # and shape and meta as JSON text): ids are derived from their kinds,
        # so these stay true in any catalog (see polystore.backends.sql.kinds).
        self._decoders: dict[int, Callable[[Any], Any]] = {}
        self._batch_decoders: dict[int, Callable[[Any], list[Any]]] = {}
        self._decoders_state: tuple[Any, ...] = ()
        self._kind_defs: dict[int, tuple[str, str | None, str | None, str | None]] = {}
        # (rows, largest id) of polystore_kinds when last read whole
        self._kinds_counted: tuple[Any, ...] = ()
        #: Directory path -> (id, tree version it was read at), for single loads.
        self._dirs: dict[str, tuple[int, int]] = {}
        self._dirs_version = 0
        self._tx: ContextVar[Connection | None] = ContextVar(
            f"polystore_tx_{id(self)}", default=None
        )
        # Uploads made inside the current transaction(), settled when it ends.
        self._staged: ContextVar[list[Staged] | None] = ContextVar(
            f"polystore_staged_{id(self)}", default=None
        )
        self._engine_options = engine_options  # (carried by pickling: reopen.py)
        with translate_errors(self.url):
            self.engine = create_catalog_engine(self.url, **(engine_options or {}))
            self._fast = FastReader(self.engine)
            self._dialect = self.engine.dialect.name
            self._pg = self._dialect == "postgresql"
            try:
                ensure_schema(self.engine, self.url, auto_upgrade=auto_upgrade)
                #: Where content over ``inline_limit`` goes (None: everything inline).
                self.blob_store = resolve_blob_store(blob_store, self.engine.url)
            except BaseException:
                self.engine.dispose()
                raise
            self._placement = Placement(self.engine, self.blob_store, verify_inline=verify_inline)

    def __repr__(self) -> str:
        return f"SQLBackend({self.engine.url.render_as_string(hide_password=True)!r})"

    def close(self) -> None:
        # docstring inherited
        self._fast.close()
        self.engine.dispose()
        if self.blob_store is not None:
            self.blob_store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- running statements ------------------------------------------------------

    def _read(self, work: Callable[[Connection], T], *, snapshot: bool = False) -> T:
        """Run ``work`` in the caller's transaction, or a read transaction of its own.

        ``snapshot`` asks for one snapshot across statements, which PostgreSQL's
        default READ COMMITTED does not give.
        """
        with translate_errors(self.url):
            conn = self._tx.get()
            if conn is not None:
                return work(conn)
            options = {"isolation_level": "REPEATABLE READ"} if snapshot and self._pg else {}
            with self.engine.connect().execution_options(**options) as conn:
                return work(conn)

    def _write(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` atomically: its own transaction, or a savepoint in the caller's."""
        with translate_errors(self.url):
            conn = self._tx.get()
            if conn is not None:
                with conn.begin_nested():
                    return work(conn)

            def attempt() -> T:
                with (
                    self.engine.connect().execution_options(**{WRITE: True}) as conn,
                    conn.begin(),
                ):
                    return work(conn)

            return retrying(attempt)

    @contextmanager
    def transaction(self) -> Iterator[SQLBackend]:
        """Group operations: all commit together, or none do (on any exception).

        Nested calls use savepoints: an exception inside the inner block rolls
        back only that block if the outer block catches it.
        """
        conn = self._tx.get()
        if conn is not None:
            with translate_errors(self.url), conn.begin_nested():
                yield self
            return
        staged: list[Staged] = []
        try:
            with (
                translate_errors(self.url),
                self.engine.connect().execution_options(**{WRITE: True}) as conn,
            ):
                token = self._tx.set(conn)
                staged_token = self._staged.set(staged)
                try:
                    with conn.begin():
                        yield self
                finally:
                    self._tx.reset(token)
                    self._staged.reset(staged_token)
        finally:
            # Committed or rolled back, and the connection (with SQLite's write
            # lock) given back: drop the uploads the catalog did not keep.
            self._placement.settle(staged, quiet=True)

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
        batch = self._encode_batch(data_list, output_paths, overwrite)
        if not batch.index:
            return
        external = self._placement.external(batch.contents(self.inline_limit), self.inline_limit)
        self._placement.run(
            external,
            lambda staged: self._write(
                lambda conn: self._put(conn, batch, overwrite, attrs, staged)
            ),
            conn=self._tx.get(),
            pending=self._staged.get(),
        )

    def _encode_batch(
        self, data_list: list[Any], output_paths: list[str], overwrite: bool
    ) -> _Batch:
        """Normalize, serialize and hash every value (the database is not touched)."""
        batch = _Batch()
        index, sizes, datas, kinds = batch.index, batch.sizes, batch.datas, batch.kinds
        shared: dict[tuple[Any, ...], Kind] = {}
        encode = self.serializers.encoder(allow_pickle=self.allow_pickle)
        # A C-ordered ndarray of a (dtype, shape) already encoded in this batch
        # is encoded here: its bytes, and the kind of the first (what the
        # built-in serializer would give, for a third of the time).
        ndarray = _plain_ndarray(self.serializers, self.allow_pickle)
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
        batch.hashes = content_hashes(datas)
        return batch

    def _put(
        self,
        conn: Connection,
        batch: _Batch,
        overwrite: bool,
        attrs: dict[str, Any] | None,
        staged: Staged | None = None,
    ) -> None:
        now = _now()
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
                updates.append((sizes[i], *kind, attrs, hashes[i], now, kind_ids[id(kind)], row.id))
                released[row.blob_hash] += 1
        # Node rows are locked above; blob rows are locked next, in hash order, so
        # writers sharing content queue instead of deadlocking.
        stored = lock_blobs(conn, set(hashes) | released.keys()) if self._pg else None
        add_blobs(conn, hashes, sizes, batch.datas, now, self._placement.placements(staged), stored)
        ensure_kinds(conn, batch.wanted)
        self._placement.promote(conn, staged)
        _INSERT_FILES.execute_groups(conn, new_files.values())
        _UPDATE_FILES.execute(conn, updates)
        release_blobs(conn, released)

    # -- loading -------------------------------------------------------------------

    def _decode(self, row: Any, path: str) -> Any:
        """The value of file ``row`` as SQLAlchemy reads it (JSON columns parsed)."""
        data = self._placement.content(row.store, row.size, row.blob_hash, row.data, path)
        meta = _decoder_meta(row.meta, row.shape, row.dtype)
        return self.serializers.decode(row.serializer, data, meta, allow_pickle=self.allow_pickle)

    def _check_decoders(self) -> None:
        """Drop the cached decoders if the serializers or ``allow_pickle`` changed."""
        state = (self.serializers, self.serializers.changes, self.allow_pickle)
        if self._decoders_state != state:
            self._decoders.clear()
            self._batch_decoders.clear()
            self._decoders_state = state

    def _decoder_for(self, kind_id: int | None, many: bool) -> Callable[[Any], Any]:
        """The decoder (``many``: batch decoder) for files of kind ``kind_id``.

        A kind not known here yet is read from ``polystore_kinds`` on this
        thread's fast-path connection. Raises :class:`~.fast.Unavailable` if it
        cannot be read: the caller takes the slow path, which decodes from the
        node's own columns (a file without a kind id was written by something
        other than polystore).
        """
        decode = self._known_decoder(kind_id, many)
        if decode is None:
            if kind_id is None:
                raise Unavailable
            self._learn_kinds([kind_id])
            decode = self._known_decoder(kind_id, many)
            if decode is None:
                raise Unavailable
        return decode

    def _known_decoder(self, kind_id: int | None, many: bool) -> Callable[[Any], Any] | None:
        """The decoder for kind ``kind_id`` if this backend knows the kind (no query).

        Decoders are cached by kind id; :meth:`_check_decoders` drops them all
        when the serializers change.
        """
        cache = self._batch_decoders if many else self._decoders
        decode = cache.get(kind_id)  # type: ignore[arg-type]
        if decode is None:
            found = self._kind_defs.get(kind_id)  # type: ignore[arg-type]
            if found is None:
                return None
            serializer, dtype, shape, meta = found
            full = _decoder_meta(parse_json(meta), parse_json(shape), dtype)
            build = self.serializers.batch_decoder if many else self.serializers.decoder
            decode = build(serializer, full, allow_pickle=self.allow_pickle)
            if len(cache) >= _MAX_DECODERS:
                cache.clear()
            cache[kind_id] = decode  # type: ignore[index]
        return decode

    def _decode_waiting(self, loading: _Loading) -> None:
        """After a stream: read the kinds met meanwhile, 500 a query, and decode what waited."""
        waiting = loading.waiting
        met = {row[1] for row in loading.later.values() if row[0] == "file"}
        met.update(waiting)
        met.difference_update(self._kind_defs)
        met.discard(None)
        for part in tree.chunks(list(met)):
            self._learn_kinds(part)
            for kind_id in part:
                group = waiting.pop(kind_id, None)
                if group is not None:
                    self._decode_group(kind_id, group, loading)
        for kind_id, group in waiting.items():
            self._decode_group(kind_id, group, loading)

    def _refresh_kinds(self) -> None:
        """Before a stream: read the catalog's kinds if it has some this backend has not.

        The connection is busy while results stream, so the files of a kind
        met only then wait for the stream's end, holding their bytes. The
        count and largest id of ``polystore_kinds`` (in the snapshot the
        stream reads, so they cover every file it can return; counted up to
        4,097 rows, so the count costs alike in a catalog of millions) tell
        whether kinds were added since they were last read; catalogs of up to
        4,096 kinds are then read whole.
        """
        rows = self._fast.fetch_raw(_COUNT_KINDS, [])
        if rows is None:
            raise Unavailable
        seen = tuple(rows[0])
        if seen != self._kinds_counted and seen[0] <= _MAX_DECODERS:
            self._learn_kinds(None)
            self._kinds_counted = seen

    def _learn_kinds(self, ids: Sequence[int] | None) -> dict[int, Any]:
        """Read kinds ``ids`` (None: every kind, up to 4,096) into the cache of kinds.

        Raises :class:`~.fast.Unavailable` if the fast path cannot read them.
        """
        defs = self._kind_defs
        dialect = self._dialect
        queries: list[tuple[str, list[Any]]]
        if ids is None:
            queries = [(f"{kinds_sql(dialect, None)} LIMIT {_MAX_DECODERS}", [])]
        else:
            queries = [
                (kinds_sql(dialect, len(part)), kinds_args(dialect, part))
                for part in tree.chunks([i for i in ids if i not in defs])
            ]
        for sql, args in queries:
            rows = self._fast.fetch_raw(sql, args)
            if rows is None:
                raise Unavailable
            if len(defs) + len(rows) > _MAX_KINDS:
                defs.clear()
            for row in rows:
                defs[row[0]] = tuple(row[1:])
        return defs

    def _decode_fast(self, raw: Sequence[Any], path: str) -> Any:
        """The value of a fast-path row of :func:`~.fast.load_columns`.

        Raises :class:`~.fast.Unavailable` if the file's kind cannot be read.
        """
        kind, kind_id, size, blob_hash, store, data = raw[:6]
        if kind != "file":
            raise is_a_directory(path)
        # (the decoder first: no content is read for a file the slow path must load)
        decode = self._decoders.get(kind_id) or self._decoder_for(kind_id, many=False)
        if store != INLINE or data is None or self._placement.verify_inline or len(data) != size:
            data = self._placement.content(store, size, blob_hash, data, path)
        return decode(data)

    @staticmethod
    def _check_file(row: Any, path: str) -> None:
        if row is None:
            raise not_found(path)
        if row.kind == "dir":
            raise is_a_directory(path)

    def _lookup_kind(self, path: str) -> tuple[int, str] | None:
        """``(id, kind)`` of the node at normal ``path``, or None."""
        if self._tx.get() is None:
            parts = paths.split_parts(path)
            rows = self._fast.fetch_raw(
                resolve_sql(self._dialect, len(parts), "kind"),
                resolve_args(self._dialect, parts),
            )
            if rows is not None:
                return (rows[0][0], rows[0][1]) if rows else None
        row = self._read(lambda conn: tree.resolve(conn, path))
        return None if row is None else (int(row.id), str(row.kind))

    def load(self, file_path: str, **kwargs: Any) -> Any:
        # docstring inherited
        if kwargs:
            reject_kwargs(self, "load", kwargs)
        path = paths.normalize_file(file_path)
        self._check_decoders()
        if self._tx.get() is None:
            try:
                return self._load_fast(path)
            except Unavailable:
                pass
        row = self._read(lambda conn: tree.resolve(conn, path, with_content=True))
        self._check_file(row, path)
        return self._decode(row, path)

    def _load_fast(self, path: str) -> Any:
        """``load`` on the fast path; raises :class:`~.fast.Unavailable` where it cannot."""
        parent, name = paths.split(path)
        known = self._dirs.get(parent)
        if known is not None:  # one join, whatever the depth
            rows = self._fast.fetch_raw(cached_load_sql(self._dialect), [known[0], name, known[1]])
            if rows:
                return self._decode_fast(rows[0], path)
        parts = path.split("/")
        rows = self._fast.fetch_raw(
            resolve_sql(self._dialect, len(parts), "load"), resolve_args(self._dialect, parts)
        )
        if rows is None:
            raise Unavailable
        if not rows:
            raise not_found(path)
        row = rows[0]
        if parent and row[7] is not None:  # (no version row: no cache)
            self._remember_dir(parent, row[6], row[7])
        return self._decode_fast(row, path)

    def _remember_dir(self, path: str, dir_id: int, version: int) -> None:
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

    def load_batch(self, file_paths: Sequence[str], **kwargs: Any) -> list[Any]:
        """Load every path in order, from one consistent snapshot of the catalog."""
        if kwargs:
            reject_kwargs(self, "load_batch", kwargs)
        norm = paths.normalize_files(file_paths)
        self._check_decoders()
        by_parent: dict[str, list[str]] = defaultdict(list)
        for path in dict.fromkeys(norm):
            parent, _, name = path.rpartition("/")  # paths.split, inlined
            by_parent[parent].append(name)
        if self._tx.get() is None:
            values = self._load_many_fast(norm, by_parent)
            if values is not None:
                return values
        rows = self._read(lambda conn: self._fetch_many(conn, by_parent), snapshot=True)
        for path in norm:
            self._check_file(rows.get(path), path)
        return [self._decode(rows[p], p) for p in norm]

    def _load_many_fast(self, norm: list[str], by_parent: dict[str, list[str]]) -> list[Any] | None:
        """``load_batch`` on the fast path, or None if it is unavailable.

        Inline content is decoded as each chunk of rows arrives and the
        driver's bytes are dropped at once, so the process holds one copy of
        the batch, not two. External content is read after the snapshot ends.
        """
        repeated: set[str] = set()
        if sum(map(len, by_parent.values())) != len(norm):
            repeated = {p for p, n in Counter(norm).items() if n > 1}
        loading = _Loading(repeated)
        try:
            with self._fast.snapshot() as fast:
                if not fast:
                    return None
                stream = loading.stream = self._fast.can_stream()
                if stream:
                    self._refresh_kinds()
                targets = self._children(by_parent)
                if targets is None:
                    return None
                # Lean rows first (the kind id, size, bytes and name of each
                # file), then full rows of the files that need a closer look.
                # With verify_inline every file needs its hash: full rows only.
                lean = not self._placement.verify_inline
                self._fetch_and_decode(targets, loading, lean=lean)
                if loading.closer:
                    closer = loading.closer
                    again = [(p, i, closer[p]) for p, i, _ in targets if p in closer]
                    self._fetch_and_decode(again, loading, lean=False)
                loading.stream = False
                self._decode_waiting(loading)
            return self._collect(norm, loading)
        except Unavailable:
            return None

    def _collect(self, norm: list[str], loading: _Loading) -> list[Any]:
        """The values of ``norm``, in order, from what the snapshot decoded or left for later."""
        decoded, later = loading.decoded, loading.later
        if not later:
            try:
                return list(map(decoded.pop, norm))
            except KeyError as missing:
                raise not_found(missing.args[0]) from None
        values = []
        for path in norm:
            if path in decoded:
                values.append(decoded.pop(path))
                continue
            row = later.get(path)
            if row is None:
                raise not_found(path)
            values.append(self._decode_fast(row, path))
        return values

    def _fetch_and_decode(
        self, targets: list[tuple[str, int, list[str]]], loading: _Loading, *, lean: bool
    ) -> None:
        """Fetch the rows of ``targets`` (:meth:`_children`) and decode them into ``loading``."""
        queries = self._children_queries(targets, loading.stream, lean)
        decode_chunk = self._decode_lean_chunk if lean else self._decode_chunk
        # Closed before the snapshot ends, even when a file fails to decode:
        # a stream stopped early is cancelled, and the connection stays usable.
        with closing(self._fetch_chunks(queries, loading.stream)) as chunks:
            for prefix, chunk in chunks:
                decode_chunk(chunk, prefix, loading)  # (empties it)

    def _decode_lean_chunk(self, rows: list[Any], prefix: str, loading: _Loading) -> None:
        """Decode one chunk of lean rows (:data:`~.fast.LEAN_COLUMNS`) into ``loading.decoded``.

        Like :meth:`_decode_chunk`, for the files with inline content of their
        recorded size and a kind id, asked for once. The names of the others
        go to ``loading.closer``, to be read again in full.
        """
        repeated, decoded = loading.repeated, loading.decoded
        groups: dict[int, tuple[list[str], list[Any]]] = {}
        closer: list[str] = []
        rows.reverse()
        pop = rows.pop
        while rows:
            kind_id, size, data, name = pop()
            path = prefix + name
            if (
                kind_id is not None
                and data is not None
                and len(data) == size <= SHARED_ARRAY_BYTES
                and path not in repeated
            ):  # the common case, first and with the fewest tests
                group = groups.get(kind_id)
                if group is None:
                    group = groups[kind_id] = ([], [])
                group[0].append(path)
                group[1].append(data)
            elif kind_id is None or data is None or len(data) != size or path in repeated:
                closer.append(name)
            else:  # large
                decode = self._decoders.get(kind_id)
                if decode is None:
                    if loading.stream:
                        decode = self._known_decoder(kind_id, many=False)
                    else:
                        decode = self._decoder_for(kind_id, many=False)
                if decode is None:
                    closer.append(name)  # (a kind to read when the connection is free)
                else:
                    decoded[path] = decode(data)
            del data
        self._decode_groups(groups, loading)
        if closer:
            loading.closer.setdefault(prefix, []).extend(closer)

    def _decode_chunk(self, rows: list[Any], prefix: str, loading: _Loading) -> None:
        """Decode one chunk of :func:`~.fast.children_sql` rows into ``loading.decoded``.

        Rows are taken off ``rows`` one at a time, so each row's bytes are
        freed once decoded. Small inline files (up to
        :data:`~polystore.serializers.SHARED_ARRAY_BYTES`) are grouped by kind
        and each group decoded with one call of its batch decoder: at most one
        chunk of small files (500 of 64 KiB, or 100 where results stream)
        waits at a time. Larger files, and every file with ``verify_inline``,
        are decoded at once. External content, directories and paths asked for
        twice go to ``later``, for :meth:`_decode_fast` after the snapshot;
        so do files of a kind this backend has yet to read while results
        stream (the connection is busy), small ones to ``waiting``.
        """
        verify = self._placement.verify_inline
        repeated, decoded, later = loading.repeated, loading.decoded, loading.later
        groups: dict[int, tuple[list[str], list[Any]]] = {}
        rows.reverse()
        pop = rows.pop
        while rows:
            row = pop()
            path = prefix + row[6]
            data = row[5]
            if (
                row[4] == INLINE
                and data is not None
                and not verify
                and len(data) == row[2] <= SHARED_ARRAY_BYTES
                and row[0] == "file"
                and path not in repeated
            ):  # the common case, first and with the fewest tests
                group = groups.get(row[1])
                if group is None:
                    group = groups[row[1]] = ([], [])
                group[0].append(path)
                group[1].append(data)
            elif (
                row[4] != INLINE
                or data is None
                or row[0] != "file"
                or path in repeated
                or (loading.stream and self._known_decoder(row[1], many=False) is None)
            ):
                later[path] = row
            else:  # large, verified, or not its recorded size (IntegrityError)
                decoded[path] = self._decode_fast(row, path)
            del row, data
        self._decode_groups(groups, loading)

    def _decode_groups(
        self, groups: dict[int, tuple[list[str], list[Any]]], loading: _Loading
    ) -> None:
        """Decode each group of one chunk, learning its new kinds in one query first."""
        if not loading.stream:
            defs, decoders = self._kind_defs, self._batch_decoders
            new = [k for k in groups if k not in decoders and k is not None and k not in defs]
            if new:
                self._learn_kinds(new)
        for kind_id, group in groups.items():
            self._decode_group(kind_id, group, loading)

    def _decode_group(
        self, kind_id: int, group: tuple[list[str], list[Any]], loading: _Loading
    ) -> None:
        names, datas = group
        decode_many = self._batch_decoders.get(kind_id)
        if decode_many is None:
            if loading.stream:
                decode_many = self._known_decoder(kind_id, many=True)
                if decode_many is None:  # decoded when the stream ends
                    waiting = loading.waiting.setdefault(kind_id, ([], []))
                    waiting[0].extend(names)
                    waiting[1].extend(datas)
                    datas.clear()
                    return
            else:
                decode_many = self._decoder_for(kind_id, many=True)
        loading.decoded.update(zip(names, decode_many(datas), strict=True))
        datas.clear()

    def _fetch_chunks(
        self, queries: list[tuple[str, str, list[Any]]], stream: bool
    ) -> Generator[tuple[str, list[Any]], None, None]:
        """``(prefix, rows)`` of each query, a chunk of rows at a time.

        Streamed if ``stream`` (:meth:`.FastReader.stream_raw`), else one fetch
        per query. Raises :class:`~.fast.Unavailable` if the fast path fails.
        """
        fast = self._fast
        for prefix, sql, args in queries:
            if stream:
                with closing(fast.stream_raw(sql, args, STREAM_ROWS)) as chunks:
                    for chunk in chunks:
                        yield prefix, chunk
                continue
            rows = fast.fetch_raw(sql, args)
            if rows is None:
                raise Unavailable
            yield prefix, rows

    def _children(self, by_parent: dict[str, list[str]]) -> list[tuple[str, int, list[str]]] | None:
        """``(prefix, id, names)`` of each parent in ``by_parent`` that is a directory.

        Parents that do not exist or are files are left out (their paths are
        not found). None if the fast path is unavailable.
        """
        dialect = self._dialect
        targets = []
        for parent, names in by_parent.items():
            parent_id = ROOT_ID
            if parent:
                parts = parent.split("/")
                found = self._fast.fetch_raw(
                    resolve_sql(dialect, len(parts), "kind"), resolve_args(dialect, parts)
                )
                if found is None:
                    return None
                if not found or found[0][1] != "dir":
                    continue
                parent_id = found[0][0]
            targets.append((f"{parent}/" if parent else "", parent_id, names))
        return targets

    def _children_queries(
        self, targets: list[tuple[str, int, list[str]]], stream: bool, lean: bool
    ) -> list[tuple[str, str, list[Any]]]:
        """``(prefix, sql, args)`` fetching the named children of each of ``targets``.

        One query per directory if its results ``stream`` (PostgreSQL, all its
        names as one parameter), else one per chunk of names.
        """
        dialect = self._dialect
        queries = []
        for prefix, parent_id, names in targets:
            if stream:
                # (a count matters only to SQLite's IN lists)
                sql = children_sql(dialect, 0, lean=lean)
                queries.append((prefix, sql, [parent_id, "/".join(names)]))
                continue
            for part in tree.chunks(names):
                args = [parent_id, "/".join(part)] if self._pg else [parent_id, *part]
                queries.append((prefix, children_sql(dialect, len(part), lean=lean), args))
        return queries

    def _fetch_many(self, conn: Connection, by_parent: dict[str, list[str]]) -> dict[str, Any]:
        blobs = tree.blobs
        found: dict[str, Any] = {}
        for parent, names in by_parent.items():
            parent_row = tree.resolve(conn, parent)
            if parent_row is None or parent_row.kind != "dir":
                continue
            for part in tree.chunks(names):
                stmt = (
                    sa.select(*tree.NODE_COLUMNS, blobs.c.store, blobs.c.data)
                    .select_from(nodes.outerjoin(blobs, blobs.c.hash == nodes.c.blob_hash))
                    .where(nodes.c.parent_id == parent_row.id, nodes.c.name.in_(part))
                )
                for row in conn.execute(stmt):
                    found[paths.join(parent, row.name)] = row
        return found

    # -- inspecting ------------------------------------------------------------------

    def _kind(self, path: str) -> str | None:
        found = self._lookup_kind(paths.normalize(path))
        return None if found is None else found[1]

    def exists(self, path: str) -> bool:
        # docstring inherited
        return self._kind(path) is not None

    def is_file(self, path: str) -> bool:
        # docstring inherited
        return self._kind(path) == "file"

    def is_dir(self, path: str) -> bool:
        # docstring inherited
        return self._kind(path) == "dir"

    def _dir_id(self, conn: Connection, path: str) -> int:
        row = tree.resolve(conn, path)
        if row is None:
            raise not_found(path)
        if row.kind != "dir":
            raise not_a_directory(path)
        return int(row.id)

    def list_dir(self, path: str) -> list[str]:
        # docstring inherited
        norm = paths.normalize(path)
        if self._tx.get() is None:
            with self._fast.snapshot() as fast:
                if fast:
                    found = self._lookup_kind(norm)
                    if found is None:
                        raise not_found(norm)
                    if found[1] != "dir":
                        raise not_a_directory(norm)
                    rows = self._fast.fetch_raw(names_sql(self._dialect), [found[0]])
                    if rows is not None:
                        return [name for (name,) in rows]

        def work(conn: Connection) -> list[str]:
            dir_id = self._dir_id(conn, norm)
            stmt = sa.select(nodes.c.name).where(nodes.c.parent_id == dir_id)
            return list(conn.execute(stmt.order_by(nodes.c.name)).scalars())

        return self._read(work)

    def iter_dir(self, path: str = "", *, page_size: int = 1000) -> Iterator[str]:
        """Yield the names in directory ``path`` in code-point order, a page at a time.

        Each page is one indexed query that starts after the last name seen, so
        memory stays flat for directories of millions of entries.
        """
        norm = paths.normalize(path)
        dir_id = self._read(lambda conn: self._dir_id(conn, norm))
        after: str | None = None
        while True:
            page = self._read(
                partial(tree.iter_names, parent_id=dir_id, after=after, limit=page_size)
            )
            yield from page
            if len(page) < page_size:
                return
            after = page[-1]

    def list_files(
        self,
        directory: str = "",
        pattern: str | None = None,
        extensions: Any = None,
        recursive: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        # docstring inherited
        norm = paths.normalize(directory)
        exts = paths.normalize_extensions(extensions)

        def work(conn: Connection) -> list[str]:
            dir_id = self._dir_id(conn, norm)
            if recursive:
                sql = tree.subtree_sql(
                    conn.dialect.name, select="sub.path", where="WHERE sub.kind = 'file'"
                )
                rel = list(conn.execute(sa.text(sql), {"root": dir_id}).scalars())
            else:
                stmt = sa.select(nodes.c.name).where(
                    nodes.c.parent_id == dir_id, nodes.c.kind == "file"
                )
                rel = list(conn.execute(stmt).scalars())
            return rel

        # Resolving the directory and listing it must see one state of the catalog.
        found = self._read(work, snapshot=True)
        return sorted(
            paths.join(norm, rel)
            for rel in found
            if paths.match_name(rel.rpartition("/")[2], pattern, exts)
        )

    def stat(self, path: str) -> StatResult:
        # docstring inherited
        norm = paths.normalize(path)
        row = self._read(lambda conn: tree.resolve(conn, norm, with_content=False))
        if row is None:
            raise not_found(norm)
        store = None
        if row.blob_hash is not None:
            store = self._read(
                lambda conn: conn.execute(
                    sa.select(tree.blobs.c.store).where(tree.blobs.c.hash == row.blob_hash)
                ).scalar()
            )
        return self._stat_result(norm, row, store)

    @staticmethod
    def _stat_result(path: str, row: Any, store: str | None) -> StatResult:
        return StatResult(
            path=path,
            kind=row.kind,
            size=row.size,
            created_at=tree.as_utc(row.created_at),
            modified_at=tree.as_utc(row.modified_at),
            serializer=row.serializer,
            dtype=row.dtype,
            shape=tuple(row.shape) if row.shape is not None else None,
            attrs=dict(row.attrs or {}),
            hash=row.blob_hash,
            store=store,
        )

    # -- changing the tree -------------------------------------------------------------

    def ensure_directory(self, path: str) -> None:
        # docstring inherited
        norm = paths.normalize(path)
        self._write(lambda conn: tree.ensure_dirs(conn, norm, _now(), tree.DirCache()))

    def delete(self, path: str, recursive: bool = False) -> None:
        # docstring inherited
        norm = paths.normalize_file(path)

        def work(conn: Connection) -> None:
            row = tree.resolve(conn, norm)
            if row is None:
                raise not_found(norm)
            if row.kind == "file":
                # The hash the deleted row held, not the one resolved: a
                # concurrent overwrite may have replaced it since.
                released = (
                    conn.execute(
                        nodes.delete()
                        .where(
                            nodes.c.id == row.id,
                            nodes.c.parent_id == row.parent_id,
                            nodes.c.name == row.name,
                        )
                        .returning(nodes.c.blob_hash)
                    )
                    .scalars()
                    .all()
                )
                if not released:
                    raise CatalogChanged(f"{norm!r} was moved or deleted meanwhile")
                release_blobs(conn, Counter(released))
                return
            # Directory moves and deletes queue here, before they lock any node
            # row; then the directory is looked up again, as it is now.
            tree.bump_version(conn)
            row = tree.resolve(conn, norm)
            if row is None:
                raise not_found(norm)
            if row.kind != "dir":
                raise CatalogChanged(f"{norm!r} became a file meanwhile")
            dirs = tree.lock_subtree(conn, row) if recursive else [row.id]
            if (
                not recursive
                and conn.execute(
                    sa.select(nodes.c.id).where(nodes.c.parent_id == row.id).limit(1)
                ).first()
            ):
                raise directory_not_empty(norm)
            released = tree.delete_files_in(conn, dirs)
            # The subtree holds directories only now (none can be added while
            # they are locked): ON DELETE CASCADE removes them with their root.
            conn.execute(nodes.delete().where(nodes.c.id == row.id))
            release_blobs(conn, Counter(released))

        self._write(work)

    def _prepare_target(
        self, conn: Connection, src: str, dst: str, now: dt.datetime, *, moving: bool = False
    ) -> tuple[Any, int, str]:
        row = tree.resolve(conn, src)
        if row is None:
            raise not_found(src)
        if moving and row.kind == "dir":
            # Directory moves and deletes queue here, before they lock any node
            # row; then the source is looked up again, as it is now (a move
            # that checked a stale tree could put a directory inside itself).
            tree.bump_version(conn)
            row = tree.resolve(conn, src)
            if row is None:
                raise not_found(src)
        if src == dst:
            raise already_exists(dst)
        if row.kind == "dir" and dst.startswith(src + "/"):
            raise InvalidPathError(f"cannot put directory {src!r} inside itself: {dst!r}")
        if tree.resolve(conn, dst) is not None:
            raise already_exists(dst)
        parent, name = paths.split(dst)
        return row, tree.ensure_dirs(conn, parent, now, tree.DirCache()), name

    def move(self, src: str, dst: str) -> None:
        """Move a file or directory tree. A directory move rewrites one row."""
        src, dst = paths.normalize_file(src), paths.normalize_file(dst)

        def work(conn: Connection) -> None:
            now = _now()
            row, parent_id, name = self._prepare_target(conn, src, dst, now, moving=True)
            moved = conn.execute(
                nodes.update()
                .where(
                    nodes.c.id == row.id,
                    nodes.c.parent_id == row.parent_id,
                    nodes.c.name == row.name,
                )
                .values(parent_id=parent_id, name=name, modified_at=now)
            ).rowcount
            if not moved:
                raise CatalogChanged(f"{src!r} was moved or deleted meanwhile")

        self._write(work)

    def copy(self, src: str, dst: str) -> None:
        """Copy a file or directory tree: catalog rows only, the blobs are shared."""
        src, dst = paths.normalize_file(src), paths.normalize_file(dst)
        self._write(lambda conn: self._copy(conn, src, dst))

    def _copy(self, conn: Connection, src: str, dst: str) -> None:
        now = _now()
        row, parent_id, name = self._prepare_target(conn, src, dst, now)
        copied = [c.name for c in tree.NODE_COLUMNS if c.name not in ("id", "parent_id", "name")]

        def clone(source: Any, new_parent: int, new_name: str) -> dict[str, Any]:
            values = {col: getattr(source, col) for col in copied}
            return values | {
                "parent_id": new_parent,
                "name": new_name,
                "created_at": now,
                "modified_at": now,
            }

        if row.kind == "dir" and parent_id in tree.lock_subtree(conn, row):
            # Nothing enters the source tree while it is copied -- but a
            # concurrent move put the destination inside it before the lock.
            raise CatalogChanged(f"{dst!r} was moved inside {src!r} meanwhile")
        new_root = conn.execute(
            nodes.insert().values(clone(row, parent_id, name)).returning(nodes.c.id)
        ).scalar_one()
        # Each new row adds a reference to the hash it was given: the counts
        # are those of the rows inserted, whatever changed since they were read.
        refs: Counter[str] = Counter()
        if row.kind == "file":
            refs[row.blob_hash] += 1
        else:
            # Level by level, so every parent exists (and has its new id)
            # before its children are inserted.
            id_map = {row.id: new_root}
            level = [row.id]
            while level:
                next_level: list[int] = []
                for part in tree.chunks(level):
                    kids = conn.execute(
                        sa.select(*tree.NODE_COLUMNS).where(nodes.c.parent_id.in_(part))
                    ).all()
                    if not kids:
                        continue
                    new_ids = (
                        conn.execute(
                            nodes.insert().returning(nodes.c.id, sort_by_parameter_order=True),
                            [clone(kid, id_map[kid.parent_id], kid.name) for kid in kids],
                        )
                        .scalars()
                        .all()
                    )
                    for kid, new_id in zip(kids, new_ids, strict=True):
                        if kid.kind == "dir":
                            id_map[kid.id] = new_id
                            next_level.append(kid.id)
                        else:
                            refs[kid.blob_hash] += 1
                level = next_level
        add_references(conn, refs)

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
        that value (str, int, float, bool or None).
        """
        from polystore.backends.sql.query import run_query

        norm = paths.normalize(under)
        rows = self._read(
            lambda conn: run_query(
                conn,
                self._dir_id(conn, norm),
                kind=kind,
                serializer=serializer,
                dtype=dtype,
                attrs=attrs,
                limit=limit,
            )
        )
        return [self._stat_result(paths.join(norm, row.path), row, row.store) for row in rows]

    # -- content maintenance ------------------------------------------------------------

    def _outside_transaction(self, operation: str) -> None:
        # Maintenance commits its own transactions, one per batch; inside the
        # caller's (on SQLite, holding the only write lock) it could not.
        if self._tx.get() is not None:
            raise UnsupportedOperationError(f"{operation}() cannot run inside transaction()")

    def gc(self, *, grace: dt.timedelta | float | None = None) -> GCReport:
        """Remove content nothing refers to, and uploads that were abandoned.

        Unreferenced external blobs are deleted, and upload intents older than
        ``grace`` (a timedelta or seconds; default 24 hours) with their objects:
        uploads whose writer died or whose transaction rolled back. Works from
        the catalog's records alone and never lists the blob store. Safe while
        other processes read and write: a blob any file refers to is never
        deleted. ``grace`` must outlast the longest save in progress, whose
        upload would otherwise be taken (the save then fails and is retried;
        nothing is lost).
        """
        from polystore.backends.sql.gc import DEFAULT_GRACE, collect_garbage

        self._outside_transaction("gc")
        with translate_errors(self.url):
            return collect_garbage(self._placement, grace=DEFAULT_GRACE if grace is None else grace)

    def fsck(self, *, verify: bool = False) -> FsckReport:
        """Check the catalog against its content, both ways; see :class:`FsckReport`.

        Every referenced blob exists with the recorded size (and, with
        ``verify=True``, hash: this reads all content); every object in the
        external store is referenced; every reference count is right. Lists
        the external store (the only operation that does).
        """
        from polystore.backends.sql.fsck import check

        with translate_errors(self.url):
            return check(self._placement, verify=verify)

    def rebalance(self, inline_limit: int | None = None) -> RebalanceReport:
        """Move blobs between inline and external placement to match the inline limit.

        Blobs over the limit (``inline_limit``, default this backend's) move to
        the external store, the others into the database; each move is its own
        transaction, so an interruption leaves every blob readable in one place.
        Without an external store nothing moves.
        """
        from polystore.backends.sql.gc import rebalance

        self._outside_transaction("rebalance")
        limit = self.inline_limit if inline_limit is None else inline_limit
        with translate_errors(self.url):
            return rebalance(self._placement, limit)

    # -- for tests and tools -----------------------------------------------------------

    def count_nodes(self) -> int:
        """Files and directories in the catalog, the root excluded."""
        return int(
            self._read(
                lambda conn: conn.execute(
                    sa.select(sa.func.count()).select_from(nodes).where(nodes.c.id != ROOT_ID)
                ).scalar_one()
            )
        )

    # -- pickling ------------------------------------------------------------------------

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle by configuration; the copy opens the catalog on first use.

        See :mod:`polystore.backends.sql.reopen` for what is carried.
        """
        from polystore.backends.sql.reopen import reduce_backend

        return reduce_backend(self)

    # -- listing with details ------------------------------------------------------------

    def scan_dir(self, path: str = "") -> list[StatResult]:
        """What :meth:`stat` says of each entry of directory ``path``, in name order.

        One query however many entries there are (like :func:`os.scandir`):
        ``list_dir`` and a ``stat`` for each name would be a query per entry.
        """
        norm = paths.normalize(path)
        blobs = tree.blobs

        def work(conn: Connection) -> list[Any]:
            stmt = (
                sa.select(*tree.NODE_COLUMNS, blobs.c.store)
                .select_from(nodes.outerjoin(blobs, blobs.c.hash == nodes.c.blob_hash))
                .where(nodes.c.parent_id == self._dir_id(conn, norm))
                .order_by(nodes.c.name)
            )
            return list(conn.execute(stmt))

        # Resolving the directory and listing it must see one state of the catalog.
        rows = self._read(work, snapshot=True)
        return [self._stat_result(paths.join(norm, row.name), row, row.store) for row in rows]
