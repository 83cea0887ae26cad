"""Piece checksums: the check a load makes of external content.

A blob is named by the hash of its bytes (:mod:`polystore.hashing`), and that
stays its address. But SHA-256 runs on one core at about 1.7 GiB/s here
(BLAKE3 at about 4) and cannot be split, so checking it on every load made a
1 GiB load cost several times ``np.load``. Since revision 0007 the row of
every external blob written also records an XXH3-64 digest of each
:data:`PIECE` of its content, ``polystore_blobs.checksums``; a load checks
each piece right after reading it, while it is still in the CPU's cache (XXH3
runs at about 17 GiB/s a core here: a 512 MiB load spends some 30 ms on it). A damaged piece
passes only by a 1-in-2\\ :sup:`64` chance. It is a check against accidents --
bit rot, truncation, a file overwritten in place -- not against someone
forging content: that is what the hash is for, which ``fsck(verify=True)``
still checks for every object, and the recorded checksums against it.

Rows without checksums (written before revision 0007, or by another program)
are checked by their hash as before; so are rows whose checksums this version
cannot read.

The stored value is self-describing, so the digest and piece size can change
later::

    byte 0      format: 1 for XXH3-64 (seed 0)
    byte 1      log2 of the piece size (23: 8 MiB)
    then        the digest of each piece in order, 8 bytes big-endian each
"""

from __future__ import annotations

import struct
from typing import Any

import xxhash

__all__ = ["PIECE", "Checksummer", "Verifier", "decode"]

#: Bytes per checksummed piece.
PIECE = 8 << 20
_FORMAT_XXH3_64 = 1
_digest = xxhash.xxh3_64_intdigest


def _encode(digests: list[int]) -> bytes:
    header = bytes([_FORMAT_XXH3_64, PIECE.bit_length() - 1])
    return header + struct.pack(f">{len(digests)}Q", *digests)


def decode(value: Any, size: int) -> tuple[int, list[int]] | None:
    """``(piece size, digests)`` of a stored value for content of ``size`` bytes.

    ``None`` when the value is missing or not one this version can check (an
    unknown format, or a count of pieces that does not fit ``size``): the
    content is then checked by its hash.
    """
    if value is None:
        return None
    value = bytes(value)
    if len(value) < 2 or value[0] != _FORMAT_XXH3_64 or not 10 <= value[1] <= 40:
        return None
    piece = 1 << value[1]
    count = -(-size // piece)
    if len(value) != 2 + 8 * count:
        return None
    return piece, list(struct.unpack(f">{count}Q", value[2:]))


class Checksummer:
    """The stored value of content that arrives in chunks of any size."""

    def __init__(self) -> None:
        self._digests: list[int] = []
        self._hasher = xxhash.xxh3_64()
        self._filled = 0  # bytes of the current piece seen

    def update(self, chunk: Any) -> None:
        """Add the next bytes of the content."""
        with memoryview(chunk) as whole, whole.cast("B") as view:
            while view.nbytes:
                take = min(PIECE - self._filled, view.nbytes)
                self._hasher.update(view[:take])
                self._filled += take
                view = view[take:]
                if self._filled == PIECE:
                    self._digests.append(self._hasher.intdigest())
                    self._hasher.reset()
                    self._filled = 0

    def value(self) -> bytes:
        """The stored value of everything added so far."""
        if self._filled:
            return _encode([*self._digests, self._hasher.intdigest()])
        return _encode(self._digests)


class Verifier:
    """Checks content against stored checksums as a buffer fills, front to back.

    The reader calls :meth:`filled` with how much of the buffer holds content;
    each whole piece is checked then, while it is still in the cache.
    :meth:`bad_piece` checks the rest and names the first piece that failed.
    """

    def __init__(self, recorded: tuple[int, list[int]], buffer: Any) -> None:
        self.piece, self.digests = recorded
        self._view = memoryview(buffer).cast("B")
        self._done = 0  # bytes checked
        self._bad: int | None = None

    def filled(self, upto: int) -> None:
        """The buffer holds the content's first ``upto`` bytes."""
        while self._done + self.piece <= upto:
            self._check(self._done + self.piece)

    def _check(self, end: int) -> None:
        index = self._done // self.piece
        if self._bad is None and (
            index >= len(self.digests)
            or _digest(self._view[self._done : end]) != self.digests[index]
        ):
            self._bad = index
        self._done = end

    def bad_piece(self, size: int) -> int | None:
        """Index of the first piece of the ``size`` bytes read that fails its check, or None."""
        self.filled(size)
        if self._done < size:  # the last piece, cut short
            self._check(size)
        return self._bad

    def close(self) -> None:
        """Let go of the buffer."""
        self._view.release()
