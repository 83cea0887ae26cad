"""Streaming: a local file into the catalog, and a file's content out, a chunk at a time.

``save``/``load`` hold a whole value in memory, which is right for arrays a
program works on and wrong for copying a 50 GiB file in or out
(``polystore put``/``get``). Here only plain content moves -- bytes, or UTF-8
text -- whose stored form is the file itself, so nothing has to be parsed.

Saving (:func:`save_file`), decided in ``docs/decisions.rst``:

* Content over the inline limit goes to the external blob store under the
  usual upload protocol (:mod:`.uploads`: intents committed before a byte is
  uploaded, the blob row and the file row written in one catalog transaction
  afterwards). The file is read twice, 8 MiB at a time -- once to hash it
  (by the catalog's algorithm: its name in the store), once to upload it; the
  second pass hashes again, and an upload whose bytes no longer match (the
  file changed in between) fails and leaves no object. The store receives an
  iterator of chunks: a local store writes them to a temporary file, S3 makes
  a multipart upload of them.
* Content at or under the inline limit goes into the database row, as
  ``save`` does it: it is read whole, which the limit bounds (1 MiB by
  default). A catalog without an external store keeps everything inline, up
  to what one database value holds; a file that large is read whole too.
  Streaming into the database (SQLite's incremental blob I/O, PostgreSQL large
  objects) would need a second kind of inline blob for little gain: content
  that large belongs in a blob store.

Reading (:func:`iter_content`): the file's blob is looked up once, then read a
chunk at a time -- a ranged read of the external object, or ``substr`` of the
inline value -- and hashed on the way; the last chunk is only yielded once the
whole content matched its hash, so a consumer that writes to a temporary file
and renames it at the end never publishes corrupt content.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import Connection

from polystore import paths
from polystore.backends._common import check_attrs, is_a_directory, not_found
from polystore.backends.sql import tree
from polystore.backends.sql.content import INLINE, Content
from polystore.backends.sql.kinds import Kind
from polystore.backends.sql.models import blobs_table as blobs
from polystore.backends.sql.save import Batch, SaveOptions, Saver
from polystore.backends.sql.verify import ObjectGone
from polystore.blobs.base import CHUNK_SIZE, BlobStore
from polystore.errors import IntegrityError, NotFoundError, SerializationError
from polystore.hashing import HashAlgorithm

if TYPE_CHECKING:
    from polystore.backends.sql.catalog import Catalog
    from polystore.serializers import SerializerRegistry

__all__ = ["STREAMED_SERIALIZERS", "FileSource", "iter_content", "save_file"]

#: The serializers whose stored content is a file's own bytes.
STREAMED_SERIALIZERS = ("bytes", "str")

Advance = Callable[[int], None]


class FileSource:
    """A local file as a :class:`~.content.ChunkSource`: read again for each upload.

    Every pass hashes what it reads; one that does not end at the size and
    hash given (the file changed since it was hashed) raises
    :class:`~polystore.errors.IntegrityError` before its last chunk is
    handed over, so the store discards the upload. ``text`` also checks that
    the bytes are UTF-8, as a ``str`` must be.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        size: int,
        content_hash: str,
        algorithm: HashAlgorithm,
        *,
        text: bool = False,
        advance: Advance | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.size = size
        self.hash = content_hash
        self.algorithm = algorithm
        self.text = text
        self.advance = advance

    def chunks(self) -> Iterator[bytes]:
        hasher = self.algorithm.new()
        decoder = codecs.getincrementaldecoder("utf-8")() if self.text else None
        size = 0
        with open(self.path, "rb") as fh:
            chunk = fh.read(CHUNK_SIZE)
            while chunk:
                following = fh.read(CHUNK_SIZE)
                hasher.update(chunk)
                size += len(chunk)
                if decoder is not None:
                    self._check_text(decoder, chunk, final=not following)
                if not following:
                    self._check_whole(size, hasher.hexdigest())
                yield chunk
                if self.advance is not None:
                    self.advance(len(chunk))
                chunk = following
        if size == 0:
            self._check_whole(size, hasher.hexdigest())

    def _check_text(self, decoder: codecs.IncrementalDecoder, chunk: bytes, *, final: bool) -> None:
        try:
            decoder.decode(chunk, final)
        except UnicodeDecodeError as exc:
            raise SerializationError(f"{self.path} is not UTF-8 text ({exc})") from exc

    def _check_whole(self, size: int, content_hash: str) -> None:
        if size != self.size or content_hash != self.hash:
            raise IntegrityError(
                f"{self.path} changed while it was being stored ({size} bytes now, "
                f"{self.size} when hashed); nothing was saved, try again"
            )


def _kind(serializers: SerializerRegistry, serializer: str) -> Kind:
    """The kind tuple ``save`` records for plain content of ``serializer``."""
    if serializer not in STREAMED_SERIALIZERS:
        raise ValueError(f"only {STREAMED_SERIALIZERS} content streams, not {serializer!r}")
    encoded = serializers.get(serializer).encode(b"" if serializer == "bytes" else "")
    shape = None if encoded.shape is None else list(encoded.shape)
    return (encoded.serializer, encoded.version, encoded.dtype, shape, encoded.meta or None)


def save_file(
    saver: Saver,
    options: SaveOptions,
    local_path: str | os.PathLike[str],
    path: str,
    *,
    serializer: str,
    attrs: dict[str, Any] | None,
    overwrite: bool,
    known: tuple[int, str] | None = None,
    advance: Advance | None = None,
) -> None:
    """Store local file ``local_path`` at catalog ``path`` (:meth:`SQLBackend.save_file`).

    Content at or under the inline limit (or all content, without a blob
    store) is read whole and saved as ``save`` saves it; larger content is
    streamed to the blob store. ``known`` is the file's ``(size, hash)`` if
    the caller has hashed it already; ``advance(n)`` is called as bytes are
    stored.
    """
    if serializer not in STREAMED_SERIALIZERS:
        raise ValueError(f"save_file stores 'bytes' or 'str' content, not {serializer!r}")
    attrs = check_attrs(attrs)
    size = os.stat(local_path).st_size
    if saver.uploads is None or size <= options.inline_limit:
        value = _read_whole(local_path, serializer)
        saver.save([value], [path], options, overwrite=overwrite, attrs=attrs)
        if advance is not None:
            advance(size)
        return
    with saver.catalog.errors():
        algorithm = saver.catalog.hashing
        size, content_hash = known if known is not None else algorithm.of_file(local_path)
        text = serializer == "str"
        source = FileSource(local_path, size, content_hash, algorithm, text=text, advance=advance)
        batch = _file_batch(options.serializers, serializer, path, source)
        # force: upload even when the content already has a blob row elsewhere
        # (inline): the row then keeps its placement, the object is released,
        # and the catalog write never needs the bytes in memory.
        external = [Content(content_hash, source, size)]
        saver.write(batch, external, overwrite=overwrite, attrs=attrs, force=True)


def _read_whole(local_path: str | os.PathLike[str], serializer: str) -> bytes | str:
    """The value ``save`` is given for local file ``local_path``: its bytes, or its text."""
    with open(local_path, "rb") as fh:
        data = fh.read()
    if serializer != "str":
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SerializationError(f"{local_path} is not UTF-8 text ({exc})") from exc


def _file_batch(
    serializers: SerializerRegistry, serializer: str, path: str, source: FileSource
) -> Batch:
    """The batch of one local file saved at ``path``, its content to be uploaded from ``source``."""
    kind = _kind(serializers, serializer)
    batch = Batch()
    batch.add_kind(kind)
    batch.index = {paths.normalize_file(path): 0}
    batch.hashes, batch.sizes, batch.kinds = [source.hash], [source.size], [kind]
    batch.datas = [b""]  # never read: the blob row of uploaded content holds no bytes
    return batch


def _locate(catalog: Catalog, norm: str, resolve: Any) -> tuple[str, int, str]:
    """``(hash, size, store)`` of the content of file ``norm``, found by ``resolve``."""

    def work(conn: Connection) -> tuple[str, int, str | None] | None:
        row = resolve(conn, norm)
        if row is None:
            return None
        if row.kind != "file":
            raise is_a_directory(norm)
        store = conn.execute(_store_of_content(row.blob_hash)).scalar()
        return str(row.blob_hash), int(row.size), store

    found = catalog.read(work, snapshot=True)
    if found is None:
        raise not_found(norm)
    content_hash, size, store = found
    if store is None:
        raise NotFoundError(f"content of {norm!r} is missing from the catalog")
    return content_hash, size, store


def _inline_piece(catalog: Catalog, content_hash: str, start: int, length: int) -> bytes | None:
    stmt = sa.select(
        sa.func.substr(
            blobs.c.data,
            sa.bindparam("first", start + 1, type_=sa.Integer),
            sa.bindparam("length", length, type_=sa.Integer),
        )
    ).where(blobs.c.hash == content_hash, blobs.c.store == INLINE)
    piece = catalog.read(lambda conn: conn.execute(stmt).scalar())
    return None if piece is None else bytes(piece)


def _store_of_content(content_hash: str) -> sa.Select[str]:
    """Where content ``content_hash`` lives: ``'inline'`` or a blob store's name (no row: none)."""
    return sa.select(blobs.c.store).where(blobs.c.hash == content_hash)


def _store_of(catalog: Catalog, content_hash: str) -> str | None:
    """Where content ``content_hash`` lives now, read afresh (None: nowhere)."""
    return catalog.read(lambda conn: conn.execute(_store_of_content(content_hash)).scalar())


def iter_content(
    catalog: Catalog,
    store: BlobStore | None,
    path: str,
    *,
    chunk_size: int = CHUNK_SIZE,
    resolve: Any = tree.resolve,
) -> Iterator[bytes]:
    """The stored content of file ``path``, ``chunk_size`` bytes at a time, hash-checked.

    Raises :class:`~polystore.errors.IntegrityError` (before the last chunk)
    when the content read does not match the catalog's size and hash.
    ``resolve(conn, path)`` finds the file's row: the live catalog's by
    default, a snapshot's for a view of one.
    """
    norm = paths.normalize_file(path)
    content_hash, size, where = _locate(catalog, norm, resolve)
    hasher = catalog.hashing.new()
    done = 0
    held: bytes | None = None
    for piece in _pieces(catalog, store, norm, content_hash, size, where, chunk_size):
        hasher.update(piece)
        done += len(piece)
        if held is not None:
            yield held
        held = piece
    if done != size or hasher.hexdigest() != content_hash:
        raise IntegrityError(
            f"content of {norm!r} does not match the catalog ({done} bytes read, "
            f"{size} recorded; or its hash differs)"
        )
    if held is not None:
        yield held


class _Moved(Exception):
    """The content was not where its row said when a piece was read."""


def _pieces(
    catalog: Catalog,
    store: BlobStore | None,
    norm: str,
    content_hash: str,
    size: int,
    where: str,
    chunk_size: int,
) -> Iterator[bytes]:
    """Content ``content_hash`` of file ``norm``, stored at ``where``, a piece at a time.

    ``rebalance()`` may move the content between the catalog and the blob
    store while it is read: then the read goes on where it went, from the
    byte it had reached -- the same bytes, which the hash names. Once: an
    object its row still names but missing is damage (``IntegrityError``);
    content gone with its file, or moved a second time, is ``NotFoundError``.
    """
    position = 0
    followed = False
    while True:
        if where == INLINE:
            pieces = _inline_pieces(catalog, content_hash, size, chunk_size, position)
        else:
            pieces = _external_pieces(store, where, norm, content_hash, size, chunk_size, position)
        try:
            for piece in pieces:
                position += len(piece)
                yield piece
            return
        except _Moved:
            now = _store_of(catalog, content_hash)
            if now is None:  # no blob row: gone with its file
                raise NotFoundError(
                    f"content of {norm!r} was removed while it was read (the file changed); "
                    "try again"
                ) from None
            if now == where != INLINE:  # still named there, yet missing: damage
                raise ObjectGone.of(norm, content_hash, where) from None
            if followed:
                raise NotFoundError(
                    f"content of {norm!r} moved again while it was read; try again"
                ) from None
            followed, where = True, now  # (may be where it was: out and back in)


def _inline_pieces(
    catalog: Catalog, content_hash: str, size: int, chunk_size: int, position: int
) -> Iterator[bytes]:
    """Inline content ``content_hash`` from byte ``position``, a ``substr`` at a time."""
    while position < size:
        piece = _inline_piece(catalog, content_hash, position, chunk_size)
        if piece is None:
            raise _Moved
        if not piece:
            return
        yield piece
        position += len(piece)


def _external_pieces(
    store: BlobStore | None,
    where: str,
    norm: str,
    content_hash: str,
    size: int,
    chunk_size: int,
    position: int,
) -> Iterator[bytes]:
    """Content ``content_hash`` of file ``norm`` from blob store ``where``, from byte
    ``position``: one streamed read, or ranged reads from elsewhere than the start
    where the store makes them itself (a store that does not would read from the
    start for each)."""
    if store is None or where != store.name:
        here = "no blob store" if store is None else f"blob store {store.name!r}"
        raise NotFoundError(
            f"content of {norm!r} is in blob store {where!r}, but this backend has "
            f"{here}; open it with that store (blob_store=...)"
        )
    try:
        if position and type(store).read_range is not BlobStore.read_range:
            while position < size:
                piece = store.read_range(content_hash, position, min(size, position + chunk_size))
                if not piece:
                    return
                yield piece
                position += len(piece)
            return
        with store.open(content_hash) as reader:
            while position:  # (read past, once)
                skipped = reader.read(min(position, chunk_size))
                if not skipped:
                    return
                position -= len(skipped)
            while piece := reader.read(chunk_size):
                yield piece
    except NotFoundError:
        raise _Moved from None
