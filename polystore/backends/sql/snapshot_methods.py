"""The snapshot methods of :class:`~polystore.SQLBackend` (:doc:`snapshots`), as a mixin.

``snapshot``, ``snapshots``, ``delete_snapshot``, ``at``, ``diff`` and
``restore``: each delegates to :mod:`.snapshots` or :mod:`.restore`. They
live here, beside the façade rather than in it, so that ``backend.py`` holds
the backend's own operations; ``SQLBackend`` lists this class among its bases.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from polystore.backends.sql.restore import restore
from polystore.backends.sql.snapshots import (
    Change,
    Snapshot,
    SnapshotView,
    delete,
    diff,
    find,
    list_snapshots,
    take,
)

if TYPE_CHECKING:
    from polystore.backends.sql.catalog import Catalog
    from polystore.backends.sql.fast import FastReader
    from polystore.backends.sql.load import Loader

__all__ = ["SnapshotMethods"]


class SnapshotMethods:
    """Snapshots of the catalog: taking, listing, deleting, reading at, diffing, restoring."""

    _catalog: Catalog
    _fast: FastReader
    _loader: Loader

    def snapshot(self, name: str | None = None, *, message: str | None = None) -> Snapshot:
        """Record the catalog as it is now, under a unique ``name`` (or none: known by id).

        Writes two rows whatever the catalog's size, copies no content, and
        holds every transaction committed before it whole, none after it.
        A taken name raises :class:`~polystore.errors.AlreadyExistsError`.
        """
        return take(self._catalog, name, message)

    def snapshots(self) -> list[Snapshot]:
        """The kept snapshots, oldest first."""
        return list_snapshots(self._catalog)

    def delete_snapshot(self, snapshot: Snapshot | str | int) -> None:
        """Forget a snapshot (a Snapshot, name or id); ``gc()`` then frees what only it kept."""
        delete(self._catalog, snapshot)

    def at(self, snapshot: Snapshot | str | int) -> SnapshotView:
        """A read-only backend answering every read as at ``snapshot`` (a Snapshot, name or id).

        Writes raise :class:`~polystore.errors.ReadOnlyError`; an unknown
        snapshot raises :class:`~polystore.errors.NotFoundError`.
        """
        found = self._catalog.read(lambda conn: find(conn, snapshot))
        return SnapshotView(self, found, self._fast, self._loader)

    def diff(
        self,
        old: Snapshot | str | int,
        new: Snapshot | str | int | None = None,
        path: str = "",
    ) -> list[Change]:
        """Files added, deleted or modified under ``path`` from ``old`` to ``new`` (None: now).

        Sorted by path; a moved file is deleted at its old path and added at its new one.
        """
        return diff(self._catalog, old, new, path)

    def restore(self, snapshot: Snapshot | str | int, path: str = "") -> None:
        """Make ``path`` (a file or a whole tree; default everything) what it was at ``snapshot``.

        One transaction; content is not copied; everything outside ``path`` is untouched.
        """
        restore(self._catalog, snapshot, path)
