"""Large content hashed and written at once, for stores that can stage it.

A blob's name is the hash of its bytes (:mod:`polystore.hashing`), and the
upload protocol (:mod:`.uploads`) commits an intent naming that hash before
the object may appear under it. Done in that order, a 1 GiB save hashed (for
about 0.6 s on one core with SHA-256, 0.25 s with BLAKE3), then wrote and
fsynced. A store with :attr:`~polystore.blobs.BlobStore.can_stage` lets the
two overlap: a worker thread writes the content to the store's staging area
(and checksums each piece as it goes) while this thread hashes it; both let go
of the GIL. The upload then only renames the staged file under its hash
(:meth:`~polystore.blobs.BlobStore.put_staged`), after the intent commits, so
the protocol is unchanged. Staged content nobody renamed is discarded by the
save, or swept by ``gc()`` after the grace period if the writer died.

Content that turns out to be stored already was written once for nothing:
the price of not knowing the hash before the write starts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from polystore.backends.sql.checksums import Checksummer
from polystore.blobs.base import CHUNK_SIZE, BlobStore, Staging
from polystore.hashing import HashAlgorithm
from polystore.serializers import Buffer

__all__ = ["PARALLEL_MIN", "STAGE_OVER", "Prestaged", "discard", "hash_and_stage", "hash_batch"]

#: Content up to this size (one checksummed piece) is hashed, then uploaded:
#: below it a thread costs more than the overlap gains.
STAGE_OVER = 8 << 20
#: Contents of a batch this large or larger are hashed on worker threads, a
#: few at once (both hashes let go of the GIL); smaller ones on the caller's.
PARALLEL_MIN = 1 << 20
_WORKERS = 4


@dataclass(frozen=True)
class Prestaged:
    """In-memory content already written to a store's staging area."""

    data: Buffer
    staging: Staging
    #: Its piece checksums (:mod:`.checksums`), for its blob row.
    checksums: bytes

    def chunks(self) -> Iterator[Buffer]:
        """The content, for an upload that cannot use the staged copy (a
        :class:`~.content.ChunkSource`)."""
        view = memoryview(self.data).cast("B")
        for start in range(0, view.nbytes, CHUNK_SIZE):
            yield view[start : start + CHUNK_SIZE]


def hash_and_stage(
    store: BlobStore, data: Buffer, algorithm: HashAlgorithm
) -> tuple[str, Prestaged]:
    """The hash of ``data``, computed while a worker stages it in ``store``."""
    view = memoryview(data).cast("B")
    summer = Checksummer()

    def pieces() -> Iterator[memoryview]:
        for start in range(0, view.nbytes, CHUNK_SIZE):
            piece = view[start : start + CHUNK_SIZE]
            yield piece
            summer.update(piece)  # just written, still in the cache

    with ThreadPoolExecutor(1, thread_name_prefix="polystore-stage") as pool:
        staged = pool.submit(store.stage, pieces(), view.nbytes)
        try:
            content_hash = algorithm.of(view)
        except BaseException:
            with contextlib.suppress(Exception):
                store.discard(staged.result())
            raise
        staging = staged.result()
    return content_hash, Prestaged(data, staging, summer.value())


def discard(store: BlobStore | None, staged: Iterable[Prestaged]) -> None:
    """Remove from ``store`` what is still staged of ``staged``."""
    if store is not None:
        for prestaged in staged:
            store.discard(prestaged.staging)


def hash_batch(
    datas: Sequence[Buffer],
    sizes: Sequence[int],
    store: BlobStore | None,
    over: int,
    algorithm: HashAlgorithm,
) -> tuple[list[str], dict[int, Prestaged]]:
    """The hash of every content of a batch, and what was staged on the way.

    Content of more than ``over`` and :data:`STAGE_OVER` bytes is staged in
    ``store`` while it is hashed, where the store can stage. Contents of
    :data:`PARALLEL_MIN` bytes or more are hashed (and staged) a few at once,
    on worker threads; the rest on this one. Returns the hashes, in order, and
    ``entry -> Prestaged``; on failure nothing stays staged.
    """
    can_stage = store is not None and store.can_stage
    stage_over = max(over, STAGE_OVER)
    big = [
        i
        for i, size in enumerate(sizes)
        if size >= PARALLEL_MIN or (can_stage and size > stage_over)
    ]
    if not big:
        return algorithm.of_each(datas), {}

    def one(i: int) -> tuple[str, Prestaged | None]:
        if can_stage and sizes[i] > stage_over:
            assert store is not None
            return hash_and_stage(store, datas[i], algorithm)
        return algorithm.of(datas[i]), None

    done: dict[int, tuple[str, Prestaged | None]] = {}
    failure: BaseException | None = None
    if len(big) == 1:
        done[big[0]] = one(big[0])  # (a failed staging leaves nothing staged)
    else:
        with ThreadPoolExecutor(min(_WORKERS, len(big)), "polystore-hash") as pool:
            futures = [(i, pool.submit(one, i)) for i in big]
            for i, future in futures:  # every one, even after a failure: each may have staged
                try:
                    done[i] = future.result()
                except BaseException as exc:  # noqa: BLE001 -- raised once the others are discarded
                    failure = failure or exc
    staged = {i: p for i, (_, p) in done.items() if p is not None}
    if failure is not None:
        discard(store, staged.values())
        raise failure
    rest = [i for i in range(len(datas)) if i not in done]
    hashes = dict(zip(rest, algorithm.of_each([datas[i] for i in rest]), strict=True))
    hashes.update((i, h) for i, (h, _) in done.items())
    return [hashes[i] for i in range(len(datas))], staged
