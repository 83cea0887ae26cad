"""The maintenance methods of :class:`~polystore.SQLBackend`, as a mixin.

``gc``, ``fsck`` and ``rebalance``: each delegates to :mod:`.gc` or
:mod:`.fsck`, giving it the catalog, the uploads and the content reader it
uses. They live here, beside the façade rather than in it, so that
``backend.py`` holds the backend's own operations; ``SQLBackend`` lists this
class among its bases.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from polystore.errors import UnsupportedOperationError

if TYPE_CHECKING:
    from polystore.backends.sql.catalog import Catalog
    from polystore.backends.sql.fsck import FsckReport
    from polystore.backends.sql.gc import GCReport, RebalanceReport
    from polystore.backends.sql.placement import Placement
    from polystore.backends.sql.uploads import Uploads
    from polystore.backends.sql.verify import ContentReader
    from polystore.blobs.base import BlobStore

__all__ = ["MaintenanceMethods"]


class MaintenanceMethods:
    """Content maintenance: collecting garbage, checking, rebalancing placement."""

    _catalog: Catalog
    _uploads: Uploads | None
    _reader: ContentReader
    _placement: Placement
    blob_store: BlobStore | None
    inline_limit: int

    def _outside_transaction(self, operation: str) -> None:
        # Maintenance commits its own transactions, one per batch; inside the
        # caller's (on SQLite, holding the only write lock) it could not.
        if self._catalog.in_transaction:
            raise UnsupportedOperationError(f"{operation}() cannot run inside transaction()")

    def gc(self, *, grace: dt.timedelta | float | None = None) -> GCReport:
        """Remove content nothing refers to, and uploads that were abandoned.

        Unreferenced external blobs are deleted, and upload intents older than
        ``grace`` (a timedelta or seconds; default 24 hours) with their objects:
        uploads whose writer died or whose transaction rolled back. Works from
        the catalog's records alone and never lists the blob store. Safe while
        other processes read and write: a blob any file refers to is never
        deleted. ``grace`` must outlast the longest save in progress, whose
        upload would otherwise be taken (the save then fails and is retried;
        nothing is lost).
        """
        from polystore.backends.sql.gc import DEFAULT_GRACE, collect_garbage

        self._outside_transaction("gc")
        with self._catalog.errors():
            return collect_garbage(
                self._catalog, self._uploads, grace=DEFAULT_GRACE if grace is None else grace
            )

    def fsck(self, *, verify: bool = False) -> FsckReport:
        """Check the catalog against its content, both ways; see :class:`FsckReport`.

        Every referenced blob exists with the recorded size (and, with
        ``verify=True``, hash: this reads all content); every object in the
        external store is referenced; every reference count is right. Lists
        the external store (the only operation that does).
        """
        from polystore.backends.sql.fsck import check

        with self._catalog.errors():
            return check(self._catalog, self.blob_store, verify=verify)

    def rebalance(self, inline_limit: int | None = None) -> RebalanceReport:
        """Move blobs between inline and external placement to match the inline limit.

        Blobs over the limit (``inline_limit``, default this backend's; capped,
        like :attr:`inline_limit`, at what one database value holds) move to
        the external store, the others into the database; each move is its own
        transaction, so an interruption leaves every blob readable in one place.
        Without an external store nothing moves.
        """
        from polystore.backends.sql.gc import rebalance

        self._outside_transaction("rebalance")
        limit = self.inline_limit
        if inline_limit is not None:
            limit = min(inline_limit, self._placement.max_inline())
        with self._catalog.errors():
            return rebalance(self._catalog, self._uploads, self._reader, limit)
