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

On PostgreSQL, READ COMMITTED lets a concurrent writer move a file out of
the subtree, overwrite it or delete it between the walk and the writes (the
subtree's directories are locked first, so nothing enters it). So the files
a restore deletes or rewrites are locked and read again first, in id order:
one moved out or deleted meanwhile is left where it went (and the snapshot's
version comes back in its place, if there is one), and one overwritten is
rewritten from what it holds now. A restore never deletes or rewrites a file
elsewhere in the tree, and releases exactly the content it replaces.
SQLite's writers run one at a time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
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
    """Live file or directory row ``live``, locked where it was read and read
    again (PostgreSQL; see :func:`_relock_all`). Raises
    :class:`~.engine.CatalogChanged` if it was moved or deleted meanwhile."""
    (now,) = _relock_all(conn, [live], inside=())
    if now is None:
        raise CatalogChanged(f"{live.name!r} was moved or deleted meanwhile")
    return now


def _relock_all(conn: Connection, live: Sequence[Any], inside: Collection[int]) -> list[Any]:
    """Live rows ``live``, locked in id order and read again, in their order.

    Under READ COMMITTED a concurrent writer may have changed them since they
    were read. A row overwritten meanwhile is returned as it is now; one
    moved out of directories ``inside``, or deleted, as None. Raises
    :class:`~.engine.CatalogChanged` for one renamed in its directory (in
    ``inside``, whose locks keep rows from moving in, but not from renaming).
    SQLite: ``live`` itself (its writers run one at a time).
    """
    if conn.dialect.name != "postgresql" or not live:
        return list(live)
    now: dict[int, Any] = {}
    for part in tree.chunks(sorted(int(row.id) for row in live)):
        now.update(
            (int(row.id), row)
            for row in conn.execute(
                sa.select(*(nodes.c[c] for c in history.COLUMNS))
                .where(nodes.c.id.in_(part))
                .order_by(nodes.c.id)
                .with_for_update()
            )
        )
    fresh: list[Any] = []
    for row in live:
        found = now.get(int(row.id))
        if found is not None and (found.parent_id, found.name) != (row.parent_id, row.name):
            if found.parent_id in inside:
                raise CatalogChanged(f"{row.name!r} was renamed meanwhile")
            found = None
        fresh.append(found)
    return fresh


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
    inside = set(tree.lock_subtree(conn, live_root))
    _update(conn, _relock(conn, live_root), old_root, epoch, refs, released)
    before = dict(history.walk(conn, at, old_root))
    now = dict(history.walk(conn, None, live_root))
    gone = {
        rel: row for rel, row in now.items() if rel not in before or before[rel].kind != row.kind
    }
    kept = {rel: row for rel, row in now.items() if rel not in gone}
    # The files to delete or rewrite, locked and read again (the directories
    # were locked before the walk, so it saw every file there is). One moved
    # out or deleted meanwhile is no longer here: not deleted, and in the
    # place of one the snapshot holds, its old version comes back.
    changed = [
        (rel, row) for rel, row in kept.items() if row.kind == "file" and _differs(row, before[rel])
    ]
    files = [row for row in gone.values() if row.kind == "file"]
    fresh = _relock_all(conn, files + [row for _, row in changed], inside)
    doomed = [row for row in fresh[: len(files)] if row is not None]
    for (rel, _), row in zip(changed, fresh[len(files) :], strict=True):
        if row is None:
            del kept[rel]
        else:
            kept[rel] = row
    # Files first (each releases the content it holds as it goes), then
    # directories: emptied, they go with ON DELETE CASCADE from the topmost down.
    for part in tree.chunks(sorted(int(row.id) for row in doomed)):
        released.update(
            conn.execute(
                nodes.delete().where(nodes.c.id.in_(part)).returning(nodes.c.blob_hash)
            ).scalars()
        )
    dirs = sorted(int(row.id) for row in gone.values() if row.kind == "dir")
    for part in tree.chunks(dirs):
        conn.execute(nodes.delete().where(nodes.c.id.in_(part)))
    for rel, row in kept.items():
        _update(conn, row, before[rel], epoch, refs, released)
    _insert_tree(conn, at, old_root, int(live_root.id), kept, epoch, refs)
