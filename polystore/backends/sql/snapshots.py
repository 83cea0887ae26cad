"""Snapshots: named, read-only views of the whole catalog at one instant, diff and restore.

A snapshot is one row of ``polystore_snapshots`` naming a closed epoch
(:mod:`.epochs`); what it sees is read back by :mod:`.history`. Taking one
writes two rows whatever the catalog's size: the snapshot's, and the epoch
counter. Content is shared by hash, so nothing is copied; the old versions of
rows written since are kept by the triggers of revision 0006, and only while a
kept snapshot can see them.

* :func:`take`, :func:`list_snapshots`, :func:`delete` -- the list;
* :class:`SnapshotView` -- ``SQLBackend.at(snapshot)``: every read as at the
  snapshot, every write refused;
* :func:`diff` -- files added, deleted and modified between two epochs;
* ``restore`` is in :mod:`.restore`.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import sqlalchemy as sa
from sqlalchemy import Connection

from polystore import paths
from polystore.backends._common import (
    KindLookups,
    already_exists,
    not_a_directory,
    not_found,
)
from polystore.backends.base import ReadOnlyBackend, StatResult
from polystore.backends.sql import epochs, history, tree
from polystore.backends.sql.catalog import Catalog, utcnow
from polystore.backends.sql.changes import changed_files
from polystore.backends.sql.fast import FastReader
from polystore.backends.sql.listing import stat_result
from polystore.backends.sql.load import Loader
from polystore.backends.sql.models import ROOT_ID
from polystore.backends.sql.models import snapshots_table as snapshots
from polystore.backends.sql.query import attrs_filter
from polystore.errors import NotFoundError

if TYPE_CHECKING:
    from polystore.arrays import LazyArray

__all__ = [
    "Change",
    "Snapshot",
    "SnapshotRef",
    "SnapshotView",
    "delete",
    "diff",
    "find",
    "list_snapshots",
    "take",
]


@dataclass(frozen=True)
class Snapshot:
    """A kept snapshot of a catalog (:meth:`SQLBackend.snapshot`)."""

    id: int
    #: Unique in the catalog, or None (then the snapshot is known by its id).
    name: str | None
    created_at: dt.datetime
    message: str | None = None
    #: The epoch it sees: every node row written at this epoch or before.
    epoch: int = 0


@dataclass(frozen=True, order=True)
class Change:
    """A file that differs between two states of a catalog (:meth:`SQLBackend.diff`)."""

    path: str
    change: Literal["added", "deleted", "modified"]


SnapshotRef = Snapshot | str | int

T = TypeVar("T")


def _snapshot(row: Any) -> Snapshot:
    return Snapshot(
        id=int(row.id),
        name=row.name,
        created_at=_utc(row.created_at),
        message=row.message,
        epoch=int(row.epoch),
    )


def _utc(value: dt.datetime) -> dt.datetime:
    utc = tree.as_utc(value)
    assert utc is not None
    return utc


def find(conn: Connection, ref: SnapshotRef, *, lock: bool = False) -> Snapshot:
    """The kept snapshot ``ref`` names (a :class:`Snapshot`, a name or an id).

    ``lock`` (PostgreSQL): keep it from being deleted until this transaction
    ends, so the old versions it sees stay while they are read and written back.
    """
    stmt = sa.select(snapshots)
    if isinstance(ref, Snapshot):
        stmt = stmt.where(snapshots.c.id == ref.id)
    elif isinstance(ref, bool) or not isinstance(ref, (str, int)):
        raise TypeError(f"a snapshot is a Snapshot, a name or an id, not {ref!r}")
    elif isinstance(ref, int):
        stmt = stmt.where(snapshots.c.id == ref)
    else:
        stmt = stmt.where(snapshots.c.name == ref)
    if lock and conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update(key_share=True)
    row = conn.execute(stmt).first()
    if row is None:
        raise NotFoundError(f"no snapshot {ref.name if isinstance(ref, Snapshot) else ref!r}")
    return _snapshot(row)


def take(catalog: Catalog, name: str | None, message: str | None) -> Snapshot:
    """Record a snapshot of the catalog as it is now; see :meth:`SQLBackend.snapshot`."""
    if name is not None and (not isinstance(name, str) or not name or "\x00" in name):
        raise ValueError(f"a snapshot name is a non-empty string without NUL, not {name!r}")
    if message is not None and (not isinstance(message, str) or "\x00" in message):
        raise ValueError(f"a snapshot message is a string without NUL, not {message!r}")

    def work(conn: Connection) -> Snapshot:
        if (
            name is not None
            and conn.execute(sa.select(snapshots.c.id).where(snapshots.c.name == name)).first()
        ):
            raise already_exists(f"snapshot {name}")
        epoch = epochs.close_epoch(conn)
        row = conn.execute(
            snapshots.insert()
            .values(name=name, epoch=epoch, created_at=utcnow(), message=message)
            .returning(*snapshots.c)
        ).one()
        return _snapshot(row)

    return catalog.write(work)


def list_snapshots(catalog: Catalog) -> list[Snapshot]:
    """Every kept snapshot, oldest first."""
    rows = catalog.read(
        lambda conn: list(conn.execute(sa.select(snapshots).order_by(snapshots.c.epoch)))
    )
    return [_snapshot(row) for row in rows]


def delete(catalog: Catalog, ref: SnapshotRef) -> None:
    """Forget a snapshot, and the old versions only it could see (their content goes at ``gc()``)."""

    def work(conn: Connection) -> None:
        snap = find(conn, ref)
        conn.execute(snapshots.delete().where(snapshots.c.id == snap.id))
        history.prune(conn, snap.epoch)

    catalog.write(work)


# -- reading at a snapshot -------------------------------------------------------------


class SnapshotView(KindLookups, ReadOnlyBackend):
    """The catalog as it was at a snapshot: every read answers as then, every write is refused.

    Returned by :meth:`SQLBackend.at`. Each call reads one consistent state
    of the catalog and first checks that the snapshot is still kept (a deleted
    one raises :class:`~polystore.errors.NotFoundError`).
    """

    def __init__(self, backend: Any, snapshot: Snapshot, fast: FastReader, loader: Loader) -> None:
        # (``backend``: the SQLBackend, for its settings and for lazy arrays,
        # which pickle as it does; not imported, nothing below the facade does)
        self._backend = backend
        self._catalog: Catalog = loader.catalog
        self._fast = fast
        self._loader = loader
        #: The snapshot this view reads.
        self.snapshot = snapshot
        self._epoch = snapshot.epoch

    def __repr__(self) -> str:
        label = self.snapshot.name if self.snapshot.name is not None else self.snapshot.id
        return f"{self._backend!r}.at({label!r})"

    def _read(self, work: Callable[[Connection], T]) -> T:
        def checked(conn: Connection) -> T:
            find(conn, self.snapshot)
            return work(conn)

        return self._catalog.read(checked, snapshot=True)

    def _resolve(self, norm: str, *, with_content: bool = False) -> Any:
        return self._read(
            lambda conn: history.resolve(conn, self._epoch, norm, with_content=with_content)
        )

    # -- inspecting --------------------------------------------------------------

    def _kind(self, path: str) -> str | None:
        row = self._resolve(paths.normalize(path))
        return None if row is None else str(row.kind)

    def open_array(self, path: str) -> LazyArray:
        """A lazy view of the array ``path`` held at the snapshot (see :mod:`polystore.arrays`).

        It reads that content by its hash, which the kept snapshot keeps from
        ``gc()``; it pickles as the backend does.
        """
        from polystore.backends.sql.ranges import open_array

        return open_array(self._backend, path, self._resolve_in)

    def iter_content(self, file_path: str, *, chunk_size: int = 8 << 20) -> Iterator[bytes]:
        """:meth:`SQLBackend.iter_content <polystore.SQLBackend.iter_content>`, as at the snapshot."""
        from polystore.backends.sql.stream import iter_content

        return iter_content(
            self._catalog,
            self._backend.blob_store,
            file_path,
            chunk_size=chunk_size,
            resolve=self._resolve_in,
        )

    @property
    def serializers(self) -> Any:
        """The backend's serializers (what ``get`` compares local files with)."""
        return self._backend.serializers

    @property
    def hash_algorithm(self) -> str:
        """The hash that names the catalog's content (:attr:`SQLBackend.hash_algorithm`)."""
        return self._catalog.hashing.name

    def _resolve_in(self, conn: Connection, norm: str) -> Any:
        """The row at ``norm`` as at the snapshot (which must still be kept), or None."""
        find(conn, self.snapshot)
        return history.resolve(conn, self._epoch, norm)

    def stat(self, path: str) -> StatResult:
        # docstring inherited
        norm = paths.normalize(path)

        def work(conn: Connection) -> tuple[Any, str | None]:
            row = history.resolve(conn, self._epoch, norm)
            if row is None or row.blob_hash is None:
                return row, None
            return row, _stores(conn, [row.blob_hash]).get(row.blob_hash)

        row, store = self._read(work)
        if row is None:
            raise not_found(norm)
        return stat_result(norm, row, store)

    def _dir(self, conn: Connection, norm: str) -> Any:
        row = history.resolve(conn, self._epoch, norm)
        if row is None:
            raise not_found(norm)
        if row.kind != "dir":
            raise not_a_directory(norm)
        return row

    def list_dir(self, path: str) -> list[str]:
        # docstring inherited
        norm = paths.normalize(path)
        found = self._list_fast(norm)
        if found is not None:
            return found

        def work(conn: Connection) -> list[str]:
            dir_id = int(self._dir(conn, norm).id)
            rows = history.children(conn, self._epoch, [dir_id], columns=("name",))
            return sorted(row.name for row in rows)

        return self._read(work)

    def _list_fast(self, norm: str) -> list[str] | None:
        """``list_dir`` on the read fast path (:mod:`.fast`), or None where it is unavailable.

        The directory's id is read first, in a transaction of its own: what a
        kept snapshot sees never changes, so it is still right when its names
        are read, in a second one that also checks the snapshot is still kept.
        """
        if self._catalog.in_transaction:
            return None
        dir_id = int(self._read(lambda conn: self._dir(conn, norm)).id)
        fast = self._fast
        dialect = self._catalog.dialect
        e = self._epoch
        with fast.snapshot() as ok:
            if not ok:
                return None
            kept = fast.fetch_raw(history.exists_sql(dialect), [self.snapshot.id])
            if kept is None:
                return None
            if not kept:
                raise NotFoundError(f"no snapshot {self.snapshot.name or self.snapshot.id!r}")
            rows = fast.fetch_raw(history.names_sql(dialect), [dir_id, e, dir_id, e, e])
        return None if rows is None else [name for (name,) in rows]

    def list_files(
        self,
        directory: str = "",
        pattern: str | None = None,
        extensions: Any = None,
        recursive: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        # docstring inherited
        norm = paths.normalize(directory)
        exts = paths.normalize_extensions(extensions)
        columns = ("id", "parent_id", "name", "kind")

        def work(conn: Connection) -> list[str]:
            root = self._dir(conn, norm)
            if recursive:
                found = history.walk(conn, self._epoch, root, columns)
                return [rel for rel, row in found if row.kind == "file"]
            rows = history.children(conn, self._epoch, [int(root.id)], files_only=True)
            return [row.name for row in rows]

        return sorted(
            paths.join(norm, rel)
            for rel in self._read(work)
            if paths.match_name(rel.rpartition("/")[2], pattern, exts)
        )

    def query(
        self,
        *,
        under: str = "",
        kind: str | None = None,
        serializer: str | None = None,
        dtype: str | None = None,
        attrs: dict[str, Any] | None = None,
        limit: int | None = None,
    ) -> list[StatResult]:
        """:meth:`SQLBackend.query` as at the snapshot: the same filters, the same results."""
        if kind is not None and kind not in ("file", "dir"):
            raise ValueError(f"kind must be 'file' or 'dir', not {kind!r}")
        wanted = attrs_filter(attrs)
        norm = paths.normalize(under)

        def work(conn: Connection) -> list[tuple[str, Any, str | None]]:
            found = history.walk(conn, self._epoch, self._dir(conn, norm))
            stores = _stores(conn, [row.blob_hash for _, row in found if row.blob_hash])
            return [(rel, row, stores.get(row.blob_hash)) for rel, row in found]

        results = []
        for rel, row, store in sorted(self._read(work), key=lambda item: item[0]):
            if kind is not None and row.kind != kind:
                continue
            if serializer is not None and row.serializer != serializer:
                continue
            if dtype is not None and row.dtype != str(dtype):
                continue
            if wanted and not _attrs_match(row.attrs, wanted):
                continue
            results.append(stat_result(paths.join(norm, rel), row, store))
            if limit is not None and len(results) >= limit:
                break
        return results

    def iter_dir(self, path: str = "", *, page_size: int = 1000) -> Iterator[str]:
        """The names in directory ``path``, in code-point order (:meth:`SQLBackend.iter_dir`)."""
        yield from self.list_dir(path)

    # -- loading -------------------------------------------------------------------

    def load(self, file_path: str, **kwargs: Any) -> Any:
        # docstring inherited
        if kwargs:
            raise TypeError(f"load() got unexpected keyword arguments {sorted(kwargs)}")
        norm = paths.normalize_file(file_path)
        loader = self._decoding()
        return loader.decode_row(self._resolve(norm, with_content=True), norm)

    def _decoding(self) -> Loader:
        """The loader, decoding with the backend's serializers as they are now."""
        backend = self._backend
        self._loader.decoders.use(backend.serializers, backend.allow_pickle)
        return self._loader

    def load_batch(self, file_paths: Sequence[str], **kwargs: Any) -> list[Any]:
        """Load every path in order, as at the snapshot, from one consistent read."""
        if kwargs:
            raise TypeError(f"load_batch() got unexpected keyword arguments {sorted(kwargs)}")
        norm = paths.normalize_files(file_paths)
        by_parent: dict[str, list[str]] = defaultdict(list)
        for path in dict.fromkeys(norm):
            parent, _, name = path.rpartition("/")
            by_parent[parent].append(name)
        # Chunk by chunk as the rows arrive, as a live batch load decodes:
        # the bytes of one chunk at a time are held twice, not the batch's.
        values: dict[str, Any] = {}
        closer: list[str] = []
        if not self._lean_fast(by_parent, values, closer):
            values.clear()
            closer.clear()
            rows = self._read(lambda conn: self._lean_rows(conn, by_parent))
            self._decode_lean(rows, values, closer)
        loader = self._decoding()
        for path in closer:
            values[path] = loader.decode_row(self._resolve(path, with_content=True), path)
        for path in norm:
            if path not in values:
                raise not_found(path)
        return [values[path] for path in norm]

    def _lean_queries(self, parent_id: int, names: list[str]) -> Iterator[tuple[str, list[object]]]:
        dialect = self._catalog.dialect
        e = self._epoch
        for part in tree.chunks(names):
            named: list[object] = ["/".join(part)] if dialect == "postgresql" else list(part)
            args = [parent_id, *named, e, parent_id, *named, e, e]
            yield history.lean_children_sql(dialect, len(part)), args

    def _lean_rows(self, conn: Connection, by_parent: dict[str, list[str]]) -> dict[str, Any]:
        """``path -> lean row`` (:func:`.history.lean_children_sql`) of the named files."""
        found: dict[str, Any] = {}
        for parent, names in by_parent.items():
            row = history.resolve(conn, self._epoch, parent)
            if row is None or row.kind != "dir":
                continue
            prefix = f"{parent}/" if parent else ""
            for sql, args in self._lean_queries(int(row.id), names):
                for lean in conn.exec_driver_sql(sql, tuple(args)):
                    found[prefix + lean.name] = lean
        return found

    def _lean_fast(
        self, by_parent: dict[str, list[str]], values: dict[str, Any], closer: list[str]
    ) -> bool:
        """:meth:`_lean_rows` on the read fast path (:mod:`.fast`), each chunk decoded
        (:meth:`_decode_lean`) as it arrives; False where the fast path is unavailable."""
        if self._catalog.in_transaction:
            return False
        fast = self._fast
        dialect = self._catalog.dialect
        e = self._epoch
        child = history.child_sql(dialect)
        with fast.snapshot() as ok:
            if not ok:
                return False
            kept = fast.fetch_raw(history.exists_sql(dialect), [self.snapshot.id])
            if kept is None:
                return False
            if not kept:
                raise NotFoundError(f"no snapshot {self.snapshot.name or self.snapshot.id!r}")
            for parent, names in by_parent.items():
                parent_id: int | None = ROOT_ID
                for name in paths.split_parts(parent):
                    rows = fast.fetch_raw(child, [parent_id, name, e, parent_id, name, e, e])
                    if rows is None:
                        return False
                    parent_id = rows[0][0] if rows and rows[0][1] == "dir" else None
                    if parent_id is None:
                        break
                if parent_id is None:
                    continue
                prefix = f"{parent}/" if parent else ""
                for sql, args in self._lean_queries(parent_id, names):
                    rows = fast.fetch_raw(sql, args)
                    if rows is None:
                        return False
                    # (a lean row's last column is the name)
                    self._decode_lean({prefix + lean[3]: lean for lean in rows}, values, closer)
                    del rows
        return True

    def _decode_lean(self, rows: dict[str, Any], values: dict[str, Any], closer: list[str]) -> None:
        """Decode lean rows into ``values``: inline files of a known kind a kind at a
        time; the paths of the others go to ``closer``, to be read in full."""
        decoders = self._decoding().decoders
        verify = self._loader.reader.verify_inline
        groups: dict[int, tuple[list[str], list[object], list[int]]] = {}
        for path, (kind_id, size, data, _) in rows.items():
            if kind_id is None or data is None or verify or len(data) != size:
                closer.append(path)
                continue
            group = groups.get(kind_id)
            if group is None:
                group = groups[kind_id] = ([], [], [])
            group[0].append(path)
            group[1].append(data)
            group[2].append(size)
        for kind_id, (names, datas, sizes) in groups.items():
            decoded = decoders.decode_inline(kind_id, datas, max(sizes))
            if decoded is None:
                closer.extend(names)
            else:
                values.update(zip(names, decoded, strict=True))


def _stores(conn: Connection, hashes: Iterable[str]) -> dict[str, str]:
    blobs = tree.blobs
    found: dict[str, str] = {}
    for part in tree.chunks(sorted(set(hashes))):
        stmt = sa.select(blobs.c.hash, blobs.c.store).where(blobs.c.hash.in_(part))
        found.update((h, store) for h, store in conn.execute(stmt))
    return found


def _attrs_match(attrs: object, wanted: Mapping[str, object]) -> bool:
    """Whether ``attrs`` holds every wanted key with that value, of that JSON type."""
    if not isinstance(attrs, dict):
        return False
    missing = object()
    for key, value in wanted.items():
        held = attrs.get(key, missing)
        if held is missing or type(held) is not type(value) or held != value:
            return False
    return True


# -- diff ------------------------------------------------------------------------------


def diff(
    catalog: Catalog, old: SnapshotRef, new: SnapshotRef | None, path: str = ""
) -> list[Change]:
    """Files added, deleted and modified from ``old`` to ``new`` (None: now), by path."""
    norm = paths.normalize(path)

    def work(conn: Connection) -> tuple[dict[str, Any], dict[str, Any]]:
        first = find(conn, old).epoch
        second = None if new is None else find(conn, new).epoch
        if second is None or first < second:
            return changed_files(conn, first, second)
        if first == second:
            return {}, {}
        after, before = changed_files(conn, second, first)  # (backwards in time)
        return before, after

    found = catalog.read(work, snapshot=True)
    before, after = ({p: v for p, v in side.items() if _under(p, norm)} for side in found)
    changes = [Change(p, "deleted") for p in before.keys() - after.keys()]
    changes += [Change(p, "added") for p in after.keys() - before.keys()]
    changes += [
        Change(p, "modified") for p in before.keys() & after.keys() if before[p] != after[p]
    ]
    return sorted(changes)


def _under(path: str, norm: str) -> bool:
    return not norm or path == norm or path.startswith(norm + "/")
