"""Changing the tree: deleting, moving and copying files and directory trees.

Each function runs inside the caller's write transaction (see
:meth:`~polystore.backends.sql.catalog.Catalog.write`) and follows the
reference protocol of docs/reliability.rst: reference counts change by the
rows a statement actually changed (``RETURNING``, ``rowcount``), a tree
operation locks the directories it depends on before it reads them, and a
row found changed since it was resolved raises
:class:`~polystore.backends.sql.engine.CatalogChanged`, which runs the whole
transaction again.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from functools import lru_cache
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from polystore import paths
from polystore.backends._common import (
    already_exists,
    directory_not_empty,
    not_a_directory,
    not_found,
)
from polystore.backends.sql import epochs, tree
from polystore.backends.sql.catalog import utcnow
from polystore.backends.sql.content import add_references, release_blobs
from polystore.backends.sql.engine import CatalogChanged
from polystore.backends.sql.models import nodes_table as nodes
from polystore.errors import InvalidPathError

__all__ = ["copy", "delete", "move"]


def delete(conn: Connection, norm: str, recursive: bool) -> None:
    """Delete file or directory ``norm`` (normal); see :meth:`SQLBackend.delete`."""
    epochs.current(conn)  # (before any lock: see epochs.py)
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
    if recursive:
        dirs = tree.lock_subtree(conn, row)
    else:
        tree.lock_dir(conn, row)
        if conn.execute(sa.select(nodes.c.id).where(nodes.c.parent_id == row.id).limit(1)).first():
            raise directory_not_empty(norm)
        dirs = []
    released = tree.delete_files_in(conn, dirs)
    # The subtree holds directories only now (none can be added while
    # they are locked): ON DELETE CASCADE removes them with their root.
    conn.execute(nodes.delete().where(nodes.c.id == row.id))
    release_blobs(conn, Counter(released))


def _check_target(row: Any, src: str, dst: str, target: Any) -> None:
    """Refuse a move or copy of ``row`` (at ``src``) to ``dst``, where ``target`` is."""
    if row is None:
        raise not_found(src)
    if src == dst:
        raise already_exists(dst)
    if row.kind == "dir" and dst.startswith(src + "/"):
        raise InvalidPathError(f"cannot put directory {src!r} inside itself: {dst!r}")
    if target is not None:
        raise already_exists(dst)


def _prepare_target(conn: Connection, src: str, dst: str, now: dt.datetime) -> tuple[Any, int, str]:
    row = tree.resolve(conn, src)
    _check_target(row, src, dst, tree.resolve(conn, dst))
    parent, name = paths.split(dst)
    return row, tree.ensure_dirs(conn, parent, now, tree.DirCache()), name


def move(conn: Connection, src: str, dst: str) -> None:
    """Move ``src`` to ``dst`` (normal paths); a directory move rewrites one row.

    The per-call cost is the point here (a directory move is O(1) rows):
    source, destination and the destination's parent are located in one
    statement, and the statements are plain SQL with driver placeholders,
    compiled by nobody.
    """
    epoch = epochs.current(conn)  # (before any lock: see epochs.py)
    parent, name = paths.split(dst)
    row, target, home = tree.locate(conn, (src, dst, parent))
    if row is None:
        raise not_found(src)
    if row.kind == "dir":
        # Directory moves and deletes queue here, before they lock any node
        # row. On PostgreSQL every path is then located again, as it is now
        # (a move that checked a stale tree could put a directory inside
        # itself); a SQLite writer holds the database's only write lock
        # since its BEGIN IMMEDIATE, so what it located cannot have changed.
        tree.bump_version(conn)
        if conn.dialect.name == "postgresql":
            row, target, home = tree.locate(conn, (src, dst, parent))
            if row is None:
                raise not_found(src)
    _check_target(row, src, dst, target)
    now = utcnow()
    if home is None:
        parent_id = tree.ensure_dirs(conn, parent, now, tree.DirCache())
    elif home.kind != "dir":
        raise not_a_directory(parent)
    else:
        parent_id = home.id
    # The row must still be where it was located: under READ COMMITTED a
    # concurrent move or delete may have taken it since.
    moved = conn.exec_driver_sql(
        _move_sql(conn.dialect.name),
        (parent_id, name, _timestamp(conn, now), epoch, row.id, row.parent_id, row.name),
    ).rowcount
    if not moved:
        raise CatalogChanged(f"{src!r} was moved or deleted meanwhile")


@lru_cache(maxsize=2)
def _move_sql(dialect: str) -> str:
    mark = "%s" if dialect == "postgresql" else "?"
    return (
        f"UPDATE polystore_nodes SET parent_id = {mark}, name = {mark}, modified_at = {mark}, "
        f"epoch = {mark} WHERE id = {mark} AND parent_id = {mark} AND name = {mark}"
    )


def _timestamp(conn: Connection, now: dt.datetime) -> Any:
    """``now`` as the driver takes it for a timestamp column (SQLite: text)."""
    process = _timestamp_processor(conn.dialect)
    return now if process is None else process(now)


@lru_cache(maxsize=4)
def _timestamp_processor(dialect: sa.Dialect) -> Any:
    return nodes.c.modified_at.type.dialect_impl(dialect).bind_processor(dialect)


def copy(conn: Connection, src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` (normal paths): catalog rows only, the blobs are shared."""
    epoch = epochs.current(conn)  # (before any lock: see epochs.py)
    now = utcnow()
    row, parent_id, name = _prepare_target(conn, src, dst, now)
    copied = [c.name for c in tree.NODE_COLUMNS if c.name not in ("id", "parent_id", "name")]

    def clone(source: Any, new_parent: int, new_name: str) -> dict[str, Any]:
        values = {col: getattr(source, col) for col in copied}
        return values | {
            "parent_id": new_parent,
            "name": new_name,
            "created_at": now,
            "modified_at": now,
            "epoch": epoch,
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
