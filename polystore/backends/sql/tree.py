"""The directory tree: resolving paths, creating directories, walking subtrees.

Everything here takes an open :class:`~sqlalchemy.Connection` and runs inside
the caller's transaction. A path of depth *d* resolves in one statement (a chain
of *d* self-joins on the ``(parent_id, name)`` unique index, or past
:data:`~polystore.backends.sql.fast.JOIN_DEPTH` names a recursive walk), not *d*
round trips.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Iterator, Sequence
from functools import lru_cache
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy import Connection

from polystore import paths
from polystore.backends._common import not_a_directory
from polystore.backends.sql import epochs
from polystore.backends.sql.engine import CatalogChanged, driver_fetch
from polystore.backends.sql.fast import JOIN_DEPTH, locate_sql, walk_names, walk_sql
from polystore.backends.sql.inline import data_column, data_sql
from polystore.backends.sql.models import ROOT_ID, blobs_table, nodes_table, tree_version_table

__all__ = [
    "NODE_COLUMNS",
    "Child",
    "DirCache",
    "Place",
    "bump_version",
    "children",
    "chunks",
    "delete_files_in",
    "ensure_dirs",
    "find_dirs",
    "hold_dirs",
    "iter_names",
    "locate",
    "lock_dir",
    "lock_subtree",
    "resolve",
    "subtree_sql",
]

nodes = nodes_table
blobs = blobs_table
tree_version = tree_version_table

#: Node columns every lookup returns (never the blob's bytes).
NODE_COLUMNS = (
    nodes.c.id,
    nodes.c.parent_id,
    nodes.c.name,
    nodes.c.kind,
    nodes.c.size,
    nodes.c.serializer,
    nodes.c.serializer_version,
    nodes.c.dtype,
    nodes.c.shape,
    nodes.c.meta,
    nodes.c.attrs,
    nodes.c.blob_hash,
    nodes.c.created_at,
    nodes.c.modified_at,
    nodes.c.kind_id,
)

#: Rows fetched per ``IN (...)`` list, well under SQLite's bound-parameter limit.
CHUNK = 500


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@lru_cache(maxsize=64)
def _resolve_statement(depth: int, with_content: bool) -> sa.Select[Any]:
    # Chain of aliases n1 -> n2 -> ... -> nd, each on the (parent_id, name) index.
    aliases = [nodes.alias(f"n{i}") for i in range(depth)]
    last = aliases[-1]
    columns: list[Any] = [last.c[col.name] for col in NODE_COLUMNS]
    joined: Any = aliases[0]
    for i in range(1, depth):
        joined = joined.join(
            aliases[i],
            sa.and_(
                aliases[i].c.parent_id == aliases[i - 1].c.id,
                aliases[i].c.name == sa.bindparam(f"p{i}"),
            ),
        )
    if with_content:
        joined = joined.outerjoin(blobs, blobs.c.hash == last.c.blob_hash)
        columns += [blobs.c.store, data_column(last.c.size), blobs.c.checksums]
    return (
        sa.select(*columns)
        .select_from(joined)
        .where(aliases[0].c.parent_id == ROOT_ID, aliases[0].c.name == sa.bindparam("p0"))
    )


@lru_cache(maxsize=8)
def _root_statement(with_content: bool) -> sa.Select[Any]:
    columns: list[Any] = list(NODE_COLUMNS)
    if with_content:
        columns += [sa.null().label(name) for name in ("store", "data", "checksums")]
    return sa.select(*columns).where(nodes.c.id == ROOT_ID)


@lru_cache(maxsize=8)
def _walk_statement(dialect: str, with_content: bool) -> sa.TextClause:
    columns: list[Any] = list(NODE_COLUMNS)
    if with_content:
        columns += [blobs.c.store, blobs.c.data, blobs.c.checksums]
    select = ", ".join(
        data_sql("n") if col is blobs.c.data else f"{'b' if col.table is blobs else 'n'}.{col.name}"
        for col in columns
    )
    sql = walk_sql(dialect, select, with_content=with_content, named=True)
    return sa.text(sql).columns(*columns)  # type: ignore[return-value]


def resolve(conn: Connection, path: str, *, with_content: bool = False) -> sa.Row[Any] | None:
    """The node row at normal ``path`` (with ``store``/``data`` if asked), or None.

    One statement at any depth: a chain of joins up to :data:`JOIN_DEPTH` names,
    a recursive walk beyond.
    """
    parts = paths.split_parts(path)
    if not parts:
        return conn.execute(_root_statement(with_content)).first()
    dialect = conn.dialect.name
    if len(parts) > JOIN_DEPTH:
        params = {"names": walk_names(dialect, parts), "depth": len(parts)}
        return conn.execute(_walk_statement(dialect, with_content), params).first()
    params = {f"p{i}": name for i, name in enumerate(parts)}
    return conn.execute(_resolve_statement(len(parts), with_content), params).first()


class Place(NamedTuple):
    """Where a node is: what a tree edit needs of a path (:func:`locate`)."""

    id: int
    parent_id: int | None
    name: str
    kind: str


def locate(conn: Connection, normal_paths: Sequence[str]) -> list[Place | None]:
    """Where each of these normal paths is (None: nothing there), in one statement.

    A tree edit asks of its source, its destination and the destination's
    parent at once: one round trip, on the driver's cursor (no statement
    compilation, no result object), where three :func:`resolve` calls cost
    three of each. Paths deeper than :data:`JOIN_DEPTH` names are resolved
    on their own.
    """
    found: list[Place | None] = [None] * len(normal_paths)
    slots: list[int] = []
    params: list[str] = []
    for slot, path in enumerate(normal_paths):
        parts = paths.split_parts(path)
        if len(parts) > JOIN_DEPTH:
            row = resolve(conn, path)
            if row is not None:
                found[slot] = Place(row.id, row.parent_id, row.name, row.kind)
            continue
        slots.append(slot)
        params += [*parts[1:], *parts[:1]]
    if slots:
        depths = tuple(len(paths.split_parts(normal_paths[s])) for s in slots)
        sql = locate_sql(conn.dialect.name, depths)
        for arm, *row in driver_fetch(conn, sql, params):
            found[slots[arm]] = Place(*row)
    return found


class Child(NamedTuple):
    """What a save needs of a row it may replace (:func:`children`)."""

    id: int
    kind: str
    blob_hash: str | None


@lru_cache(maxsize=256)
def _children_sql(dialect: str, count: int, for_update: bool) -> str:
    mark = "%s" if dialect == "postgresql" else "?"
    sql = (
        "SELECT name, id, kind, blob_hash FROM polystore_nodes "
        f"WHERE parent_id = {mark} AND name IN ({', '.join([mark] * count)})"
    )
    # Concurrent overwrites of one path then queue here and each sees the
    # other's committed row, so no blob reference is dropped twice.
    return f"{sql} FOR UPDATE" if for_update and dialect == "postgresql" else sql


def children(
    conn: Connection, parent_id: int, names: Sequence[str], *, for_update: bool = False
) -> dict[str, Child]:
    """Existing children of ``parent_id`` among ``names``, by name (locked, if
    ``for_update``, on PostgreSQL).

    On the driver's cursor: every save runs this, even of one file.
    """
    found: dict[str, Child] = {}
    dialect = conn.dialect.name
    for part in chunks(sorted(set(names))):
        sql = _children_sql(dialect, len(part), for_update)
        for name, *row in driver_fetch(conn, sql, (parent_id, *part)):
            found[name] = Child(*row)
    return found


class DirCache:
    """Directory ids already resolved or created in the current transaction."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {paths.ROOT: ROOT_ID}
        self._subdirs: dict[str, set[str]] = {}  # parent path -> names in _ids
        #: Ids of directories this transaction created: their only children are
        #: what this transaction puts there (the directories are in this cache).
        self.created: set[int] = set()
        self._stamp: tuple[dt.datetime, Any] | None = None  # (now, as the driver takes it)

    def get(self, path: str) -> int | None:
        return self._ids.get(path)

    def subdirectories(self, path: str) -> set[str]:
        """Names of the directories in this cache directly under ``path``."""
        return self._subdirs.get(path, set())

    def put(self, path: str, node_id: int) -> None:
        self._ids[path] = node_id
        parent, name = paths.split(path)
        self._subdirs.setdefault(parent, set()).add(name)

    def stamp(self, conn: Connection, now: dt.datetime) -> Any:
        """``now`` as the driver takes a timestamp column (converted once per transaction)."""
        if self._stamp is None or self._stamp[0] is not now:
            dialect = conn.dialect
            process = nodes.c.created_at.type.dialect_impl(dialect).bind_processor(dialect)
            self._stamp = (now, now if process is None else process(now))
        return self._stamp[1]


#: Most paths :func:`find_dirs` looks up in one statement.
FIND_AT_ONCE = 50
#: Most directories :func:`_create_dirs` inserts in one statement (5 parameters each).
CREATE_AT_ONCE = 100


def find_dirs(
    conn: Connection, dir_paths: Collection[str], now: dt.datetime, cache: DirCache
) -> None:
    """Put the ids of directories ``dir_paths`` in ``cache``, creating the missing ones.

    What ``cache`` does not know is looked up at once (:func:`locate`, up to
    :data:`FIND_AT_ONCE` paths a statement), then the parents of what is
    missing, and so on; the missing directories are then created a level at
    a time, those of one parent by one statement (:func:`_create_dirs`), in
    name order (so that writers creating the same ones queue on PostgreSQL
    instead of deadlocking). A save of files in ten new directories takes
    three statements, not twenty. Raises
    :class:`~polystore.errors.NotADirectoryError` where one is a file.
    """
    looked: set[str] = set()
    absent: list[str] = []
    wanted = {p for p in dir_paths if cache.get(p) is None}
    while wanted:
        looked |= wanted
        parents = set()
        for part in chunks(sorted(wanted, key=_depth), FIND_AT_ONCE):  # (like depths, like SQL)
            for path, place in zip(part, locate(conn, part), strict=True):
                if place is None:
                    absent.append(path)
                    parent = paths.split(path)[0]
                    if cache.get(parent) is None and parent not in looked:
                        parents.add(parent)
                elif place.kind != "dir":
                    raise not_a_directory(path)
                else:
                    cache.put(path, place.id)
        wanted = parents
    by_parent: dict[str, list[str]] = {}
    for path in sorted(absent, key=lambda p: (_depth(p), p)):  # (parents first)
        parent, name = paths.split(path)
        by_parent.setdefault(parent, []).append(name)
    for parent, names in by_parent.items():
        _create_dirs(conn, parent, names, now, cache)


def _depth(path: str) -> int:
    return path.count("/")


@lru_cache(maxsize=64)
def _insert_dirs_sql(dialect: str, count: int) -> str:
    """SQL creating ``count`` directories, each ``parent_id, name, created_at,
    modified_at, epoch``, unless the name is taken; returns ``id, name`` of each created."""
    mark = "%s" if dialect == "postgresql" else "?"
    row = f"({mark}, {mark}, 'dir', {mark}, {mark}, {mark})"
    return (
        "INSERT INTO polystore_nodes (parent_id, name, kind, created_at, modified_at, epoch) "
        f"VALUES {', '.join([row] * count)} "
        "ON CONFLICT (parent_id, name) DO NOTHING RETURNING id, name"
    )


def _create_dirs(
    conn: Connection, parent: str, names: Sequence[str], now: dt.datetime, cache: DirCache
) -> list[int]:
    """Create directories ``names`` in directory ``parent``; their ids, in order, also put
    in ``cache``.

    A concurrent writer may create the same directory: the name is then
    looked up again, and a directory it made is used as if made here.
    (RETURNING, not rowcount: PostgreSQL's driver reports -1 for these inserts.)
    """
    parent_id = cache.get(parent)
    if parent_id is None:
        parent_id = ensure_dirs(conn, parent, now, cache)
    stamp, epoch = cache.stamp(conn, now), epochs.current(conn)
    dialect = conn.dialect.name
    ids = []
    for part in chunks(names, CREATE_AT_ONCE):
        params: list[Any] = []
        for name in part:
            params += (parent_id, name, stamp, stamp, epoch)
        sql = _insert_dirs_sql(dialect, len(part))
        made = {name: node_id for node_id, name in driver_fetch(conn, sql, params)}
        for name in part:
            path = paths.join(parent, name)
            node_id = made.get(name)
            if node_id is not None:
                cache.created.add(node_id)
            else:
                node_id = _taken(conn, path, parent_id, name)
            cache.put(path, node_id)
            ids.append(node_id)
    return ids


def _taken(conn: Connection, path: str, parent_id: int, name: str) -> int:
    """The id of the directory another writer created at ``path`` meanwhile."""
    found = children(conn, parent_id, [name]).get(name)
    if found is None:  # the row the insert ran into was moved or deleted since
        raise CatalogChanged(f"{path!r} changed while it was being created")
    if found.kind != "dir":
        raise not_a_directory(path)
    return int(found.id)


def ensure_dirs(conn: Connection, path: str, now: dt.datetime, cache: DirCache) -> int:
    """The id of directory ``path``, creating it and its missing parents."""
    cached = cache.get(path)
    if cached is not None:
        return cached
    parent_path, name = paths.split(path)
    if cache.get(parent_path) not in cache.created:  # (else there is nothing to find)
        row = locate(conn, [path])[0]
        if row is not None:
            if row.kind != "dir":
                raise not_a_directory(path)
            cache.put(path, row.id)
            return int(row.id)
    return _create_dirs(conn, parent_path, [name], now, cache)[0]


def bump_version(conn: Connection) -> None:
    """Raise the tree version: directory ids cached by path are stale from now on.

    polystore's own directory moves and deletes call this before they lock any
    node row, so on PostgreSQL they queue here in one order. Inside a caller's
    :meth:`~polystore.SQLBackend.transaction` that already holds node rows,
    the database may have to break a deadlock: the aborted transaction raises
    :class:`~polystore.errors.ConflictError`.
    """
    # Plain SQL: built and compiled by SQLAlchemy, this statement cost a
    # directory move about a tenth of its time.
    conn.exec_driver_sql("UPDATE polystore_tree_version SET version = version + 1 WHERE id = 1")


def _lock_dirs(conn: Connection, ids: Collection[int], *, key_share: bool = False) -> list[int]:
    """Lock directory rows ``ids`` in id order; the ids still there.

    PostgreSQL: ``FOR UPDATE`` against new children -- inserting a row, or
    moving one, into a directory checks the foreign key with a ``FOR KEY
    SHARE`` lock on the directory's row, which waits for ``FOR UPDATE``: while
    the lock is held no file or directory enters the directory. With
    ``key_share``, that ``FOR KEY SHARE`` itself: the directory cannot be
    deleted meanwhile. SQLite: the write transaction already excludes every
    other writer.
    """
    if conn.dialect.name != "postgresql":
        return list(ids)
    locked: list[int] = []
    for part in chunks(sorted(ids)):
        stmt = sa.select(nodes.c.id).where(nodes.c.id.in_(part)).order_by(nodes.c.id)
        locked += conn.execute(stmt.with_for_update(key_share=key_share)).scalars()
    return locked


def hold_dirs(conn: Connection, ids: Collection[int]) -> None:
    """Keep directories ``ids`` from being deleted until this transaction ends.

    ``FOR KEY SHARE`` (:func:`_lock_dirs`), the lock that inserting a child
    takes anyway to check its foreign key -- taken here, in id order, before
    the writer locks any file row, so a recursive delete (which locks the
    directory ``FOR UPDATE`` and then deletes its files) and a writer wait
    for each other in one order instead of deadlocking. Raises
    :class:`~.engine.CatalogChanged` if one of them is gone.
    """
    if len(_lock_dirs(conn, ids, key_share=True)) != len(ids):
        raise CatalogChanged("a directory was deleted meanwhile")


def lock_dir(conn: Connection, row: sa.Row[Any]) -> None:
    """Lock directory ``row`` (a :func:`resolve` row) against new children.

    Raises :class:`~.engine.CatalogChanged` if it is no longer where it was
    resolved (on PostgreSQL a row moved meanwhile fails the lock's re-check).
    """
    still = sa.select(nodes.c.id).where(
        nodes.c.id == row.id, nodes.c.parent_id == row.parent_id, nodes.c.name == row.name
    )
    if conn.dialect.name == "postgresql":
        still = still.with_for_update()
    if conn.execute(still).first() is None:
        raise CatalogChanged(f"directory {row.name!r} was moved or deleted meanwhile")


def lock_subtree(conn: Connection, root: sa.Row[Any]) -> list[int]:
    """Pin the directory ``root`` (a :func:`resolve` row) and every directory under it.

    Level by level: a level's rows are locked (:func:`_lock_dirs`) before
    their children are read, and under READ COMMITTED that read sees every
    transaction committed before it -- among them every one that put a child
    there, since the lock waited for it. So the directories returned are the
    whole subtree, and nothing enters it until this transaction ends: files
    in it can still be overwritten, moved out or deleted, not added.

    Raises :class:`~.engine.CatalogChanged` if ``root`` is no longer where it
    was resolved. Returns the directory ids, ``root`` first, parents before
    children.
    """
    lock_dir(conn, root)
    found = [int(root.id)]
    level = found
    while level:
        below: list[int] = []
        for part in chunks(level):
            below += conn.execute(
                sa.select(nodes.c.id).where(nodes.c.parent_id.in_(part), nodes.c.kind == "dir")
            ).scalars()
        level = _lock_dirs(conn, below)
        found += level
    return found


def delete_files_in(conn: Connection, dir_ids: Sequence[int]) -> list[str]:
    """Delete the files directly in these directories; the blob hash of each deleted row.

    The hashes come back from the rows the statement deleted (``RETURNING``),
    not from an earlier read: a file overwritten meanwhile releases the
    content it held when deleted, one moved out meanwhile is not deleted and
    releases nothing.
    """
    released: list[str] = []
    for part in chunks(sorted(dir_ids)):
        released += conn.execute(
            nodes.delete()
            .where(nodes.c.parent_id.in_(part), nodes.c.kind == "file")
            .returning(nodes.c.blob_hash)
        ).scalars()
    return released


def subtree_sql(dialect: str, *, where: str = "", select: str = "sub.path, sub.kind") -> str:
    """A recursive query over the subtree under ``:root`` with relative paths.

    ``sub`` has columns ``id``, ``path`` (relative to the subtree's root), ``kind``
    and ``depth``; join ``polystore_nodes AS n ON n.id = sub.id`` for the rest.
    """
    if dialect == "postgresql":
        # The recursive term must keep the "C" collation of the name column.
        base, step = (
            'CAST(name AS TEXT) COLLATE "C"',
            "CAST(sub.path || '/' || n.name AS TEXT) COLLATE \"C\"",
        )
    else:
        base, step = "name", "sub.path || '/' || n.name"
    return f"""
WITH RECURSIVE sub (id, path, kind, depth) AS (
    SELECT id, {base}, kind, 1 FROM polystore_nodes WHERE parent_id = :root
    UNION ALL
    SELECT n.id, {step}, n.kind, sub.depth + 1
    FROM polystore_nodes AS n JOIN sub ON n.parent_id = sub.id
    WHERE sub.kind = 'dir'
)
SELECT {select}
FROM sub
JOIN polystore_nodes AS n ON n.id = sub.id
LEFT JOIN polystore_blobs AS b ON b.hash = n.blob_hash
{where}
"""


def iter_names(conn: Connection, parent_id: int, *, after: str | None, limit: int) -> list[str]:
    """One page of child names after ``after``, by code point (a keyset cursor)."""
    stmt = sa.select(nodes.c.name).where(nodes.c.parent_id == parent_id)
    if after is not None:
        stmt = stmt.where(nodes.c.name > after)
    return list(conn.execute(stmt.order_by(nodes.c.name).limit(limit)).scalars())


def as_utc(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands timestamps back naive; they were written in UTC."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)
