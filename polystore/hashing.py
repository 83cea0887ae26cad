"""Content hashes: the name every stored content goes by, and the catalog's algorithm.

Content is deduplicated, stored and found by a 256-bit hash of its bytes,
written as 64 lowercase hex digits (``polystore_blobs.hash``, an external
object's key). Each catalog uses one algorithm for all its content, recorded
in ``polystore_identity.hash_algorithm`` (revision 0010):

* ``blake3`` -- catalogs made since revision 0010. BLAKE3 hashes about 2.5
  times as fast as SHA-256 on one core here (16 MiB: 3.6 ms against 9.4 ms):
  reads that hash every byte (``iter_content``, ``fsck(verify=True)``) take
  half the time, and saves half the CPU to hash (docs/performance.rst). For
  values of a few KiB the two are level.
* ``sha256`` -- catalogs that held content before revision 0010: their
  content keeps the names it was stored under.

An algorithm never changes for a catalog once it holds content, so every hash
in it (rows, external objects, snapshots) is of one kind. Hashes of two
catalogs are comparable only when both use the same algorithm.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import blake3

from polystore.errors import SchemaVersionError
from polystore.serializers import Buffer

__all__ = ["ALGORITHMS", "BLAKE3", "NEW_CATALOGS", "SHA256", "HashAlgorithm", "Hasher", "named"]


class Hasher(Protocol):
    """A running hash: fed a piece at a time, then read."""

    def update(self, data: Buffer, /) -> object: ...

    def hexdigest(self) -> str: ...


@dataclass(frozen=True)
class HashAlgorithm:
    """One algorithm content may be named by."""

    #: As ``polystore_identity.hash_algorithm`` records it.
    name: str
    #: A running hash, empty.
    new: Callable[[], Hasher]
    #: People's name for it, for messages and docs.
    title: str

    def of(self, data: Buffer) -> str:
        """The hex hash of the bytes of ``data``, whatever the format of its items.

        A serializer may hand over any C-contiguous buffer (a ``memoryview`` of
        float64, an array): hashlib hashes its bytes as they are, BLAKE3 wants
        them as bytes, so it is given a byte view of them.
        """
        hasher = self.new()
        try:
            hasher.update(data)
        except BufferError:  # items that are not bytes (BLAKE3): the same bytes, as bytes
            with memoryview(data) as view, view.cast("B") as as_bytes:
                hasher.update(as_bytes)
        return hasher.hexdigest()

    def of_each(self, datas: Sequence[Buffer]) -> list[str]:
        """The hex hash of each buffer, in order, on this thread.

        Both algorithms let go of the GIL while they hash, but for buffers of a
        few KiB taking it back costs more than a second thread gains.
        """
        of = self.of
        return [of(data) for data in datas]

    def of_file(
        self, path: str | os.PathLike[str], advance: Callable[[int], None] | None = None
    ) -> tuple[int, str]:
        """Size and hex hash of local file ``path``, read a piece at a time.

        ``advance(n)`` is called after each piece of ``n`` bytes.
        """
        hasher = self.new()
        size = 0
        with open(path, "rb", buffering=0) as fh, memoryview(bytearray(_FILE_PIECE)) as view:
            while n := fh.readinto(view):
                hasher.update(view[:n])
                size += n
                if advance is not None:
                    advance(n)
        return size, hasher.hexdigest()

    def __str__(self) -> str:
        return self.title


#: Bytes of a local file read at a time when hashing it.
_FILE_PIECE = 8 << 20


SHA256 = HashAlgorithm("sha256", hashlib.sha256, "SHA-256")
BLAKE3 = HashAlgorithm("blake3", blake3.blake3, "BLAKE3")
#: Every algorithm this polystore reads, by name.
ALGORITHMS: dict[str, HashAlgorithm] = {a.name: a for a in (SHA256, BLAKE3)}
#: What a catalog made now uses (revision 0010 records it).
NEW_CATALOGS = BLAKE3


def named(name: object) -> HashAlgorithm:
    """The algorithm ``polystore_identity`` names; unknown ones are refused."""
    found = ALGORITHMS.get(name) if isinstance(name, str) else None
    if found is None:
        raise SchemaVersionError(
            f"the catalog names its content by {name!r}, a hash algorithm this polystore "
            f"does not know (it knows {', '.join(ALGORITHMS)}): a newer polystore made it; "
            "upgrade polystore. Nothing was changed."
        )
    return found
