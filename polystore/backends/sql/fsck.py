"""``fsck()``: check the catalog against its content, in both directions.

Catalog -> content: every blob a file refers to exists, with the recorded size
(and, with ``verify=True``, the recorded hash), whether inline or in the
external store; every reference count equals the number of files pointing at
its blob.

Every file's serializer columns are those of its kind's row in
``polystore_kinds``, and every kind row holds what its key says
(:mod:`~polystore.backends.sql.kinds`).

Content -> catalog: every object in the external store belongs to a blob row
(or to an upload in flight). This is the one place polystore lists the store.

Rows another program wrote with what polystore never writes -- a blob hash
that is not 64 lowercase hex digits, ``shape``, ``meta`` or ``attrs`` that are
not JSON or not of the JSON type polystore stores -- are reported by name,
and the checks go on over the rest.

The store is listed before the catalog is read, and anything that looks wrong
is looked at once more, so uploads and gc() running at the same time are not
reported as damage. The report is exact when nothing else writes meanwhile.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from polystore.backends.sql.catalog import Catalog
from polystore.backends.sql.content import INLINE
from polystore.backends.sql.kinds import key_id, same_json
from polystore.backends.sql.models import blobs_table as blobs
from polystore.backends.sql.models import history_table as history
from polystore.backends.sql.models import intents_table as intents
from polystore.backends.sql.models import kinds_table as kinds
from polystore.backends.sql.models import nodes_table as nodes
from polystore.backends.sql.tree import chunks, subtree_sql
from polystore.backends.sql.verify import digest
from polystore.blobs.base import BlobStore, StoredObject, is_content_hash
from polystore.hashing import HashAlgorithm

__all__ = ["FsckReport", "check"]


@dataclass
class FsckReport:
    """What :meth:`SQLBackend.fsck` found. ``ok`` is true when nothing is wrong.

    Problems (each a sorted list of blob hashes, or of store keys):

    * ``missing``: referenced blobs whose content is gone (referenced by a
      file, or by an old version a snapshot keeps: ``polystore_node_history``).
    * ``size_mismatch``: referenced blobs stored with another size than recorded.
    * ``hash_mismatch``: referenced blobs whose bytes do not hash to their name
      (only checked with ``verify=True``).
    * ``unreferenced``: keys of objects in the external store that no blob row
      and no upload in flight accounts for (strays included).
    * ``refcount_mismatch``: ``hash -> (recorded, actual)`` reference counts.
    * ``kind_mismatch``: ``kind id -> number of files`` whose serializer
      columns are not those of their kind's row, or whose kind has no row
      (loads would decode them as another kind).
    * ``bad_kinds``: ids of ``polystore_kinds`` rows whose id or columns are
      not their key's, used by files or not.
    * ``damaged_nodes``: ``path -> what is wrong`` for files and directories
      whose row holds what polystore never writes (another program's): a
      blob hash that is not 64 lowercase hex digits, or ``shape``, ``meta`` or
      ``attrs`` that are not JSON, or not the JSON type polystore stores
      there (an array, an object). Operations that need such a column raise
      :class:`~polystore.errors.CatalogDamagedError`. A row no path reaches
      from the root is named ``"<node ID>"``.
    * ``damaged_blobs``: hashes of ``polystore_blobs`` rows whose hash is not
      64 lowercase hex digits (their content is not checked further).

    For information only: ``blobs_checked``, ``objects_checked``, ``verified``;
    ``garbage`` (unreferenced blob rows that ``gc()`` will remove);
    ``pending_uploads`` (upload intents and staged content: in flight, or
    abandoned and awaiting ``gc()``); ``without_kind`` (files with no kind id, written by something
    other than polystore: they load from their own columns, by the slower
    path); ``other_stores`` (store name -> blobs kept in a store this backend
    was not opened with, which it cannot check); ``history_versions`` (old
    versions of files and directories kept for snapshots; their content is
    checked like that of live files).
    """

    blobs_checked: int = 0
    objects_checked: int = 0
    verified: bool = False
    missing: list[str] = field(default_factory=list)
    size_mismatch: list[str] = field(default_factory=list)
    hash_mismatch: list[str] = field(default_factory=list)
    checksum_mismatch: list[str] = field(default_factory=list)
    unreferenced: list[str] = field(default_factory=list)
    refcount_mismatch: dict[str, tuple[int, int]] = field(default_factory=dict)
    kind_mismatch: dict[int, int] = field(default_factory=dict)
    bad_kinds: list[int] = field(default_factory=list)
    damaged_nodes: dict[str, str] = field(default_factory=dict)
    damaged_blobs: list[str] = field(default_factory=list)
    garbage: int = 0
    without_kind: int = 0
    pending_uploads: int = 0
    other_stores: dict[str, int] = field(default_factory=dict)
    history_versions: int = 0

    @property
    def ok(self) -> bool:
        """No problem found."""
        return not (
            self.missing
            or self.size_mismatch
            or self.hash_mismatch
            or self.checksum_mismatch
            or self.unreferenced
            or self.refcount_mismatch
            or self.kind_mismatch
            or self.bad_kinds
            or self.damaged_nodes
            or self.damaged_blobs
        )

    def problems(self) -> list[str]:
        """One line per problem, for people."""
        lines = [f"missing: {h}" for h in self.missing]
        lines += [f"wrong size: {h}" for h in self.size_mismatch]
        lines += [f"wrong hash: {h}" for h in self.hash_mismatch]
        lines += [f"wrong piece checksums recorded: {h}" for h in self.checksum_mismatch]
        lines += [f"unreferenced object: {key}" for key in self.unreferenced]
        lines += [
            f"reference count of {h} is {recorded}, {actual} files refer to it"
            for h, (recorded, actual) in self.refcount_mismatch.items()
        ]
        lines += [
            f"kind id {kind_id} of {count} files does not match their serializer columns"
            for kind_id, count in self.kind_mismatch.items()
        ]
        lines += [f"kind row {kind_id} does not match its key" for kind_id in self.bad_kinds]
        lines += [f"damaged row of {path!r}: {what}" for path, what in self.damaged_nodes.items()]
        lines += [
            f"damaged blob row {h!r}: its hash is not a content hash (64 lowercase hex digits)"
            for h in self.damaged_blobs
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


def _hash_inline(conn: Connection, content_hash: str, algorithm: HashAlgorithm) -> str | None:
    data = conn.execute(sa.select(blobs.c.data).where(blobs.c.hash == content_hash)).scalar()
    return None if data is None else algorithm.of(data)


def check(catalog: Catalog, store: BlobStore | None, *, verify: bool = False) -> FsckReport:
    """Run the checks; see :class:`FsckReport`."""
    report = FsckReport(verified=verify)
    objects = [] if store is None else list(store.scan())
    report.objects_checked = len(objects)
    with catalog.engine.connect() as conn:
        facts = _Facts.read(conn)
        report.history_versions = facts.history_versions
        report.missing.extend(facts.kept - {row.hash for row in facts.rows})
        report.blobs_checked = len(facts.rows)
        report.pending_uploads = len(facts.pending)
        verifier = catalog.hashing if verify else None
        ours = _check_blobs(conn, store, report, facts, objects, verifier)
        _check_kinds(conn, report)
        damaged = [h for h in facts.counted if h is not None and not is_content_hash(h)]
        _check_nodes(conn, report, damaged)
    if store is not None:
        _check_objects(store, report, objects, facts.pending, ours)
    for name in (
        "missing",
        "size_mismatch",
        "hash_mismatch",
        "checksum_mismatch",
        "unreferenced",
        "damaged_blobs",
    ):
        getattr(report, name).sort()
    report.refcount_mismatch = dict(sorted(report.refcount_mismatch.items()))
    return report


@dataclass
class _Facts:
    """What the checks compare, read from the catalog at the start."""

    rows: list[Any]  # blob rows: hash, size, store, refcount, stored (inline length), checksums
    pending: list[Any]  # upload intents: id, hash, store
    counted: dict[str | None, int]  # blob hash -> files referring to it
    kept: set[str]  # blob hashes that old versions kept for snapshots refer to
    history_versions: int

    @classmethod
    def read(cls, conn: Connection) -> _Facts:
        inline_length = sa.case((blobs.c.store == INLINE, sa.func.length(blobs.c.data)))
        rows = conn.execute(
            sa.select(
                blobs.c.hash,
                blobs.c.size,
                blobs.c.store,
                blobs.c.refcount,
                inline_length.label("stored"),
                blobs.c.checksums,
            )
        ).all()
        pending = conn.execute(sa.select(intents.c.id, intents.c.hash, intents.c.store)).all()
        files = (
            sa.select(nodes.c.blob_hash, sa.func.count())
            .where(nodes.c.kind == "file")
            .group_by(nodes.c.blob_hash)
        )
        counted = {h: int(n) for h, n in conn.execute(files)}
        # Old versions kept for snapshots hold their content without counting.
        kept_hashes = sa.select(history.c.blob_hash).where(history.c.blob_hash.is_not(None))
        kept = set(conn.execute(kept_hashes.distinct()).scalars())
        versions = conn.execute(sa.select(sa.func.count()).select_from(history)).scalar_one()
        return cls(list(rows), list(pending), counted, kept, int(versions))


def _check_blobs(
    conn: Connection,
    store: BlobStore | None,
    report: FsckReport,
    facts: _Facts,
    objects: list[StoredObject],
    verify: HashAlgorithm | None,
) -> set[str]:
    """Check every blob row against its files and its content; the hashes kept in ``store``.

    ``verify``: the catalog's algorithm, to hash every content by; None to
    check sizes only.
    """
    listed = {o.hash: o for o in objects if o.hash is not None and o.token is None}
    others: Counter[str] = Counter()
    ours: set[str] = set()
    for row in facts.rows:
        actual = facts.counted.get(row.hash, 0)
        if actual != row.refcount:
            report.refcount_mismatch[row.hash] = (int(row.refcount), actual)
        if not is_content_hash(row.hash):
            report.damaged_blobs.append(row.hash)
            continue  # (no store object can have that name)
        if store is not None and row.store == store.name:
            ours.add(row.hash)
        if not (actual > 0 or row.refcount > 0 or row.hash in facts.kept):
            report.garbage += 1
            continue
        if row.store == INLINE:
            if row.stored != row.size:
                report.size_mismatch.append(row.hash)
            elif verify is not None and _hash_inline(conn, row.hash, verify) != row.hash:
                report.hash_mismatch.append(row.hash)
        elif store is not None and row.store == store.name:
            _check_object(store, report, row, listed.get(row.hash), verify)
        else:
            others[row.store] += 1
    report.other_stores = dict(others)
    return ours


def _check_objects(
    store: BlobStore,
    report: FsckReport,
    objects: list[StoredObject],
    pending: list[Any],
    ours: set[str],
) -> None:
    """Name the objects in ``store`` that no blob row, intent or save in progress accounts for."""
    in_flight = {h for _, h, s in pending if s == store.name}
    tokens = {str(i) for i, _, s in pending if s == store.name}
    for obj in objects:
        if obj.staged:  # a save in progress, or a dead one's that gc() will remove
            report.pending_uploads += 1
            continue
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


def _check_kinds(conn: Connection, report: FsckReport) -> None:
    """Every file's columns against its kind row, and every kind row against its key.

    A file against its row: in SQL, one pass grouped by kind id, the JSON
    columns compared as the database gives them back as text (both were
    written from the same values, so they read back alike; a file whose meta
    changed from ``1.0`` to ``1`` without its kind id is told apart). A row
    against its key (which Python wrote): the key's id, and its values by
    :func:`~.kinds.same_json`, numbers loosely on PostgreSQL (jsonb gives
    ``1e23`` back as an integer).
    """
    text = sa.Text()

    def as_text(column: Any) -> Any:
        return sa.func.coalesce(sa.cast(column, text), "")

    def json_text(column: Any) -> Any:  # (no meta and empty meta alike)
        return sa.func.coalesce(sa.cast(column, text), "{}")

    same = sa.and_(
        kinds.c.id.is_not(None),
        nodes.c.serializer == kinds.c.serializer,
        nodes.c.serializer_version == kinds.c.serializer_version,
        as_text(nodes.c.dtype) == as_text(kinds.c.dtype),
        as_text(nodes.c.shape) == as_text(kinds.c.shape),
        json_text(nodes.c.meta) == json_text(kinds.c.meta),
    )
    groups = conn.execute(
        sa.select(
            nodes.c.kind_id,
            sa.func.count(),
            sa.func.sum(sa.case((same, 0), else_=1)),
        )
        .select_from(nodes.outerjoin(kinds, kinds.c.id == nodes.c.kind_id))
        .where(nodes.c.kind == "file")
        .group_by(nodes.c.kind_id)
    ).all()
    mismatch: Counter[int] = Counter()
    for kind_id, count, wrong in groups:
        if kind_id is None:
            report.without_kind += count
        elif wrong:
            mismatch[kind_id] += wrong
    loose = conn.dialect.name == "postgresql"
    rows = conn.execute(
        sa.select(
            kinds.c.id,
            kinds.c.key,
            kinds.c.serializer,
            kinds.c.serializer_version,
            kinds.c.dtype,
            sa.cast(kinds.c.shape, text),
            sa.cast(kinds.c.meta, text),
        )
    )
    bad = [kind_id for kind_id, *columns in rows if not _row_matches_key(kind_id, columns, loose)]
    report.bad_kinds = sorted(bad)
    report.kind_mismatch = dict(sorted(mismatch.items()))


def _json_damage_sql(dialect: str) -> str:
    """``id, what`` of every node whose shape, meta or attrs is not what polystore writes.

    In SQL, one pass: SQLite keeps JSON as text that may not parse
    (``json_valid``), PostgreSQL's ``jsonb`` always parses; on both the type
    must be the one :func:`~.backend._json_column` accepts.
    """
    cases = []
    for column, wanted in (("shape", "array"), ("meta", "object"), ("attrs", "object")):
        if dialect == "postgresql":
            type_of = f"jsonb_typeof({column})"
        else:
            cases.append(
                f"WHEN {column} IS NOT NULL AND NOT json_valid({column}) "
                f"THEN 'its {column} is not JSON'"
            )
            type_of = f"json_type({column})"  # (valid JSON, or NULL, by now)
        cases.append(
            f"WHEN {type_of} NOT IN ('{wanted}', 'null') THEN 'its {column} is not a JSON {wanted}'"
        )
    return (
        "SELECT id, what FROM (SELECT id, CASE "
        + " ".join(cases)
        + " END AS what FROM polystore_nodes) AS checked WHERE what IS NOT NULL"
    )


def _check_nodes(conn: Connection, report: FsckReport, bad_hashes: list[str]) -> None:
    """Report rows of ``polystore_nodes`` holding what polystore never writes, by path.

    ``bad_hashes``: the blob hashes files refer to that are not 64 lowercase
    hex digits. Paths are found (by a walk of the whole tree) only when something
    is wrong.
    """
    found: dict[int, str] = {}
    for part in chunks(sorted(bad_hashes)):
        for node_id, blob_hash in conn.execute(
            sa.select(nodes.c.id, nodes.c.blob_hash).where(nodes.c.blob_hash.in_(part))
        ):
            found[node_id] = (
                f"its blob hash {blob_hash!r} is not a content hash (64 lowercase hex digits)"
            )
    for node_id, what in conn.execute(sa.text(_json_damage_sql(conn.dialect.name))):
        found.setdefault(node_id, what)
    if not found:
        return
    named: dict[int, str] = {}
    walk = sa.text(
        subtree_sql(conn.dialect.name, select="sub.id, sub.path", where="WHERE sub.id IN :ids")
    ).bindparams(sa.bindparam("ids", expanding=True))
    for part in chunks(sorted(found)):
        named.update(
            (int(i), str(p)) for i, p in conn.execute(walk, {"root": 0, "ids": list(part)})
        )
    report.damaged_nodes = dict(
        sorted((named.get(node_id, f"<node {node_id}>"), what) for node_id, what in found.items())
    )


def _row_matches_key(kind_id: int, columns: list[Any], loose: bool) -> bool:
    key, serializer, version, dtype, shape, meta = columns
    try:
        if key_id(key) != kind_id:
            return False
        from_key = json.loads(key)
        shape = None if shape is None else json.loads(shape)
        meta = None if meta is None else json.loads(meta)
    except (TypeError, ValueError, RecursionError):  # (not ASCII, or not JSON)
        return False
    values = [serializer, version, dtype, shape, meta or None]
    return same_json(from_key, values, loose_numbers=loose)


def _check_object(
    store: BlobStore,
    report: FsckReport,
    row: Any,
    obj: StoredObject | None,
    verify: HashAlgorithm | None,
) -> None:
    size = obj.size if obj is not None else store.size(row.hash)  # listed, or uploaded since
    if size is None:
        report.missing.append(row.hash)
    elif size != row.size:
        report.size_mismatch.append(row.hash)
    elif verify is not None:
        found = digest(store, row.hash, verify)
        if found is None:
            report.missing.append(row.hash)
        elif found.size != row.size:
            report.size_mismatch.append(row.hash)
        elif found.hash != row.hash:
            report.hash_mismatch.append(row.hash)
        elif row.checksums is not None and bytes(row.checksums) != found.checksums:
            # Loads would refuse good content (or, checking another format, be unable to).
            report.checksum_mismatch.append(row.hash)
