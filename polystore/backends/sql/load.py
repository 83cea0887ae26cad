"""Loading: single and batch loads, on the fast path or through SQLAlchemy.

A single ``load`` outside a transaction is one statement on the fast path
(:mod:`.fast`): the file's row and inline bytes, through the directory ids
cached per tree version. ``load_batch`` reads one snapshot: lean rows first
(kind id, size, bytes, name), decoded chunk by chunk with one batch decoder
call per kind, and full rows only for the files that need a closer look
(external content, directories, repeated paths). Inside a caller's
transaction, or where the fast path cannot serve, both go through
SQLAlchemy (:meth:`~.catalog.Catalog.read` and :func:`~.tree.resolve`).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import closing, contextmanager
from functools import partial
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from polystore import paths
from polystore.backends._common import is_a_directory, not_found
from polystore.backends.sql import tree
from polystore.backends.sql.catalog import Catalog
from polystore.backends.sql.content import INLINE
from polystore.backends.sql.engine import JSONColumnError
from polystore.backends.sql.fast import (
    STREAM_ROWS,
    FastReader,
    Unavailable,
    cached_kind_sql,
    cached_load_sql,
    children_sql,
    parse_json,
    resolve_args,
    resolve_sql,
)
from polystore.backends.sql.kinds import kinds_args, kinds_sql
from polystore.backends.sql.models import ROOT_ID
from polystore.backends.sql.models import nodes_table as nodes
from polystore.backends.sql.verify import ContentReader
from polystore.blobs.base import is_content_hash
from polystore.errors import CatalogDamagedError
from polystore.serializers import SHARED_ARRAY_BYTES, SerializerRegistry

__all__ = ["Loader", "damaged_record", "json_column", "reading"]

#: Decoders each backend keeps (one per distinct serializer, dtype, shape, meta).
_MAX_DECODERS = 4096
# How many kinds there are (up to one more than are read whole), and the largest id.
_COUNT_KINDS = (
    f"SELECT count(*), max(id) FROM (SELECT id FROM polystore_kinds LIMIT {_MAX_DECODERS + 1}) AS k"
)
#: Kinds each backend knows (what an id means: a few short strings each).
_MAX_KINDS = 1 << 16
#: The buffer external content is read into, by serializer (see
#: :meth:`.ContentReader.read`): one the built-in decoder keeps without a copy.
_BUFFERS = {"bytes": "bytes", "ndarray": "ndarray"}
#: Directory ids each backend keeps for single loads.
_MAX_DIRS = 4096


def _decoder_meta(meta: dict[str, Any] | None, shape: Any, dtype: str | None) -> dict[str, Any]:
    """What a serializer's decoder is given: its recorded meta, plus shape and dtype."""
    full = dict(meta or {})
    if shape is not None:
        full["shape"] = shape
    if dtype is not None:
        full["dtype"] = dtype
    return full


def damaged_record(path: str, what: str) -> CatalogDamagedError:
    """The error for the row of ``path`` holding ``what`` polystore never writes."""
    return CatalogDamagedError(
        f"the catalog's record of {path!r} is damaged: {what} (written by another "
        "program?); `fsck()` lists every such row, to repair or remove with SQL"
    )


#: The JSON type each JSON column of a node holds when it is not null.
_JSON_COLUMNS = {"shape": (list, "a JSON array"), "meta": (dict, "a JSON object"),
                 "attrs": (dict, "a JSON object")}  # fmt: skip


def json_column(path: str, row: Any, column: str, *, text: bool = False) -> Any:
    """Column ``column`` of ``path``'s ``row``, checked: what polystore writes, or damage.

    ``text``: the row holds the column as JSON text (:func:`~.query.run_query`),
    parsed here so that damage names its path.
    """
    value = getattr(row, column)
    if text and value is not None:
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as exc:
            raise damaged_record(path, f"its {column} is not JSON") from exc
    kind, name = _JSON_COLUMNS[column]
    if value is not None and not isinstance(value, kind):
        raise damaged_record(path, f"its {column} is not {name}")
    return value


@contextmanager
def reading(path: str) -> Iterator[None]:
    """Name ``path`` in the error for a JSON column of its row that does not parse."""
    try:
        yield
    except JSONColumnError as exc:
        raise damaged_record(path, "its shape, meta or attrs is not JSON") from exc


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


class Loader:
    """Loads: single and batch, on the fast path or through SQLAlchemy.

    Holds what loads cache: decoders and what each kind id means (ids are
    derived from their kinds, so these stay true in any catalog; see
    :mod:`polystore.backends.sql.kinds`), and the ids of directories single
    loads resolved, each with the tree version it was read at.
    """

    def __init__(self, catalog: Catalog, fast: FastReader, reader: ContentReader) -> None:
        self.catalog = catalog
        self._fast = fast
        self._reader = reader
        self._dialect = catalog.dialect
        self._pg = catalog.postgresql
        self.serializers = SerializerRegistry.default()
        self.allow_pickle = False
        # kind id -> decoder, batch decoder, and what the id means (serializer,
        # dtype, and shape and meta as JSON text)
        self._decoders: dict[int, Callable[[Any], Any]] = {}
        self._batch_decoders: dict[int, Callable[[Any], list[Any]]] = {}
        self._decoders_state: tuple[Any, ...] = ()
        self._kind_defs: dict[int, tuple[str, str | None, str | None, str | None]] = {}
        # (rows, largest id) of polystore_kinds when last read whole
        self._kinds_counted: tuple[Any, ...] = ()
        #: Directory path -> (id, tree version it was read at), for single loads.
        self._dirs: dict[str, tuple[int, int]] = {}
        self._dirs_version = 0

    def _decode(self, row: Any, path: str) -> Any:
        """The value of file ``row`` as SQLAlchemy reads it (JSON columns parsed)."""
        shape, meta = json_column(path, row, "shape"), json_column(path, row, "meta")
        into = _BUFFERS.get(row.serializer, "bytearray")
        data = self._content(row.store, row.size, row.blob_hash, row.data, path, into)
        full = _decoder_meta(meta, shape, row.dtype)
        return self.serializers.decode(row.serializer, data, full, allow_pickle=self.allow_pickle)

    def decode_row(self, row: Any, path: str) -> Any:
        """The value of file ``row``: node columns, ``store`` and ``data``, as SQLAlchemy reads them.

        For readers of other relations than the live tree (:mod:`.snapshots`).
        """
        self._check_file(row, path)
        return self._decode(row, path)

    def decode_inline(self, kind_id: int, datas: list[Any], size: int) -> list[Any] | None:
        """The values of inline contents ``datas`` of files of kind ``kind_id``.

        One batch decoder call when every content is small (``size``, the
        largest, at most :data:`~polystore.serializers.SHARED_ARRAY_BYTES`),
        else one decoder call each, as a live batch load does. None if the
        kind cannot be read on the fast path: decode from the full rows then.
        """
        try:
            if size <= SHARED_ARRAY_BYTES:
                return self._decoder_for(kind_id, many=True)(datas)  # type: ignore[no-any-return]
            decode = self._decoder_for(kind_id, many=False)
        except Unavailable:
            return None
        return [decode(data) for data in datas]

    def _content(
        self,
        store: str | None,
        size: int,
        blob_hash: str,
        data: Any,
        path: str,
        into: str = "bytearray",
    ) -> Any:
        """The verified content of file ``path`` (see :meth:`.ContentReader.content`).

        A blob store names its objects by hash: a hash polystore never writes
        (another program's row) is damage, not a key to look up.
        """
        if store is not None and store != INLINE and not is_content_hash(blob_hash):
            raise damaged_record(path, f"its blob hash {blob_hash!r} is not a SHA-256 hex digest")
        return self._reader.content(store, size, blob_hash, data, path, into=into)

    def use(self, serializers: SerializerRegistry, allow_pickle: bool) -> None:
        """Decode with these (the backend's, as they are now); drop cached decoders if they changed."""
        self.serializers, self.allow_pickle = serializers, allow_pickle
        state = (serializers, serializers.changes, allow_pickle)
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

        Decoders are cached by kind id; :meth:`use` drops them all
        when the serializers change.
        """
        cache = self._batch_decoders if many else self._decoders
        decode = cache.get(kind_id)  # type: ignore[arg-type]
        if decode is None:
            found = self._kind_defs.get(kind_id)  # type: ignore[arg-type]
            if found is None:
                return None
            serializer, dtype, shape, meta = found
            try:
                full = _decoder_meta(parse_json(meta), parse_json(shape), dtype)
            except (ValueError, TypeError, RecursionError) as exc:
                raise CatalogDamagedError(
                    f"row {kind_id} of polystore_kinds is damaged: its shape or meta is not "
                    "the JSON polystore writes; `fsck()` lists it among the bad kinds"
                ) from exc
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
        if store != INLINE or data is None or self._reader.verify_inline or len(data) != size:
            into = _BUFFERS.get(self._kind_defs.get(kind_id, ("",))[0], "bytearray")
            data = self._content(store, size, blob_hash, data, path, into)
        return decode(data)

    @staticmethod
    def _check_file(row: Any, path: str) -> None:
        if row is None:
            raise not_found(path)
        if row.kind == "dir":
            raise is_a_directory(path)

    def lookup(self, path: str) -> tuple[int, str] | None:
        """``(id, kind)`` of the node at normal ``path``, or None."""
        if not self.catalog.in_transaction:
            parent, name = paths.split(path)
            known = self._dirs.get(parent) if parent else None
            if known is not None:  # one indexed lookup, whatever the depth
                rows = self._fast.fetch_raw(cached_kind_sql(self._dialect), [known[0], name])
                if rows and rows[0][0] == known[1]:
                    _, node_id, kind = rows[0]
                    return None if node_id is None else (node_id, kind)
            parts = paths.split_parts(path)
            rows = self._fast.fetch_raw(
                resolve_sql(self._dialect, len(parts), "place" if parent else "kind"),
                resolve_args(self._dialect, parts),
            )
            if rows is not None:
                if not rows:
                    return None
                row = rows[0]
                if parent and row[3] is not None:  # (no version row: no cache)
                    self._remember_dir(parent, row[2], row[3])
                return (row[0], row[1])
        row = self.catalog.read(lambda conn: tree.resolve(conn, path))
        return None if row is None else (int(row.id), str(row.kind))

    def load(self, path: str) -> Any:
        """The value of file ``path`` (normal)."""
        if not self.catalog.in_transaction:
            try:
                return self._load_fast(path)
            except Unavailable:
                pass
        with reading(path):
            row = self.catalog.read(lambda conn: tree.resolve(conn, path, with_content=True))
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

    def load_batch(self, norm: list[str]) -> list[Any]:
        """The values of files ``norm`` (normal), in order, from one snapshot of the catalog."""
        by_parent: dict[str, list[str]] = defaultdict(list)
        for path in dict.fromkeys(norm):
            parent, _, name = path.rpartition("/")  # paths.split, inlined
            by_parent[parent].append(name)
        if not self.catalog.in_transaction:
            values = self._load_many_fast(norm, by_parent)
            if values is not None:
                return values
        try:
            rows = self.catalog.read(lambda conn: self._fetch_many(conn, by_parent), snapshot=True)
        except JSONColumnError:
            # Which row does not parse: the first path whose own row fails.
            for path in dict.fromkeys(norm):
                with reading(path):
                    self.catalog.read(partial(tree.resolve, path=path))
            raise
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
                lean = not self._reader.verify_inline
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
        verify = self._reader.verify_inline
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
