"""``fsck()``: check the catalog against its content, in both directions.

Catalog -> content: every blob a file refers to exists, with the recorded size
(and, with ``verify=True``, the recorded SHA-256), whether inline or in the
external store; every reference count equals the number of files pointing at
its blob.

Every file's kind id is the id of its serializer columns, with a row in
``polystore_kinds`` (:mod:`~polystore.backends.sql.kinds`).

Content -> catalog: every object in the external store belongs to a blob row
(or to an upload in flight). This is the one place polystore lists the store.

The store is listed before the catalog is read, and anything that looks wrong
is looked at once more, so uploads and gc() running at the same time are not
reported as damage. The report is exact when nothing else writes meanwhile.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from polystore.backends.sql.content import INLINE
from polystore.backends.sql.kinds import key_id, same_json
from polystore.backends.sql.models import blobs_table as blobs
from polystore.backends.sql.models import intents_table as intents
from polystore.backends.sql.models import kinds_table as kinds
from polystore.backends.sql.models import nodes_table as nodes
from polystore.backends.sql.placement import Placement
from polystore.blobs.base import StoredObject

__all__ = ["FsckReport", "check"]


@dataclass
class FsckReport:
    """What :meth:`SQLBackend.fsck` found. ``ok`` is true when nothing is wrong.

    Problems (each a sorted list of blob hashes, or of store keys):

    * ``missing``: referenced blobs whose content is gone.
    * ``size_mismatch``: referenced blobs stored with another size than recorded.
    * ``hash_mismatch``: referenced blobs whose bytes do not hash to their name
      (only checked with ``verify=True``).
    * ``unreferenced``: keys of objects in the external store that no blob row
      and no upload in flight accounts for (strays included).
    * ``refcount_mismatch``: ``hash -> (recorded, actual)`` reference counts.
    * ``kind_mismatch``: ``kind id -> number of files`` whose kind id is not
      the id of their serializer columns, or has no row in ``polystore_kinds``
      (a batch load would decode them as another kind).

    For information only: ``blobs_checked``, ``objects_checked``, ``verified``;
    ``garbage`` (unreferenced blob rows that ``gc()`` will remove);
    ``pending_uploads`` (upload intents: in flight, or abandoned and awaiting
    ``gc()``); ``without_kind`` (files with no kind id, written by something
    other than polystore: they load from their own columns, by the slower path); ``other_stores`` (store name -> blobs kept in a store this
    backend was not opened with, which it cannot check).
    """

    blobs_checked: int = 0
    objects_checked: int = 0
    verified: bool = False
    missing: list[str] = field(default_factory=list)
    size_mismatch: list[str] = field(default_factory=list)
    hash_mismatch: list[str] = field(default_factory=list)
    unreferenced: list[str] = field(default_factory=list)
    refcount_mismatch: dict[str, tuple[int, int]] = field(default_factory=dict)
    kind_mismatch: dict[int, int] = field(default_factory=dict)
    garbage: int = 0
    without_kind: int = 0
    pending_uploads: int = 0
    other_stores: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """No problem found."""
        return not (
            self.missing
            or self.size_mismatch
            or self.hash_mismatch
            or self.unreferenced
            or self.refcount_mismatch
            or self.kind_mismatch
        )

    def problems(self) -> list[str]:
        """One line per problem, for people."""
        lines = [f"missing: {h}" for h in self.missing]
        lines += [f"wrong size: {h}" for h in self.size_mismatch]
        lines += [f"wrong hash: {h}" for h in self.hash_mismatch]
        lines += [f"unreferenced object: {key}" for key in self.unreferenced]
        lines += [
            f"reference count of {h} is {recorded}, {actual} files refer to it"
            for h, (recorded, actual) in self.refcount_mismatch.items()
        ]
        lines += [
            f"kind id {kind_id} of {count} files does not match their serializer columns"
            for kind_id, count in self.kind_mismatch.items()
        ]
        return lines

    def __str__(self) -> str:
        head = (
            f"checked {self.blobs_checked} blobs and {self.objects_checked} stored objects"
            f"{' (hashes verified)' if self.verified else ''}: "
            f"{'ok' if self.ok else f'{len(self.problems())} problems'}"
        )
        notes = [head, *self.problems()]
        if self.garbage:
            notes.append(f"{self.garbage} unreferenced blobs await gc()")
        if self.without_kind:
            notes.append(f"{self.without_kind} files have no kind id (they load more slowly)")
        if self.pending_uploads:
            notes.append(f"{self.pending_uploads} uploads in flight or awaiting gc()")
        notes += [
            f"{count} blobs in store {name!r}, not checked (not this backend's store)"
            for name, count in sorted(self.other_stores.items())
        ]
        return "\n".join(notes)


def _hash_inline(conn: Connection, content_hash: str) -> str | None:
    data = conn.execute(sa.select(blobs.c.data).where(blobs.c.hash == content_hash)).scalar()
    return None if data is None else hashlib.sha256(data).hexdigest()


def check(placement: Placement, *, verify: bool = False) -> FsckReport:
    """Run the checks; see :class:`FsckReport`."""
    store = placement.store
    report = FsckReport(verified=verify)
    listed: dict[str, StoredObject] = {}
    objects: list[StoredObject] = []
    if store is not None:
        objects = list(store.scan())
        listed = {o.hash: o for o in objects if o.hash is not None and o.token is None}
    report.objects_checked = len(objects)

    with placement.engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                blobs.c.hash,
                blobs.c.size,
                blobs.c.store,
                blobs.c.refcount,
                sa.case((blobs.c.store == INLINE, sa.func.length(blobs.c.data)), else_=None).label(
                    "stored"
                ),
            )
        ).all()
        pending = conn.execute(sa.select(intents.c.id, intents.c.hash, intents.c.store)).all()
        counted = {
            h: int(n)
            for h, n in conn.execute(
                sa.select(nodes.c.blob_hash, sa.func.count())
                .where(nodes.c.kind == "file")
                .group_by(nodes.c.blob_hash)
            )
        }
        report.blobs_checked = len(rows)
        report.pending_uploads = len(pending)
        others: Counter[str] = Counter()
        ours: set[str] = set()
        for row in rows:
            actual = counted.get(row.hash, 0)
            if actual != row.refcount:
                report.refcount_mismatch[row.hash] = (int(row.refcount), actual)
            if store is not None and row.store == store.name:
                ours.add(row.hash)
            referenced = actual > 0 or row.refcount > 0
            if not referenced:
                report.garbage += 1
                continue
            if row.store == INLINE:
                if row.stored != row.size:
                    report.size_mismatch.append(row.hash)
                elif verify and _hash_inline(conn, row.hash) != row.hash:
                    report.hash_mismatch.append(row.hash)
            elif store is not None and row.store == store.name:
                _check_object(placement, report, row, listed.get(row.hash), verify)
            else:
                others[row.store] += 1
        report.other_stores = dict(others)
        _check_kinds(conn, report)

    if store is not None:
        in_flight = {h for _, h, s in pending if s == store.name}
        tokens = {str(i) for i, _, s in pending if s == store.name}
        for obj in objects:
            if obj.token is not None:
                accounted = obj.token in tokens
            elif obj.hash is not None:
                accounted = obj.hash in ours or obj.hash in in_flight
                if not accounted and not store.exists(obj.hash):
                    continue  # deleted since the listing (gc at work)
            else:
                accounted = False
            if not accounted:
                report.unreferenced.append(obj.key)
    for name in ("missing", "size_mismatch", "hash_mismatch", "unreferenced"):
        getattr(report, name).sort()
    report.refcount_mismatch = dict(sorted(report.refcount_mismatch.items()))
    return report


def _check_kinds(conn: Connection, report: FsckReport) -> None:
    """Every file's kind id against its columns, and every kind against its key.

    One pass over the files, grouped by kind in SQL. JSON is read as text and
    compared by value (:func:`~.kinds.same_json`): the database may give back
    a number in another form than it was written.
    """
    text = sa.Text()
    groups = conn.execute(
        sa.select(
            nodes.c.kind_id,
            nodes.c.serializer,
            nodes.c.serializer_version,
            nodes.c.dtype,
            sa.cast(nodes.c.shape, text),
            sa.cast(nodes.c.meta, text),
            sa.func.count(),
        )
        .where(nodes.c.kind == "file")
        .group_by(*(nodes.c[name] for name in _KIND_COLUMNS))
    ).all()
    kinds_found: dict[int, list[Any] | None] = {}  # id -> its columns, None if not its key's
    for kind_id, key, *columns in conn.execute(
        sa.select(
            kinds.c.id,
            kinds.c.key,
            kinds.c.serializer,
            kinds.c.serializer_version,
            kinds.c.dtype,
            sa.cast(kinds.c.shape, text),
            sa.cast(kinds.c.meta, text),
        )
    ):
        parsed = _parsed(columns)
        try:
            from_key = json.loads(key)
        except ValueError:
            from_key = _INVALID
        matches = parsed is not None and key_id(key) == kind_id and same_json(from_key, parsed)
        kinds_found[kind_id] = parsed if matches else None
    mismatch: Counter[int] = Counter()
    for kind_id, *columns, count in groups:
        if kind_id is None:
            report.without_kind += count
            continue
        recorded = kinds_found.get(kind_id)
        parsed = _parsed(columns)
        if recorded is None or parsed is None or not same_json(parsed, recorded):
            mismatch[kind_id] += count
    report.kind_mismatch = dict(sorted(mismatch.items()))


_KIND_COLUMNS = ("kind_id", "serializer", "serializer_version", "dtype", "shape", "meta")
_INVALID = object()


def _parsed(columns: list[Any]) -> list[Any] | None:
    """``[serializer, version, dtype, shape, meta]`` with the JSON parsed; None if it is not JSON."""
    serializer, version, dtype, shape, meta = columns
    try:
        shape = None if shape is None else json.loads(shape)
        meta = None if meta is None else json.loads(meta)
    except ValueError:
        return None
    return [serializer, version, dtype, shape, meta or None]


def _check_object(
    placement: Placement, report: FsckReport, row: Any, obj: StoredObject | None, verify: bool
) -> None:
    store = placement.store
    assert store is not None
    size = obj.size if obj is not None else store.size(row.hash)  # listed, or uploaded since
    if size is None:
        report.missing.append(row.hash)
    elif size != row.size:
        report.size_mismatch.append(row.hash)
    elif verify:
        found = placement.digest(row.hash)
        if found is None:
            report.missing.append(row.hash)
        elif found[0] != row.size:
            report.size_mismatch.append(row.hash)
        elif found[1] != row.hash:
            report.hash_mismatch.append(row.hash)
