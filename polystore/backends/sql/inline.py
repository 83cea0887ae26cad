"""Large inline content, read in pieces: never a second whole copy in memory.

Inline content of up to :data:`WHOLE` bytes travels with its file's row, as
one value. A larger value would cost two or three copies of itself on the way
(the driver's, the database library's, the buffer it is returned in), so the
rows of loads carry ``NULL`` for it (:func:`data_sql`, :func:`data_column`)
and an :class:`InlineReader` reads it in pieces of :data:`WHOLE` bytes into
the buffer it is returned in:

* SQLite: through an incremental BLOB handle (``blobopen``). While it reads,
  the connection's memory map and page cache are turned down: the pages of a
  value read once would otherwise fill both (a memory map's pages count as
  the process's memory), and the cache keeps nothing worth keeping.
* PostgreSQL: ``substring()`` of the value, which reads only the TOAST chunks
  of the piece for a value stored uncompressed (``STORAGE EXTERNAL``,
  revision 0008), in binary (not as hex text). A value compressed before
  that revision is read whole.

Outside a caller's transaction the pieces are read in one read transaction
(one snapshot on PostgreSQL), but not the one that read the file's row; in a
caller's transaction on PostgreSQL (``READ COMMITTED``) each piece sees what
has committed since the last. Either way, if the file changed meanwhile and
its content left the catalog, :class:`ContentGone` is raised, and the loader
reads the file again. Driver errors are raised as SQLAlchemy's, as on every
other path, so that they are translated to polystore's.

Saves of new content over :data:`WHOLE` bytes on SQLite (:func:`insert_in_pieces`;
``rebalance()`` moving content into the catalog too, :func:`write_in_pieces`)
insert the row holding ``zeroblob(size)``, then write the content through a
BLOB handle, a piece at a time: binding it would copy it, and SQLite would
copy it again into the row it builds. SQLite stores such a row without
allocating its zeros because ``data`` is the table's last column (revision
0009). PostgreSQL's binary ``COPY`` takes one copy of the content already.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from polystore.backends.sql.engine import driver_error, driver_fetch
from polystore.backends.sql.models import blobs_table
from polystore.blobs.base import CHUNK_SIZE, BlobReader, Buffer
from polystore.errors import NotFoundError

__all__ = [
    "WHOLE",
    "ContentGone",
    "InlineReader",
    "data_column",
    "data_sql",
    "insert_in_pieces",
    "write_in_pieces",
]

#: Inline content up to this size is read with its row; larger, in pieces this size.
WHOLE = CHUNK_SIZE

#: The page cache while a BLOB handle reads or writes (KiB, as ``PRAGMA
#: cache_size`` counts negative values): the handle reads overflow pages past
#: it, straight into the caller's buffer, and a write spills its pages to the
#: WAL as they fill it.
_HANDLE_CACHE_KIB = 2048


class ContentGone(NotFoundError):
    """The inline content a file's row named left the catalog before it was read.

    The file was overwritten or deleted (and its content freed) between the
    read of its row and the read of its content: reading the file again gives
    its current value.
    """


def _gone(content_hash: str) -> ContentGone:
    return ContentGone(
        f"inline content {content_hash} left the catalog before it was read: the file that "
        "held it changed meanwhile"
    )


@contextmanager
def _sqlalchemy_errors(conn: Connection, what: str) -> Iterator[None]:
    """Raise the driver's errors in the block as SQLAlchemy raises them (:func:`.engine.driver_error`)."""
    try:
        yield
    except conn.dialect.loaded_dbapi.Error as error:
        raise driver_error(conn, error, what) from error


def data_sql(node: str) -> str:
    """SQL for the inline bytes of blob ``b`` where they are read with the row of ``node``."""
    return f"CASE WHEN {node}.size <= {WHOLE} THEN b.data END"


def data_column(size: Any) -> Any:
    """:func:`data_sql` for SQLAlchemy: ``data``, for a file whose size column is ``size``."""
    return sa.case((size <= WHOLE, blobs_table.c.data)).label("data")


def _lower_caches(driver: Any) -> Callable[[], None]:
    """Turn SQLite's memory map off and its page cache down on ``driver``, for a
    BLOB handle; return what gives them back."""
    changed: list[tuple[str, Any]] = []  # (setting, value before)

    def restore() -> None:
        while changed:
            name, value = changed.pop()
            driver.execute(f"PRAGMA {name}={value}")

    try:
        for name, value in (("mmap_size", 0), ("cache_size", -_HANDLE_CACHE_KIB)):
            before = driver.execute(f"PRAGMA {name}").fetchone()[0]
            driver.execute(f"PRAGMA {name}={value}")
            changed.append((name, before))
    except BaseException:
        restore()
        raise
    return restore


def insert_in_pieces(conn: Connection, row: Sequence[Any], data: Buffer) -> None:
    """Insert the inline blob ``row`` with its content ``data`` written in pieces (SQLite).

    ``row`` is ``hash, size, refcount, created_at`` (the latter as the driver
    takes it); see :func:`write_in_pieces`.
    """
    content_hash, size, refcount, created = row
    write_in_pieces(
        conn,
        "INSERT INTO polystore_blobs (hash, size, store, refcount, created_at, checksums, data) "
        "VALUES (?, ?, 'inline', ?, ?, NULL, zeroblob(?)) RETURNING rowid",
        (content_hash, size, refcount, created, memoryview(data).nbytes),
        data,
    )


def write_in_pieces(conn: Connection, sql: str, params: Sequence[Any], data: Buffer) -> bool:
    """Run ``sql``, then write ``data`` into the ``data`` of the row it returns (SQLite).

    ``sql`` inserts or updates one blob row, with ``zeroblob(size of data)``
    for its ``data``, and returns its ``rowid``; False if it returned none (an
    update found no row). SQLite stores the zeroblob without allocating it
    (``data`` is the table's last column), and ``data`` is written into it
    through a BLOB handle, :data:`WHOLE` bytes at a time: no copy of the
    content is made.
    """
    view = memoryview(data).cast("B")
    driver: Any = conn.connection.driver_connection
    with _sqlalchemy_errors(conn, "writing large inline content"):
        # (Before the statement too: the row's overflow pages, zeros, go through the cache.)
        restore = _lower_caches(driver)
        try:
            found = driver_fetch(conn, sql, params)  # (its errors are SQLAlchemy's already)
            if not found:
                return False
            with driver.blobopen("polystore_blobs", "data", found[0][0]) as blob:
                for start in range(0, view.nbytes, WHOLE):
                    blob.write(view[start : start + WHOLE])
            return True
        finally:
            restore()


class InlineReader(BlobReader):
    """The inline content of one blob, read in pieces on ``conn``; ``size`` is its length.

    Raises :class:`ContentGone` when made if the blob is no longer inline in
    the catalog. Close it (it is a context manager) to give the connection
    back its settings.
    """

    def __init__(self, conn: Connection, content_hash: str) -> None:
        super().__init__()
        self._position = 0
        #: Bytes ``(start, length)`` of the content (fewer at its end).
        self._piece: Callable[[int, int], Buffer]
        #: What closing the reader undoes.
        self._undo: Callable[[], None] = lambda: None
        self._conn = conn
        driver: Any = conn.connection.driver_connection
        with _sqlalchemy_errors(conn, "reading large inline content"):
            if conn.dialect.name == "sqlite":
                self._open_sqlite(conn, driver, content_hash)
            else:
                self._open_postgresql(conn, driver, content_hash)

    def _open_sqlite(self, conn: Connection, driver: Any, content_hash: str) -> None:
        # Through SQLAlchemy, which begins the read transaction the BLOB handle
        # then reads in: the row cannot go between this query and the handle.
        rowid = conn.execute(
            sa.text("SELECT rowid FROM polystore_blobs WHERE hash = :h AND store = 'inline'"),
            {"h": content_hash},
        ).scalar()
        if rowid is None:
            raise _gone(content_hash)
        restore = _lower_caches(driver)
        try:
            blob = driver.blobopen("polystore_blobs", "data", rowid, readonly=True)
        except BaseException:
            restore()
            raise

        def piece(start: int, length: int) -> Buffer:
            blob.seek(start)
            return blob.read(length)  # type: ignore[no-any-return]

        def undo() -> None:
            try:
                blob.close()
            finally:
                restore()

        self.size, self._piece, self._undo = len(blob), piece, undo

    def _open_postgresql(self, conn: Connection, driver: Any, content_hash: str) -> None:
        # (Through SQLAlchemy, which begins the transaction the pieces are read in.)
        found = conn.execute(
            sa.text(
                "SELECT octet_length(data), pg_column_size(data) < octet_length(data) "
                "FROM polystore_blobs WHERE hash = :h AND store = 'inline'"
            ),
            {"h": content_hash},
        ).first()
        if found is None:
            raise _gone(content_hash)
        self.size, compressed = found

        def value(sql: str, *params: int) -> Buffer:
            # (In a caller's READ COMMITTED transaction, each statement sees
            # what has committed since: the row may be gone.)
            row = driver.execute(sql, [*params, content_hash], binary=True).fetchone()
            if row is None or row[0] is None:
                raise _gone(content_hash)
            return row[0]  # type: ignore[no-any-return]

        if compressed:  # each piece would decompress the value up to it: read it once
            whole = memoryview(value("SELECT data FROM polystore_blobs WHERE hash = %s"))
            self._piece = lambda start, length: whole[start : start + length]
            self._undo = whole.release
            return
        self._piece = lambda start, length: value(
            "SELECT substring(data FROM %s FOR %s) FROM polystore_blobs WHERE hash = %s",
            start + 1,
            length,
        )

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        length = min(out.nbytes, WHOLE, self.size - self._position)
        if length <= 0:
            return 0
        with _sqlalchemy_errors(self._conn, "reading large inline content"):
            piece = self._piece(self._position, length)
        n = memoryview(piece).nbytes
        out[:n] = piece
        self._position += n
        return n

    def close(self) -> None:
        undo, self._undo = self._undo, lambda: None
        try:
            with _sqlalchemy_errors(self._conn, "reading large inline content"):
                undo()
        finally:
            super().close()
