"""Inspecting the live catalog: kinds, listings, ``stat`` and ``query``, read only.

``list_dir`` and the kind lookups behind ``exists``/``is_file``/``is_dir``
take the read fast path (:mod:`.fast`) outside a transaction; everything
else, and everything inside one, reads through :meth:`~.catalog.Catalog.read`.
:func:`stat_result` is also how a snapshot's view answers ``stat``.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from polystore import paths
from polystore.backends._common import not_a_directory, not_found
from polystore.backends.base import StatResult
from polystore.backends.sql import tree
from polystore.backends.sql.catalog import Catalog
from polystore.backends.sql.decoders import json_column, reading
from polystore.backends.sql.fast import (
    FastReader,
    cached_kind_sql,
    names_sql,
    resolve_args,
    resolve_sql,
)
from polystore.backends.sql.load import Loader
from polystore.backends.sql.models import ROOT_ID
from polystore.backends.sql.models import nodes_table as nodes
from polystore.backends.sql.query import run_query

__all__ = ["Listing", "stat_result"]


def stat_result(path: str, row: Any, store: str | None, *, text: bool = False) -> StatResult:
    """``path``'s StatResult from its ``row`` (JSON columns as ``text``, or parsed)."""
    json_column(path, row, "meta", text=text)  # (a damaged row is damaged for stat too)
    shape = json_column(path, row, "shape", text=text)
    attrs = json_column(path, row, "attrs", text=text)
    return StatResult(
        path=path,
        kind=row.kind,
        size=row.size,
        created_at=tree.as_utc(row.created_at),
        modified_at=tree.as_utc(row.modified_at),
        serializer=row.serializer,
        dtype=row.dtype,
        shape=tuple(shape) if shape is not None else None,
        attrs=dict(attrs or {}),
        hash=row.blob_hash,
        store=store,
    )


def dir_id(conn: Connection, path: str) -> int:
    """The id of directory ``path``; raises if it is missing or a file."""
    row = tree.resolve(conn, path)
    if row is None:
        raise not_found(path)
    if row.kind != "dir":
        raise not_a_directory(path)
    return int(row.id)


class Listing:
    """The read-only inspections of :class:`~polystore.SQLBackend`, on normal paths."""

    def __init__(self, catalog: Catalog, fast: FastReader, dirs: Loader) -> None:
        self.catalog = catalog
        self._fast = fast
        self._dialect = catalog.dialect
        #: Whose cache of directory ids (by tree version) lookups use and fill.
        self._dirs = dirs

    def lookup(self, path: str) -> tuple[int, str] | None:
        """``(id, kind)`` of the node at normal ``path``, or None."""
        if not self.catalog.in_transaction:
            parent, name = paths.split(path)
            known = self._dirs.known_dir(parent) if parent else None
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
                    self._dirs.remember_dir(parent, row[2], row[3])
                return (row[0], row[1])
        row = self.catalog.read(lambda conn: tree.resolve(conn, path))
        return None if row is None else (int(row.id), str(row.kind))

    def list_dir(self, norm: str) -> list[str]:
        """The names in directory ``norm``, sorted by code point."""
        if not self.catalog.in_transaction:
            with self._fast.snapshot() as fast:
                if fast:
                    found = self.lookup(norm)
                    if found is None:
                        raise not_found(norm)
                    if found[1] != "dir":
                        raise not_a_directory(norm)
                    rows = self._fast.fetch_raw(names_sql(self._dialect), [found[0]])
                    if rows is not None:
                        return [name for (name,) in rows]

        def work(conn: Connection) -> list[str]:
            stmt = sa.select(nodes.c.name).where(nodes.c.parent_id == dir_id(conn, norm))
            return list(conn.execute(stmt.order_by(nodes.c.name)).scalars())

        return self.catalog.read(work)

    def iter_dir(self, norm: str, page_size: int) -> Iterator[str]:
        """The names in directory ``norm``, a keyset page of ``page_size`` at a time."""
        parent_id = self.catalog.read(partial(dir_id, path=norm))
        after: str | None = None
        while True:
            page = self.catalog.read(
                partial(tree.iter_names, parent_id=parent_id, after=after, limit=page_size)
            )
            yield from page
            if len(page) < page_size:
                return
            after = page[-1]

    def list_files(
        self, norm: str, pattern: str | None, extensions: Any, recursive: bool
    ) -> list[str]:
        """The files in (``recursive``: under) directory ``norm`` that match, sorted."""
        exts = paths.normalize_extensions(extensions)

        def work(conn: Connection) -> list[str]:
            root = dir_id(conn, norm)
            if recursive:
                sql = tree.subtree_sql(
                    conn.dialect.name, select="sub.path", where="WHERE sub.kind = 'file'"
                )
                return list(conn.execute(sa.text(sql), {"root": root}).scalars())
            stmt = sa.select(nodes.c.name).where(nodes.c.parent_id == root, nodes.c.kind == "file")
            return list(conn.execute(stmt).scalars())

        # Resolving the directory and listing it must see one state of the catalog.
        found = self.catalog.read(work, snapshot=True)
        return sorted(
            paths.join(norm, rel)
            for rel in found
            if paths.match_name(rel.rpartition("/")[2], pattern, exts)
        )

    def stat(self, norm: str) -> StatResult:
        """What :meth:`~polystore.SQLBackend.stat` says of ``norm``."""
        with reading(norm):
            row = self.catalog.read(lambda conn: tree.resolve(conn, norm, with_content=False))
        if row is None:
            raise not_found(norm)
        store = None
        if row.blob_hash is not None:
            store = self.catalog.read(
                lambda conn: conn.execute(
                    sa.select(tree.blobs.c.store).where(tree.blobs.c.hash == row.blob_hash)
                ).scalar()
            )
        return stat_result(norm, row, store)

    def scan_dir(self, norm: str) -> list[StatResult]:
        """The stat of each entry of directory ``norm``, in name order, in one query."""
        blobs = tree.blobs

        def work(conn: Connection) -> list[Any]:
            stmt = (
                sa.select(*tree.NODE_COLUMNS, blobs.c.store)
                .select_from(nodes.outerjoin(blobs, blobs.c.hash == nodes.c.blob_hash))
                .where(nodes.c.parent_id == dir_id(conn, norm))
                .order_by(nodes.c.name)
            )
            return list(conn.execute(stmt))

        # Resolving the directory and listing it must see one state of the catalog.
        rows = self.catalog.read(work, snapshot=True)
        return [stat_result(paths.join(norm, row.name), row, row.store) for row in rows]

    def query(self, norm: str, **filters: Any) -> list[StatResult]:
        """The nodes under ``norm`` that pass ``filters`` (:func:`~.query.run_query`), by path."""
        rows = self.catalog.read(lambda conn: run_query(conn, dir_id(conn, norm), **filters))
        return [stat_result(paths.join(norm, row.path), row, row.store, text=True) for row in rows]

    def count_nodes(self) -> int:
        """Files and directories in the catalog, the root excluded."""
        stmt = sa.select(sa.func.count()).select_from(nodes).where(nodes.c.id != ROOT_ID)
        return int(self.catalog.read(lambda conn: conn.execute(stmt).scalar_one()))
