"""Piece checksums: the check a load makes of external content, on several cores.

A blob is named by the SHA-256 of its bytes, and that stays its address. But
SHA-256 runs on one core at about 1.7 GiB/s here and cannot be split across
cores, so checking it on every load made a 1 GiB load cost several times
``np.load``. Since revision 0007 the row of every external blob written also
records the CRC-32 of each :data:`PIECE` of its content,
``polystore_blobs.checksums``; a load checks those instead, on worker threads,
each piece as soon as it has been read (``zlib.crc32`` lets go of the GIL and
runs at about 3.5 GiB/s a core here). A damaged byte, or any damage within 32
bits, changes its piece's CRC; ``fsck(verify=True)`` still checks every
object's SHA-256, and the checksums against it.

Rows without checksums (written before revision 0007, or by another program)
are checked by SHA-256 as before; so are rows whose checksums cannot be read.

The stored value is self-describing, so the piece size can change later::

    byte 0      format, 1: zlib's CRC-32
    byte 1      log2 of the piece size (23: 8 MiB)
    then        the CRC-32 of each piece in order, 4 bytes big-endian each
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["PIECE", "Checksummer", "Verifier", "checksums", "decode"]

#: Bytes per checksummed piece.
PIECE = 8 << 20
_FORMAT_CRC32 = 1
#: Content of more pieces than this is checked on worker threads.
_THREADED_PIECES = 2
_WORKERS = 2


def _encode(crcs: list[int]) -> bytes:
    header = bytes([_FORMAT_CRC32, PIECE.bit_length() - 1])
    return header + struct.pack(f">{len(crcs)}I", *crcs)


def decode(value: Any, size: int) -> tuple[int, list[int]] | None:
    """``(piece size, CRCs)`` of a stored value for content of ``size`` bytes.

    ``None`` when the value is missing or not one this version can check (an
    unknown format, or a count of pieces that does not fit ``size``): the
    content is then checked by its SHA-256.
    """
    if value is None:
        return None
    value = bytes(value)
    if len(value) < 2 or value[0] != _FORMAT_CRC32 or not 10 <= value[1] <= 40:
        return None
    piece = 1 << value[1]
    count = -(-size // piece)
    if len(value) != 2 + 4 * count:
        return None
    return piece, list(struct.unpack(f">{count}I", value[2:]))


def _pieces(view: memoryview, piece: int) -> Iterator[memoryview]:
    for start in range(0, view.nbytes, piece):
        yield view[start : start + piece]


def checksums(data: Any) -> bytes:
    """The stored value for content ``data`` (a buffer), checksummed on threads when large."""
    with memoryview(data) as whole, whole.cast("B") as view:
        if view.nbytes <= _THREADED_PIECES * PIECE:
            return _encode([zlib.crc32(p) for p in _pieces(view, PIECE)])
        with ThreadPoolExecutor(_WORKERS) as pool:
            return _encode(list(pool.map(zlib.crc32, _pieces(view, PIECE))))


class Checksummer:
    """The stored value of content that arrives in chunks of any size."""

    def __init__(self) -> None:
        self._crcs: list[int] = []
        self._crc = 0
        self._filled = 0  # bytes of the current piece seen

    def update(self, chunk: Any) -> None:
        """Add the next bytes of the content."""
        with memoryview(chunk) as whole, whole.cast("B") as view:
            while view.nbytes:
                take = min(PIECE - self._filled, view.nbytes)
                self._crc = zlib.crc32(view[:take], self._crc)
                self._filled += take
                view = view[take:]
                if self._filled == PIECE:
                    self._crcs.append(self._crc)
                    self._crc = self._filled = 0

    def value(self) -> bytes:
        """The stored value of everything added so far."""
        crcs = [*self._crcs, self._crc] if self._filled else self._crcs
        return _encode(crcs)


class Verifier:
    """Checks content against stored checksums while it is being read.

    The reader fills a buffer front to back and calls :meth:`filled` with how
    much is in; each whole piece is handed to a worker thread at once (for
    content of more than a few pieces), so checking overlaps reading.
    :meth:`bad_piece` waits for the last piece and names the first that does
    not match.
    """

    def __init__(self, recorded: tuple[int, list[int]], buffer: Any) -> None:
        self.piece, self.crcs = recorded
        self._view = memoryview(buffer).cast("B")
        self._done = 0  # bytes handed out
        self._results: list[Future[int] | int] = []
        self._pool = ThreadPoolExecutor(_WORKERS) if len(self.crcs) > _THREADED_PIECES else None

    def filled(self, upto: int) -> None:
        """The buffer holds the content's first ``upto`` bytes."""
        while self._done + self.piece <= upto:
            self._hand_out(self._done + self.piece)

    def _hand_out(self, end: int) -> None:
        piece = self._view[self._done : end]
        if self._pool is None:
            self._results.append(zlib.crc32(piece))
        else:
            self._results.append(self._pool.submit(zlib.crc32, piece))
        self._done = end

    def bad_piece(self, size: int) -> int | None:
        """Index of the first piece of the ``size`` bytes read that fails its check, or None."""
        try:
            self.filled(size)
            if self._done < size:  # the last piece, cut short
                self._hand_out(size)
            got = [r if isinstance(r, int) else r.result() for r in self._results]
        finally:
            self.close()
        for i, (have, want) in enumerate(zip(got, self.crcs, strict=False)):
            if have != want:
                return i
        return None if len(got) == len(self.crcs) else min(len(got), len(self.crcs))

    def close(self) -> None:
        """Stop the workers and let go of the buffer."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._view.release()
