"""Batch loads: many files from one snapshot of the catalog, decoded chunk by chunk.

``load_batch`` on the fast path (:mod:`.fast`) reads lean rows first (kind id,
size, bytes, name: :data:`~.fast.LEAN_COLUMNS`), decoded chunk by chunk with
one batch decoder call per kind, and full rows
(:func:`~.fast.children_sql`: :func:`~.fast.load_columns` then ``name``)
only for the files that need a closer look (external content, directories,
repeated paths), decoded one at a time by :meth:`.Loader.decode_fast`. Inside
a caller's transaction, or where the fast path cannot serve, it goes through
SQLAlchemy (:meth:`~.catalog.Catalog.read` and :func:`~.tree.resolve`).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Generator
from contextlib import closing
from functools import partial
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from polystore import paths
from polystore.backends._common import not_found
from polystore.backends.sql import tree
from polystore.backends.sql.content import INLINE
from polystore.backends.sql.decoders import reading
from polystore.backends.sql.engine import JSONColumnError
from polystore.backends.sql.fast import (
    JOIN_DEPTH,
    STREAM_ROWS,
    Unavailable,
    children_sql,
    locate_sql,
    resolve_args,
    resolve_sql,
)
from polystore.backends.sql.inline import ContentGone, data_column
from polystore.backends.sql.load import Loader, check_file
from polystore.backends.sql.models import ROOT_ID
from polystore.backends.sql.models import nodes_table as nodes
from polystore.backends.sql.verify import ATTEMPTS, ObjectGone, read_again
from polystore.serializers import SHARED_ARRAY_BYTES

__all__ = ["BatchLoader"]

#: Small files of one kind: their paths, and their contents.
Group = tuple[list[str], list[object]]
#: A directory to read children of: ``(prefix, id, names)``.
Target = tuple[str, int, list[str]]


def _new_group() -> Group:
    return [], []


class _Loading:
    """What one fast-path ``load_batch`` has decoded so far, and what waits."""

    __slots__ = ("closer", "decoded", "later", "repeated", "stream", "waiting")

    def __init__(self, repeated: set[str]) -> None:
        self.repeated = repeated  # paths asked for more than once
        self.stream = False  # results are streaming: no other query meanwhile
        self.decoded: dict[str, Any] = {}  # path -> value
        self.later: dict[str, Any] = {}  # path -> row, for decode_fast after the snapshot
        # kind id -> (paths, contents) of small files of a kind not known yet
        self.waiting: dict[int, Group] = {}
        # prefix -> names whose lean rows need a closer look (read again in full)
        self.closer: dict[str, list[str]] = {}


class BatchLoader:
    """Batch loads: a :class:`~.load.Loader`'s decoding, a chunk of rows at a time."""

    def __init__(self, single: Loader) -> None:
        self.single = single
        self.catalog = single.catalog
        self.decoders = single.decoders
        self._fast = single.fast
        self._dialect = single.catalog.dialect
        self._pg = single.catalog.postgresql

    def load_batch(self, norm: list[str]) -> list[Any]:
        """The values of files ``norm`` (normal), in order, from one snapshot of the catalog.

        Large inline content is read after the snapshot: if a file changed
        meanwhile and its content left the catalog
        (:class:`~.inline.ContentGone`), the batch is read again, from a new
        snapshot; so is a batch with a missing external object
        (:class:`~.verify.ObjectGone`, as :meth:`.Loader.load`).
        """
        attempts = ATTEMPTS
        missed: frozenset[str] = frozenset()  # hashes of external objects found missing
        while True:
            try:
                return self._load_batch(norm)
            except (ContentGone, ObjectGone) as moved:
                attempts, missed = read_again(moved, attempts, missed)

    def _load_batch(self, norm: list[str]) -> list[Any]:
        by_parent: dict[str, list[str]] = defaultdict(list)
        for path in dict.fromkeys(norm):
            parent, _, name = path.rpartition("/")  # paths.split, inlined
            by_parent[parent].append(name)
        if not self.catalog.in_transaction:
            values = self._load_many_fast(norm, by_parent)
            if values is not None:
                return values
        try:
            rows = self.catalog.read(lambda conn: _fetch_many(conn, by_parent), snapshot=True)
        except JSONColumnError:
            # Which row does not parse: the first path whose own row fails.
            for path in dict.fromkeys(norm):
                with reading(path):
                    self.catalog.read(partial(tree.resolve, path=path))
            raise
        for path in norm:
            check_file(rows.get(path), path)
        decode = self.single.decode
        return [decode(rows[p], p) for p in norm]

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
                    self.decoders.refresh()
                targets = self._children(by_parent)
                if targets is None:
                    return None
                # Lean rows first (the kind id, size, bytes and name of each
                # file), then full rows of the files that need a closer look.
                # With verify_inline every file needs its hash: full rows only.
                lean = not self.single.reader.verify_inline
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
            values.append(self.single.decode_fast(row, path))
        return values

    def _fetch_and_decode(self, targets: list[Target], loading: _Loading, *, lean: bool) -> None:
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
        decoders = self.decoders
        groups: defaultdict[int, Group] = defaultdict(_new_group)
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
                group = groups[kind_id]
                group[0].append(path)
                group[1].append(data)
            elif kind_id is None or data is None or len(data) != size or path in repeated:
                closer.append(name)
            else:  # large
                decode = decoders.single.get(kind_id)
                if decode is None:
                    if loading.stream:
                        decode = decoders.known(kind_id, many=False)
                    else:
                        decode = decoders.get(kind_id, many=False)
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
        twice go to ``later``, for :meth:`.Loader.decode_fast` after the
        snapshot; so do files of a kind this backend has yet to read while
        results stream (the connection is busy), small ones to ``waiting``.
        """
        verify = self.single.reader.verify_inline
        known = self.decoders.known
        decode_fast = self.single.decode_fast
        repeated, decoded, later = loading.repeated, loading.decoded, loading.later
        groups: defaultdict[int, Group] = defaultdict(_new_group)
        rows.reverse()
        pop = rows.pop
        while rows:
            row = pop()
            kind, kind_id, size, _, store, data, _, name = row
            path = prefix + name
            if (
                store == INLINE
                and data is not None
                and not verify
                and len(data) == size <= SHARED_ARRAY_BYTES
                and kind == "file"
                and path not in repeated
            ):  # the common case, first and with the fewest tests
                group = groups[kind_id]
                group[0].append(path)
                group[1].append(data)
            elif (
                store != INLINE
                or data is None
                or kind != "file"
                or path in repeated
                or (loading.stream and known(kind_id, many=False) is None)
            ):
                later[path] = row
            else:  # large, verified, or not its recorded size (IntegrityError)
                decoded[path] = decode_fast(row, path)
            del row, data
        self._decode_groups(groups, loading)

    def _decode_waiting(self, loading: _Loading) -> None:
        """After a stream: read the kinds met meanwhile, 500 a query, and decode what waited."""
        waiting = loading.waiting
        met = {row[1] for row in loading.later.values() if row[0] == "file"}  # (kind, kind_id)
        met.update(waiting)
        met.difference_update(self.decoders.defs)
        met.discard(None)
        for part in tree.chunks(list(met)):
            self.decoders.learn(part)
            for kind_id in part:
                group = waiting.pop(kind_id, None)
                if group is not None:
                    self._decode_group(kind_id, group, loading)
        for kind_id, group in waiting.items():
            self._decode_group(kind_id, group, loading)

    def _decode_groups(self, groups: dict[int, Group], loading: _Loading) -> None:
        """Decode each group of one chunk, learning its new kinds in one query first."""
        if not loading.stream:
            defs, decoders = self.decoders.defs, self.decoders.many
            new = [k for k in groups if k not in decoders and k is not None and k not in defs]
            if new:
                self.decoders.learn(new)
        for kind_id, group in groups.items():
            self._decode_group(kind_id, group, loading)

    def _decode_group(self, kind_id: int, group: Group, loading: _Loading) -> None:
        names, datas = group
        decoders = self.decoders
        decode_many = decoders.many.get(kind_id)
        if decode_many is None:
            if loading.stream:
                decode_many = decoders.known(kind_id, many=True)
                if decode_many is None:  # decoded when the stream ends
                    waiting = loading.waiting.setdefault(kind_id, ([], []))
                    waiting[0].extend(names)
                    waiting[1].extend(datas)
                    datas.clear()
                    return
            else:
                decode_many = decoders.get(kind_id, many=True)
        loading.decoded.update(zip(names, decode_many(datas), strict=True))
        datas.clear()

    def _fetch_chunks(
        self, queries: list[tuple[str, str, list[object]]], stream: bool
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

    def _children(self, by_parent: dict[str, list[str]]) -> list[Target] | None:
        """``(prefix, id, names)`` of each parent in ``by_parent`` that is a directory.

        Parents that do not exist or are files are left out (their paths are
        not found). The parents are looked up together, up to
        :data:`~.tree.FIND_AT_ONCE` a statement (:func:`~.fast.locate_sql`):
        zarr reads ten chunks at a time, each in a directory of its own. None
        if the fast path is unavailable.
        """
        dialect, fetch = self._dialect, self._fast.fetch_raw
        ids: dict[str, int] = {"": ROOT_ID}
        parents = sorted((p for p in by_parent if p), key=lambda p: p.count("/"))
        for part in tree.chunks(parents, tree.FIND_AT_ONCE):
            names = [parent.split("/") for parent in part]
            if len(names[-1]) > JOIN_DEPTH:  # (one at a time, by a recursive walk)
                rows = []
                for slot, parts in enumerate(names):
                    found = fetch(
                        resolve_sql(dialect, len(parts), "kind"), resolve_args(dialect, parts)
                    )
                    if found is None:
                        return None
                    rows += [(slot, node_id, None, None, kind) for node_id, kind in found]
            else:
                args = [arg for parts in names for arg in resolve_args(dialect, parts)]
                found = fetch(locate_sql(dialect, tuple(map(len, names))), args)
                if found is None:
                    return None
                rows = found
            for slot, node_id, _, _, kind in rows:
                if kind == "dir":
                    ids[part[slot]] = node_id
        return [
            (f"{parent}/" if parent else "", ids[parent], names)
            for parent, names in by_parent.items()
            if parent in ids
        ]

    def _children_queries(
        self, targets: list[Target], stream: bool, lean: bool
    ) -> list[tuple[str, str, list[object]]]:
        """``(prefix, sql, args)`` fetching the named children of each of ``targets``.

        One query per directory if its results ``stream`` (PostgreSQL, all its
        names as one parameter), else one per chunk of names.
        """
        dialect = self._dialect
        queries: list[tuple[str, str, list[object]]] = []
        for prefix, parent_id, names in targets:
            if stream:
                # (a count matters only to SQLite's IN lists)
                sql = children_sql(dialect, 0, lean=lean)
                queries.append((prefix, sql, [parent_id, "/".join(names)]))
                continue
            for part in tree.chunks(names):
                args: list[object] = [parent_id, "/".join(part)] if self._pg else [parent_id, *part]
                queries.append((prefix, children_sql(dialect, len(part), lean=lean), args))
        return queries


def _fetch_many(conn: Connection, by_parent: dict[str, list[str]]) -> dict[str, Any]:
    """``path -> row`` (node columns, ``store`` and ``data``) of the named files that exist."""
    blobs = tree.blobs
    found: dict[str, Any] = {}
    for parent, names in by_parent.items():
        parent_row = tree.resolve(conn, parent)
        if parent_row is None or parent_row.kind != "dir":
            continue
        for part in tree.chunks(names):
            stmt = (
                sa.select(
                    *tree.NODE_COLUMNS, blobs.c.store, data_column(nodes.c.size), blobs.c.checksums
                )
                .select_from(nodes.outerjoin(blobs, blobs.c.hash == nodes.c.blob_hash))
                .where(nodes.c.parent_id == parent_row.id, nodes.c.name.in_(part))
            )
            for row in conn.execute(stmt):
                found[paths.join(parent, row.name)] = row
    return found
