"""Content read back from where it lives, and checked against the catalog's record.

Inline content is checked against its recorded size (and its hash with
``verify_inline``); external content is streamed from the blob store into one
buffer and always checked, since other programs can write the directory or
bucket it sits in: by its piece checksums where its row has them
(:mod:`~polystore.backends.sql.checksums`), by its hash otherwise. Any
mismatch raises :class:`~polystore.errors.IntegrityError`.
"""

from __future__ import annotations

import enum
import io
from functools import partial
from typing import Any, NamedTuple

from sqlalchemy import Connection

from polystore.backends.sql.catalog import Catalog
from polystore.backends.sql.checksums import Checksummer, Verifier, decode
from polystore.backends.sql.content import INLINE, stored_checksums
from polystore.backends.sql.inline import WHOLE, ContentGone, InlineReader
from polystore.blobs.base import CHUNK_SIZE, BlobReader, BlobStore
from polystore.errors import IntegrityError, NotFoundError
from polystore.hashing import HashAlgorithm

__all__ = [
    "ATTEMPTS",
    "UNKNOWN",
    "ContentReader",
    "Digest",
    "ObjectGone",
    "digest",
    "read_again",
]


class ObjectGone(IntegrityError):
    """The external object a blob row named is not in its store.

    Damage -- unless the row was read just before the content moved into the
    catalog (``rebalance()``) or the file changed and ``gc()`` took the
    object: a read of the file goes again (:func:`read_again`), and raises
    this if the same object is missing again.
    """

    def __init__(self, message: str, content_hash: str) -> None:
        super().__init__(message)
        #: The hash of the missing object.
        self.content_hash = content_hash

    @classmethod
    def of(cls, path: str, content_hash: str, store_name: str) -> ObjectGone:
        """The error for file ``path``, whose object ``content_hash`` is not in ``store_name``."""
        return cls(
            f"content of {path!r} is missing: blob {content_hash} is not in blob store "
            f"{store_name!r}",
            content_hash,
        )


#: Reads of a file (or a batch) whose content keeps moving (large inline content
#: leaving the catalog, external objects taken by ``gc()``) before the last
#: :class:`~.inline.ContentGone` or :class:`ObjectGone` is raised.
ATTEMPTS = 5


def read_again(
    moved: ContentGone | ObjectGone, attempts: int, missed: frozenset[str]
) -> tuple[int, frozenset[str]]:
    """After a read met content that moved: the attempts left, and the hashes of
    the external objects found missing so far; or raise ``moved`` when the read
    must stop.

    The file is read again, up to :data:`ATTEMPTS` times in all: its large
    inline content may have left the catalog (:class:`~.inline.ContentGone`),
    its content may have moved into the catalog (``rebalance()``), or the file
    may have changed and ``gc()`` taken the object its row named -- as often
    as it changed. Only the same object missing twice is damage.
    """
    if isinstance(moved, ObjectGone):
        if moved.content_hash in missed:
            raise moved
        missed |= {moved.content_hash}
    attempts -= 1
    if not attempts:
        raise moved
    return attempts, missed


class Unknown(enum.Enum):
    """The type of :data:`UNKNOWN`."""

    UNKNOWN = "unknown"


#: A blob's piece checksums not read with its file's row: looked up by hash.
UNKNOWN = Unknown.UNKNOWN


class Digest(NamedTuple):
    """What :func:`digest` found of a stored object."""

    size: int
    #: Hex hash of the bytes, by the algorithm :func:`digest` was given.
    hash: str
    #: Their piece checksums, as a blob row records them (:mod:`.checksums`).
    checksums: bytes


def digest(store: BlobStore, content_hash: str, algorithm: HashAlgorithm) -> Digest | None:
    """Size, hash and piece checksums of the stored object, streamed through one buffer.

    ``None`` when there is no such object.
    """
    try:
        reader = store.open(content_hash)
    except NotFoundError:
        return None
    hasher = algorithm.new()
    summer = Checksummer()
    size = 0
    buffer = bytearray(min(CHUNK_SIZE, max(reader.size, 1)))
    with reader, memoryview(buffer) as view:
        while n := reader.readinto(view):
            hasher.update(view[:n])
            summer.update(view[:n])
            size += n
    return Digest(size, hasher.hexdigest(), summer.value())


class ContentReader:
    """Reads a file's content, inline or from the blob store, and checks it."""

    def __init__(
        self, store: BlobStore | None, catalog: Catalog, *, verify_inline: bool = False
    ) -> None:
        self.store = store
        #: Where the blob rows are, with their piece checksums.
        self.catalog = catalog
        #: Hash inline content on every read too (external content is always checked).
        self.verify_inline = verify_inline

    def content(
        self,
        store: str | None,
        size: int,
        content_hash: str,
        data: Any,
        path: str,
        *,
        into: str = "bytearray",
        checksums: bytes | Unknown | None = UNKNOWN,
    ) -> Any:
        """The verified content of the file at ``path`` (inline ``data`` or from ``store``).

        Inline content is checked against the recorded size (and hash, with
        ``verify_inline``); external content is read from the store into one
        buffer and hashed. Any mismatch raises
        :class:`~polystore.errors.IntegrityError`. ``into``: the buffer the
        caller's serializer wants external content in, see :meth:`read`;
        ``checksums``: the blob row's, if read with the file's row.
        """
        if store is None:
            raise NotFoundError(f"content of {path!r} is missing from the catalog")
        if store == INLINE:
            if data is None:
                if size <= WHOLE:
                    raise NotFoundError(f"content of {path!r} is missing from the catalog")
                data = self.read_inline(content_hash, int(size), path, into=into)
            view = memoryview(data)
            if view.nbytes != size:
                raise IntegrityError(
                    f"content of {path!r} is {view.nbytes} bytes inline, the catalog records {size}"
                )
            if self.verify_inline and self.catalog.hashing.of(view) != content_hash:
                raise IntegrityError(
                    f"content of {path!r} does not match its hash {content_hash} (stored inline)"
                )
            return data
        if self.store is None or store != self.store.name:
            here = "no blob store" if self.store is None else f"blob store {self.store.name!r}"
            raise NotFoundError(
                f"content of {path!r} is in blob store {store!r}, but this backend has "
                f"{here}; open it with that store (blob_store=...)"
            )
        return self.read(content_hash, int(size), path, into=into, checksums=checksums)

    def read_inline(
        self, content_hash: str, size: int, path: str, *, into: str = "bytearray"
    ) -> Any:
        """Inline content over :data:`~.inline.WHOLE` bytes, read in pieces (:mod:`.inline`).

        Raises :class:`~.inline.ContentGone` if it has left the catalog since
        its file's row was read.
        """

        def work(conn: Connection) -> Any:
            with InlineReader(conn, content_hash) as reader:
                if reader.size != size:
                    raise IntegrityError(
                        f"content of {path!r} is {reader.size} bytes inline, "
                        f"the catalog records {size}"
                    )
                return _read_all(reader, size, into, None)[0]

        return self.catalog.read(work, snapshot=True)

    def read(
        self,
        content_hash: str,
        size: int,
        path: str,
        *,
        into: str = "bytearray",
        checksums: bytes | Unknown | None = UNKNOWN,
    ) -> Any:
        """The external object of ``content_hash`` in a new buffer, verified.

        Checked by the blob's piece checksums where its row records them
        (:mod:`~polystore.backends.sql.checksums`, each piece as soon as it is
        in the buffer), else by its hash. ``checksums`` is the row's value
        where the caller read it (one query less), else it is looked up.
        ``into`` says which buffer, so
        that no byte is zeroed or copied for nothing:

        * ``"bytearray"``: writeable, zeroed when made (any serializer);
        * ``"bytes"``: from the reader's own ``readall`` where it has one (a
          local file, S3), allocated once, never zeroed, and returned by the
          bytes serializer as it is (a 16 MiB object: 53 to 23 ms a load here);
        * ``"ndarray"``: a numpy ``uint8`` array, never zeroed, that an array
          decoded from it views without a copy.
        """
        assert self.store is not None
        if checksums is UNKNOWN:
            checksums = self.catalog.read(partial(stored_checksums, content_hash=content_hash))
        recorded = decode(checksums, size)
        try:
            reader = self.store.open(content_hash)
        except NotFoundError:
            raise ObjectGone.of(path, content_hash, self.store.name) from None
        with reader:
            if reader.size != size:
                raise IntegrityError(
                    f"content of {path!r} is {reader.size} bytes in blob store "
                    f"{self.store.name!r}, the catalog records {size}"
                )
            data, bad = _read_all(reader, size, into, recorded)
        if len(data) != size:
            raise IntegrityError(
                f"content of {path!r} changed size while being read from blob store "
                f"{self.store.name!r}"
            )
        if recorded is None:
            if self.catalog.hashing.of(data) != content_hash:
                raise IntegrityError(
                    f"content of {path!r} does not match its hash {content_hash} "
                    f"(blob store {self.store.name!r})"
                )
        elif bad is not None:
            piece = recorded[0]
            raise IntegrityError(
                f"content of {path!r} does not match its checksum at bytes "
                f"{bad * piece}-{min(size, (bad + 1) * piece) - 1} (blob {content_hash} in "
                f"blob store {self.store.name!r}); fsck(verify=True) checks every blob"
            )
        return data


#: Where an array read from a file starts in its buffer. The kernel copies
#: from the page cache at half speed here (AMD EPYC) when source and target
#: are both page-aligned: a 512 MiB load from the page cache took 0.149 s into
#: a page-aligned buffer and 0.078 s 64 bytes in (``np.load`` 0.093 s, whose
#: data starts 128 bytes into its file). 64 keeps every dtype aligned.
_SHIFT = 64


def _read_all(
    reader: BlobReader, size: int, into: str, recorded: tuple[int, list[int]] | None
) -> tuple[Any, int | None]:
    """All of ``reader`` (one byte past ``size`` at most, if it holds more).

    With ``recorded`` checksums, also the index of the first piece that fails
    them (None if all pass); pieces are checked while the buffer fills.
    """
    if into == "bytes" and type(reader).readall is not io.RawIOBase.readall:
        data = reader.readall()
        if recorded is None or len(data) != size:
            return data, None
        return data, Verifier(recorded, data).bad_piece(size)
    # One spare byte: content that grew shows as too long.
    if into == "ndarray":
        import numpy as np

        array = np.empty(_SHIFT + size + 1, np.uint8)
        buffer: Any = array[_SHIFT:]
        target = memoryview(array.data)[_SHIFT:]
    else:
        buffer = bytearray(size + 1)
        target = memoryview(buffer)
    verifier = None if recorded is None else Verifier(recorded, target[:size])
    done = 0
    try:
        with target as view:
            while done <= size:
                n = reader.readinto(view[done : done + CHUNK_SIZE])
                if not n:
                    break
                done += n
                if verifier is not None:
                    verifier.filled(min(done, size))
        bad = None if verifier is None or done != size else verifier.bad_piece(size)
    finally:
        if verifier is not None:
            verifier.close()
    if into == "ndarray":
        return buffer[:done], bad
    del buffer[done:]
    return buffer, bad
