"""Where content lives: inline in the catalog, or in the external blob store.

Content of at most ``inline_limit`` bytes goes into ``polystore_blobs.data``;
larger content goes to the backend's :class:`~polystore.blobs.BlobStore`, and
its blob row records the store's name. The placement of a blob is decided once,
when its row is first inserted; later saves of the same content (under any
limit) only add references, and :func:`polystore.backends.sql.gc.rebalance`
moves existing blobs.

The upload protocol that puts content in the external store is in
:mod:`polystore.backends.sql.uploads`; reading it back, in
:mod:`polystore.backends.sql.verify`.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa

from polystore.backends.sql.catalog import Catalog
from polystore.backends.sql.content import Content
from polystore.backends.sql.engine import sqlite_file
from polystore.blobs.base import BlobStore, from_url
from polystore.errors import SerializationError

__all__ = ["BLOB_STORE_ENV", "Placement", "default_blob_store", "resolve_blob_store"]

#: Environment variable naming the blob store when ``blob_store=None``.
BLOB_STORE_ENV = "POLYSTORE_BLOB_STORE"

# PostgreSQL cannot allocate a value of 1 GB or more (MaxAllocSize), and gives
# bytea to a client that reads text (SQLAlchemy's psycopg, pg_dump, COPY TO) as
# hex, two characters a byte: a larger value could be stored, but not read back
# inside a transaction, nor dumped. Half of that, less 1 MiB for the rest of a row.
_PG_MAX_VALUE = (0x3FFFFFFF - (1 << 20)) // 2
# SQLite's length limit applies to a whole row, not only to the value.
_ROW_OVERHEAD = 1024


# -- choosing the store ---------------------------------------------------------


def default_blob_store(url: sa.URL) -> BlobStore | None:
    """The store used when none is given: ``<database file>.blobs/`` for a SQLite file.

    PostgreSQL catalogs and in-memory SQLite have no default: their content
    stays inline (up to the database's value limit) unless a store is given.
    """
    from polystore.blobs.local import LocalBlobStore

    path = sqlite_file(url)
    return None if path is None else LocalBlobStore(path + ".blobs")


def resolve_blob_store(blob_store: Any, url: sa.URL) -> BlobStore | None:
    """A :class:`BlobStore` from what ``SQLBackend(blob_store=...)`` was given."""
    if isinstance(blob_store, BlobStore):
        return blob_store
    if blob_store is None:
        blob_store = os.environ.get(BLOB_STORE_ENV) or None
        if blob_store is None:
            return default_blob_store(url)
    return from_url(blob_store)


class Placement:
    """Decides where new content goes: inline, or the external store."""

    def __init__(self, catalog: Catalog, store: BlobStore | None) -> None:
        self.engine = catalog.engine
        self.store = store
        self._max_inline: int | None = None

    def max_inline(self) -> int:
        """The largest value the database accepts in one column."""
        if self._max_inline is None:
            if self.engine.dialect.name == "postgresql":
                self._max_inline = _PG_MAX_VALUE
            else:
                raw = self.engine.raw_connection()
                try:
                    driver = raw.driver_connection
                    limit = int(driver.getlimit(sqlite3.SQLITE_LIMIT_LENGTH))  # type: ignore[union-attr]
                    # The limit bounds the whole row: leave room for the other columns.
                    self._max_inline = limit - _ROW_OVERHEAD
                finally:
                    raw.close()
        return self._max_inline

    def external(self, contents: Iterable[Content], inline_limit: int) -> list[Content]:
        """The contents to put in the external store (each hash once)."""
        big = {c.hash: c for c in contents if c.size > inline_limit}
        if self.store is not None:
            return list(big.values())
        for content in big.values():
            if content.size > self.max_inline():
                raise SerializationError(
                    f"content of {content.size} bytes is more than this "
                    f"{self.engine.dialect.name} database stores in one value "
                    f"({self.max_inline()} bytes) and the catalog has no external blob "
                    "store; open the backend with blob_store='file:///path' or 's3://...'"
                )
        return []
