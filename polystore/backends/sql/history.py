"""The catalog as it was at an epoch: node rows read back from the live table and the history.

A node row is visible at snapshot epoch ``e`` if it is live with
``epoch <= e``, or an old version in ``polystore_node_history`` with
``epoch <= e < valid_to`` (revision 0006 explains how the triggers keep
them). The union of the two is the tree as it was: an adjacency list like the
live one, in which every ``(parent_id, name)`` is unique. Every read here asks
one of the two tables by its ``(parent_id, name)`` index, twice (once per
table), so a read at a snapshot costs about what the same read costs live.

``epoch=None`` everywhere means the live catalog, so :func:`walk` serves
``diff`` and ``restore`` on both sides.

Old versions no kept snapshot can see any more are removed by :func:`prune`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from polystore import paths
from polystore.backends.sql.inline import data_column, data_sql
from polystore.backends.sql.models import ROOT_ID, blobs_table, history_table, nodes_table
from polystore.backends.sql.models import snapshots_table as snapshots
from polystore.backends.sql.tree import NODE_COLUMNS, chunks

__all__ = [
    "COLUMNS",
    "child_sql",
    "children",
    "exists_sql",
    "lean_children_sql",
    "named_children",
    "names_sql",
    "prune",
    "resolve",
    "walk",
]

nodes = nodes_table
history = history_table
blobs = blobs_table

#: The node columns every read returns, as in :data:`.tree.NODE_COLUMNS`.
COLUMNS = tuple(c.name for c in NODE_COLUMNS)

Where = Callable[[sa.Table], Sequence[Any]]


def _column(table: sa.Table, name: str) -> Any:
    if name == "attrs_text":  # (to compare, not parse: diff)
        return sa.cast(table.c.attrs, sa.Text).label(name)
    return table.c[name]


def _part(table: sa.Table, epoch: int, where: Sequence[Any], columns: Sequence[str]) -> Any:
    visible = [table.c.epoch <= epoch]
    if table is history:
        visible.append(table.c.valid_to > epoch)
    return sa.select(*[_column(table, c) for c in columns]).where(*visible, *where)


def _visible(epoch: int | None, where: Where, columns: Sequence[str] = COLUMNS) -> Any:
    """The node rows visible at ``epoch`` (None: live) that pass ``where(table)``."""
    if epoch is None:
        return sa.select(*[_column(nodes, c) for c in columns]).where(*where(nodes))
    return sa.union_all(
        _part(nodes, epoch, where(nodes), columns), _part(history, epoch, where(history), columns)
    )


def _rows(
    conn: Connection,
    epoch: int | None,
    where: Where,
    *,
    with_content: bool = False,
    columns: Sequence[str] = COLUMNS,
) -> list[Any]:
    stmt = _visible(epoch, where, columns)
    if with_content:
        sub = stmt.subquery()
        stmt = sa.select(
            sub, blobs.c.store, data_column(sub.c.size), blobs.c.checksums
        ).select_from(sub.outerjoin(blobs, blobs.c.hash == sub.c.blob_hash))
    return list(conn.execute(stmt))


def named_children(
    conn: Connection,
    epoch: int | None,
    parent_id: int,
    names: Iterable[str],
    *,
    with_content: bool = False,
) -> dict[str, Any]:
    """The children of ``parent_id`` among ``names`` at ``epoch``, by name."""
    found: dict[str, Any] = {}
    for part in chunks(sorted(set(names))):

        def where(t: sa.Table, part: Sequence[str] = part) -> Sequence[Any]:
            return [t.c.parent_id == parent_id, t.c.name.in_(list(part))]

        for row in _rows(conn, epoch, where, with_content=with_content):
            found[row.name] = row
    return found


def resolve(
    conn: Connection, epoch: int | None, path: str, *, with_content: bool = False
) -> Any | None:
    """The node row at normal ``path`` as at ``epoch`` (with ``store``/``data`` if asked), or None.

    One indexed query per name of the path.
    """
    parts = paths.split_parts(path)
    if not parts:
        rows = _rows(conn, epoch, lambda t: [t.c.id == ROOT_ID], with_content=with_content)
        return rows[0] if rows else None
    parent_id = ROOT_ID
    row = None
    for i, name in enumerate(parts):
        last = i == len(parts) - 1
        row = named_children(
            conn, epoch, parent_id, [name], with_content=with_content and last
        ).get(name)
        if row is None or (not last and row.kind != "dir"):
            return None
        parent_id = int(row.id)
    return row


def children(
    conn: Connection,
    epoch: int | None,
    parent_ids: Sequence[int],
    *,
    files_only: bool = False,
    columns: Sequence[str] = COLUMNS,
) -> list[Any]:
    """Every child of the directories ``parent_ids`` at ``epoch`` (``columns`` of node rows)."""
    rows: list[Any] = []
    for part in chunks(sorted(parent_ids)):

        def where(t: sa.Table, part: Sequence[int] = part) -> Sequence[Any]:
            clauses: list[Any] = [t.c.parent_id.in_(list(part))]
            if files_only:
                clauses.append(t.c.kind == "file")
            return clauses

        rows += _rows(conn, epoch, where, columns=columns)
    return rows


def walk(
    conn: Connection, epoch: int | None, root: Any, columns: Sequence[str] = COLUMNS
) -> list[tuple[str, Any]]:
    """``(path relative to root, row)`` of every node under directory row ``root`` at ``epoch``.

    Level by level, one indexed query per level (per 500 directories), parents
    before their children.
    """
    found: list[tuple[str, Any]] = []
    level = {int(root.id): ""}
    while level:
        below: dict[int, str] = {}
        for row in children(conn, epoch, list(level), columns=columns):
            rel = paths.join(level[row.parent_id], row.name)
            found.append((rel, row))
            if row.kind == "dir":
                below[int(row.id)] = rel
        level = below
    return found


def _visible_sql(columns: str, where: str, p: str) -> str:
    """SQL text of :func:`_visible`: ``columns`` of the rows passing ``where``
    that the epoch parameter ``p`` sees, live and kept.

    Parameters: ``where``'s, then the epoch, for the live table; ``where``'s,
    then the epoch twice, for the history.
    """
    return (
        f"SELECT {columns} FROM polystore_nodes WHERE {where} AND epoch <= {p} "
        "UNION ALL "
        f"SELECT {columns} FROM polystore_node_history WHERE {where} "
        f"AND epoch <= {p} AND valid_to > {p}"
    )


def lean_children_sql(dialect: str, count: int) -> str:
    """SQL for named children of one directory at an epoch, as a batch load reads them.

    Parameters, for each of the two tables: the parent id, ``count`` names
    (one text joined by ``/`` on PostgreSQL), the epoch (and for the history
    the epoch again). Rows are those of :data:`.fast.LEAN_COLUMNS`: the kind id
    where the content is inline (else ``NULL``: read again in full), the size,
    the inline bytes and the name.
    """
    if dialect == "postgresql":
        p, names = "%s", "= ANY(string_to_array(%s, '/'))"
    else:
        p, names = "?", f"IN ({', '.join(['?'] * count)})"
    columns = "kind, kind_id, size, blob_hash, name"
    return (
        "SELECT CASE WHEN b.store = 'inline' AND n.kind = 'file' THEN n.kind_id END, "
        f"n.size, {data_sql('n')}, n.name FROM ("
        + _visible_sql(columns, f"parent_id = {p} AND name {names}", p)
        + ") AS n LEFT JOIN polystore_blobs AS b ON b.hash = n.blob_hash"
    )


def child_sql(dialect: str) -> str:
    """SQL for ``id, kind`` of child ``[parent, name, epoch, parent, name, epoch, epoch]``."""
    p = "%s" if dialect == "postgresql" else "?"
    return _visible_sql("id, kind", f"parent_id = {p} AND name = {p}", p)


def names_sql(dialect: str) -> str:
    """SQL for the names in directory ``[parent, epoch, parent, epoch, epoch]``, in order.

    For the read fast path (:mod:`.fast`): each arm reads the
    ``(parent_id, name)`` index in order, and the database merges the two.
    """
    p = "%s" if dialect == "postgresql" else "?"
    return _visible_sql("name", f"parent_id = {p}", p) + " ORDER BY name"


def exists_sql(dialect: str) -> str:
    """SQL that returns a row if snapshot ``[id]`` is still kept."""
    p = "%s" if dialect == "postgresql" else "?"
    return f"SELECT 1 FROM polystore_snapshots WHERE id = {p}"


def prune(conn: Connection, epoch: int | None = None) -> int:
    """Delete the old versions no kept snapshot can see; how many.

    ``epoch``: only those a snapshot of that epoch could see (what deleting
    that snapshot may have freed), else all. Their content is then
    unreferenced, for ``gc()``.
    """
    seen = sa.exists().where(
        snapshots.c.epoch >= history.c.epoch, snapshots.c.epoch < history.c.valid_to
    )
    stmt = history.delete().where(~seen)
    if epoch is not None:
        stmt = stmt.where(history.c.epoch <= epoch, history.c.valid_to > epoch)
    return int(conn.execute(stmt).rowcount or 0)
