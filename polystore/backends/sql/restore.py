"""``SQLBackend.restore``: one write transaction that makes a path what it was at a snapshot.

Both sides are walked (:func:`.history.walk`: the tree at the snapshot's epoch,
and the live tree) and compared by relative path; then, under the reference
protocol of docs/reliability.rst (the epoch first, then the tree version, the
live subtree locked, blob rows last, in hash order):

* what is live but was not there then (or was of another kind) is deleted,
  files first (each releases its content), then directories;
* what is in both gets the columns it had (content, kind, attrs, timestamps);
* what was there then and is not now is inserted, level by level, parents
  first, pointing at the content the snapshot kept (a reference each).

No content is copied. The snapshot is locked against deletion meanwhile, so
the old versions read stay until they are written back.

On PostgreSQL the live rows are read again under a lock before anything is
written: the directories of the subtree (against new children), then its
files, in id order. A file a concurrent writer moved out meanwhile is then no
longer in the walk, and one it overwrote is read with its new content, so a
restore never deletes or rewrites a file elsewhere in the tree, and releases
exactly the content it replaces. SQLite's writers run one at a time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from polystore import paths
from polystore.backends.sql import edit, epochs, history, tree
from polystore.backends.sql.catalog import Catalog, utcnow
from polystore.backends.sql.content import add_references, lock_blobs, release_blobs
from polystore.backends.sql.engine import CatalogChanged
from polystore.backends.sql.models import nodes_table as nodes
from polystore.backends.sql.snapshots import SnapshotRef, find

__all__ = ["restore"]


#: The columns restore writes back (everything but where the node is).
_CONTENT = tuple(c for c in history.COLUMNS if c not in ("id", "parent_id", "name"))


def restore(catalog: Catalog, ref: SnapshotRef, path: str = "") -> None:
    """Make ``path`` what it was at the snapshot, in one write transaction; see :meth:`SQLBackend.restore`."""
    norm = paths.normalize(path)
    catalog.write(lambda conn: _restore(conn, ref, norm))


def _restore(conn: Connection, ref: SnapshotRef, norm: str) -> None:
    epoch = epochs.current(conn)  # (before any lock: see epochs.py)
    snap = find(conn, ref, lock=True)
    # Like a directory move or delete: queue, then look the path up as it is now.
    tree.bump_version(conn)
    old = history.resolve(conn, snap.epoch, norm)
    live = tree.resolve(conn, norm)
    if old is None:
        if live is not None:
            edit.delete(conn, norm, recursive=True)
        return
    if live is not None and live.kind != old.kind:
        edit.delete(conn, norm, recursive=True)
        live = None
    refs: Counter[str] = Counter()
    released: Counter[str] = Counter()
    if live is None:
        parent, name = paths.split(norm)
        parent_id = tree.ensure_dirs(conn, parent, utcnow(), tree.DirCache())
        new_id = _insert(conn, [(old, parent_id, name)], epoch, refs)[0]
        if old.kind == "dir":
            _insert_tree(conn, snap.epoch, old, new_id, {}, epoch, refs)
    elif old.kind == "file":
        _update(conn, _relock(conn, live), old, epoch, refs, released)
    else:
        _reconcile(conn, snap.epoch, old, live, epoch, refs, released)
    if conn.dialect.name == "postgresql":
        lock_blobs(conn, refs.keys() | released.keys())
    add_references(conn, refs)
    release_blobs(conn, released)


def _values(row: Any, parent_id: int, name: str, epoch: int) -> dict[str, Any]:
    values = {c: getattr(row, c) for c in _CONTENT}
    return values | {"parent_id": parent_id, "name": name, "epoch": epoch}


def _insert(
    conn: Connection, rows: Sequence[tuple[Any, int, str]], epoch: int, refs: Counter[str]
) -> list[int]:
    """Insert old ``(row, parent id, name)`` as new live rows; their new ids, in order."""
    if not rows:
        return []
    ids = (
        conn.execute(
            nodes.insert().returning(nodes.c.id, sort_by_parameter_order=True),
            [_values(row, parent_id, name, epoch) for row, parent_id, name in rows],
        )
        .scalars()
        .all()
    )
    refs.update(row.blob_hash for row, _, _ in rows if row.blob_hash is not None)
    return [int(i) for i in ids]


def _insert_tree(
    conn: Connection,
    at: int,
    old_root: Any,
    new_root: int,
    skip: dict[str, Any],
    epoch: int,
    refs: Counter[str],
) -> None:
    """Insert what was under ``old_root`` at epoch ``at`` under live directory ``new_root``.

    ``skip``: relative paths already live (kept, not inserted); a directory
    among them maps to its live id. Level by level, parents first.
    """
    new_ids = {int(old_root.id): new_root}
    level = [int(old_root.id)]
    rel_of = {int(old_root.id): ""}
    while level:
        kids = history.children(conn, at, level)
        todo = []
        below = []
        for kid in kids:
            rel = paths.join(rel_of[kid.parent_id], kid.name)
            rel_of[int(kid.id)] = rel
            if kid.kind == "dir":
                below.append(int(kid.id))
            kept = skip.get(rel)
            if kept is not None:
                new_ids[int(kid.id)] = int(kept.id)
                continue
            todo.append((kid, new_ids[kid.parent_id], kid.name))
        for (kid, _, _), new_id in zip(todo, _insert(conn, todo, epoch, refs), strict=True):
            new_ids[int(kid.id)] = new_id
        level = below


def _relock(conn: Connection, live: Any) -> Any:
    """Live row ``live``, locked where it was resolved and read again (PostgreSQL).

    Under READ COMMITTED a concurrent overwrite may have committed between
    the resolve and this lock: the row read now has its content. Raises
    :class:`~.engine.CatalogChanged` if it was moved or deleted meanwhile.
    """
    if conn.dialect.name != "postgresql":
        return live
    row = conn.execute(
        sa.select(*(nodes.c[c] for c in history.COLUMNS))
        .where(
            nodes.c.id == live.id,
            nodes.c.parent_id == live.parent_id,
            nodes.c.name == live.name,
        )
        .with_for_update()
    ).first()
    if row is None:
        raise CatalogChanged(f"{live.name!r} was moved or deleted meanwhile")
    return row


def _lock_files(conn: Connection, dir_ids: list[int]) -> None:
    """Lock the files directly in directories ``dir_ids``, in id order (PostgreSQL).

    With the directories locked too (:func:`.tree.lock_subtree`), the live
    walk that follows sees the subtree as it stays until this transaction
    ends: nothing enters it, and nothing in it is moved, overwritten or
    deleted meanwhile.
    """
    if conn.dialect.name != "postgresql":
        return
    for part in tree.chunks(dir_ids):
        conn.execute(
            sa.select(nodes.c.id)
            .where(nodes.c.parent_id.in_(part), nodes.c.kind == "file")
            .order_by(nodes.c.id)
            .with_for_update()
        ).all()


def _differs(live: Any, old: Any) -> bool:
    return any(getattr(live, c) != getattr(old, c) for c in _CONTENT)


def _update(
    conn: Connection, live: Any, old: Any, epoch: int, refs: Counter[str], released: Counter[str]
) -> None:
    """Give live node ``live`` the columns ``old`` had (it keeps its id and place)."""
    if not _differs(live, old):
        return
    values = {c: getattr(old, c) for c in _CONTENT} | {"epoch": epoch}
    conn.execute(nodes.update().where(nodes.c.id == live.id).values(values))
    if old.blob_hash is not None:
        refs[old.blob_hash] += 1
    if live.blob_hash is not None:
        released[live.blob_hash] += 1


def _reconcile(
    conn: Connection,
    at: int,
    old_root: Any,
    live_root: Any,
    epoch: int,
    refs: Counter[str],
    released: Counter[str],
) -> None:
    """Make live directory ``live_root`` hold what ``old_root`` held at epoch ``at``."""
    _lock_files(conn, tree.lock_subtree(conn, live_root))
    _update(conn, _relock(conn, live_root), old_root, epoch, refs, released)
    before = dict(history.walk(conn, at, old_root))
    now = dict(history.walk(conn, None, live_root))
    gone = {
        rel: row for rel, row in now.items() if rel not in before or before[rel].kind != row.kind
    }
    # Files first (each releases its content), then directories: emptied,
    # they go with ON DELETE CASCADE from the topmost one down.
    doomed = sorted(int(row.id) for row in gone.values() if row.kind == "file")
    for part in tree.chunks(doomed):
        released.update(
            conn.execute(
                nodes.delete().where(nodes.c.id.in_(part)).returning(nodes.c.blob_hash)
            ).scalars()
        )
    dirs = sorted(int(row.id) for row in gone.values() if row.kind == "dir")
    for part in tree.chunks(dirs):
        conn.execute(nodes.delete().where(nodes.c.id.in_(part)))
    kept = {rel: row for rel, row in now.items() if rel not in gone}
    for rel, row in kept.items():
        _update(conn, row, before[rel], epoch, refs, released)
    _insert_tree(conn, at, old_root, int(live_root.id), kept, epoch, refs)
