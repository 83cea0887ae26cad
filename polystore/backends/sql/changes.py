"""What changed between two epochs: the files a diff reports, found from the rows that changed.

Comparing two whole trees costs a walk of the catalog on each side. Epochs
say what changed without a walk (:mod:`.history`): between epochs ``lo <
hi``, a node changed if its version at ``hi`` was written after ``lo``, or its
version at ``lo`` was replaced or deleted by ``hi``. One scan of the live
table's ``epoch`` column (no index: one more index would slow every save) and
indexed reads of the history find them. Then:

* a changed file is compared where it was at ``lo`` and where it is at ``hi``;
* a changed directory that moved, was renamed, appeared or went changes the
  path of every file below it: those subtrees are walked, on the side(s)
  where the directory was somewhere else;
* paths are built by looking up ancestors by id, a level at a time.

So the cost follows what changed (and the size of moved subtrees), not the
catalog: 1% of 100,000 files differ in ~0.1 s on SQLite (docs/snapshots.rst).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from polystore import paths
from polystore.backends.sql import history
from polystore.backends.sql.models import ROOT_ID, history_table, nodes_table
from polystore.backends.sql.tree import chunks

__all__ = ["SIGNATURE", "changed_files"]

#: What a file is, for diff: its content, its kind (serializer, dtype, shape,
#: meta: one derived id), its size and its attrs (as text: compared, not parsed).
SIGNATURE = ("id", "parent_id", "name", "kind", "blob_hash", "kind_id", "size", "attrs_text")

Files = dict[str, tuple[Any, ...]]


def _changed_ids(conn: Connection, lo: int, hi: int | None) -> set[int]:
    """Ids of the nodes whose version at ``hi`` (None: live) is not their version at ``lo``."""
    nodes, old = nodes_table, history_table
    live = sa.select(nodes.c.id).where(nodes.c.epoch > lo)
    if hi is not None:
        live = live.where(nodes.c.epoch <= hi)
    ended = sa.select(old.c.id).where(old.c.epoch <= lo, old.c.valid_to > lo)
    if hi is not None:
        ended = ended.where(old.c.valid_to <= hi)
    found = set(conn.execute(live).scalars()) | set(conn.execute(ended).scalars())
    if hi is not None:
        newer = sa.select(old.c.id).where(old.c.epoch > lo, old.c.epoch <= hi, old.c.valid_to > hi)
        found |= set(conn.execute(newer).scalars())
    return found


def _versions(conn: Connection, epoch: int | None, ids: Iterable[int]) -> dict[int, Any]:
    """``id -> row`` (:data:`SIGNATURE`) of the nodes among ``ids`` visible at ``epoch``."""
    found: dict[int, Any] = {}
    for part in chunks(sorted(ids)):

        def where(t: sa.Table, part: Any = part) -> list[Any]:
            return [t.c.id.in_(list(part))]

        for row in history._rows(conn, epoch, where, columns=SIGNATURE):
            found[int(row.id)] = row
    return found


class _Paths:
    """Paths of directories at one epoch, by id, looked up a level at a time and kept."""

    def __init__(self, conn: Connection, epoch: int | None) -> None:
        self.conn, self.epoch = conn, epoch
        self.known: dict[int, str | None] = {ROOT_ID: ""}  # None: not in the tree then

    def of(self, ids: Iterable[int]) -> dict[int, str | None]:
        wanted = {i for i in ids if i not in self.known}
        # id -> (parent id, name) for every ancestor not known yet, a level at a time
        links: dict[int, tuple[int, str]] = {}
        while wanted:
            rows = _versions(self.conn, self.epoch, wanted)
            for i in wanted - rows.keys():
                self.known[i] = None
            for i, row in rows.items():
                links[i] = (int(row.parent_id), row.name)
            wanted = {p for p, _ in links.values() if p not in self.known and p not in links}
        for i in links:
            self._resolve(i, links)
        return {i: self.known.get(i) for i in ids}

    def _resolve(self, i: int, links: dict[int, tuple[int, str]]) -> str | None:
        if i in self.known:
            return self.known[i]
        parent, name = links[i]
        above = self._resolve(parent, links) if parent in links else self.known.get(parent)
        self.known[i] = None if above is None else paths.join(above, name)
        return self.known[i]


def _side(
    conn: Connection, epoch: int | None, rows: dict[int, Any], moved: set[int], where: _Paths
) -> Files:
    """``path -> signature`` at ``epoch`` of the changed files ``rows`` and of every file
    under the directories ``moved`` (ids whose place differs on the other side)."""
    found: Files = {}
    files = {i: row for i, row in rows.items() if row.kind == "file"}
    dirs = [rows[i] for i in moved]
    places = where.of({int(r.parent_id) for r in files.values()} | {int(r.id) for r in dirs})
    for row in files.values():
        parent = places.get(int(row.parent_id))
        if parent is not None:
            found[paths.join(parent, row.name)] = tuple(row[4:])
    for row in dirs:
        base = places.get(int(row.id))
        if base is None:
            continue
        for rel, below in history.walk(conn, epoch, row, SIGNATURE):
            if below.kind == "file":
                found[paths.join(base, rel)] = tuple(below[4:])
    return found


def changed_files(conn: Connection, lo: int, hi: int | None) -> tuple[Files, Files]:
    """``(before, after)``: ``path -> signature`` of the files that may differ from epoch
    ``lo`` to ``hi`` (None: live), on each side; every other file is the same on both."""
    ids = _changed_ids(conn, lo, hi)
    before, after = _versions(conn, lo, ids), _versions(conn, hi, ids)

    def place(row: Any) -> tuple[int, str]:
        return int(row.parent_id), row.name

    moved = {
        i
        for i in ids
        if (before.get(i) is None) != (after.get(i) is None)
        or (i in before and i in after and place(before[i]) != place(after[i]))
    }
    old_dirs = {i for i in moved if i in before and before[i].kind == "dir"}
    new_dirs = {i for i in moved if i in after and after[i].kind == "dir"}
    return (
        _side(conn, lo, before, old_dirs, _Paths(conn, lo)),
        _side(conn, hi, after, new_dirs, _Paths(conn, hi)),
    )
