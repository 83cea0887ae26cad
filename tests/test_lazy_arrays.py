"""Lazy arrays: ``open_array`` on the SQL, disk and memory backends.

Every selection is checked against numpy indexing the loaded array. What a
selection costs is counted, never timed: the bytes the database is asked to
cut out, the bytes a blob store hands back, the bytes ``pread`` returns.
"""

from __future__ import annotations

import os
import pickle
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from polystore import (
    ConflictError,
    DiskBackend,
    FileManager,
    IsADirectoryError,
    MemoryBackend,
    NotFoundError,
    SerializationError,
    SQLBackend,
    StorageBackend,
    UnsupportedOperationError,
)
from polystore.arrays import LazyArray
from polystore.blobs import LocalBlobStore

RNG = np.random.default_rng(7)
ARRAYS = {
    "c3d": RNG.random((20, 30, 7)),
    "fortran": np.asfortranarray(RNG.random((13, 9, 5))),
    "int16": np.arange(5000, dtype=np.int16),
    "scalar": np.array(3.5),
    "empty": np.zeros((0, 4), dtype=np.float32),
    "wide": RNG.integers(0, 255, (6, 40000), dtype=np.uint8),
    "records": np.array([(1, 2.0), (3, 4.0), (5, 6.0)], dtype=[("a", "<i4"), ("b", "<f8")]),
}
KEYS: list[Any] = [
    ...,
    (),
    0,
    -1,
    slice(2, 5),
    slice(None, None, -2),
    (slice(1, 8, 3), 2),
    (..., 1),
    (None, 3),
    (slice(None), None, slice(2, 4)),
    (2, slice(None), slice(1, 6, 2)),
    slice(None, None, 1000),
    slice(5, 2),
    (slice(1, 3), slice(None, None, 7000)),
    np.int64(1),
]


def _random_keys(shape: tuple[int, ...], count: int, seed: int) -> Iterator[tuple[Any, ...]]:
    rand = random.Random(seed)
    for _ in range(count if shape else 0):
        key: list[Any] = []
        for dim in shape[: rand.randint(1, len(shape))]:
            if dim and rand.random() < 0.3:
                key.append(rand.randrange(-dim, dim))
            else:
                start, stop = rand.randrange(-dim - 2, dim + 2), rand.randrange(-dim - 2, dim + 2)
                key.append(slice(start, stop, rand.choice([1, 1, 2, 3, -1, -3, 17, 5000])))
        yield tuple(key)


_PG = pytest.mark.postgres


def _url(request: pytest.FixtureRequest, kind: str) -> str:
    return str(request.getfixturevalue("pg_url" if kind.startswith("postgresql") else "sqlite_url"))


_STORED = [
    "sqlite-inline",
    "sqlite-blob-store",
    pytest.param("postgresql-inline", marks=_PG),
    pytest.param("postgresql-blob-store", marks=_PG),
    "disk",
]


def _open(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StorageBackend]:
    kind = request.param
    if kind == "disk":
        yield DiskBackend(tmp_path / "disk")
    elif kind == "memory":
        yield MemoryBackend()
    else:
        limit = 1 << 20 if kind.endswith("inline") else 0
        store = LocalBlobStore(tmp_path / "blobs")
        sql = SQLBackend(_url(request, kind), blob_store=store, inline_limit=limit)
        yield sql
        sql.close()


@pytest.fixture(params=[*_STORED, "memory"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StorageBackend]:
    yield from _open(request, tmp_path)


@pytest.fixture(params=_STORED)
def stored(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StorageBackend]:
    """A backend whose arrays are read from storage (not a MemoryBackend)."""
    yield from _open(request, tmp_path)


def test_every_selection_is_what_numpy_gives(backend: StorageBackend) -> None:
    for name, array in ARRAYS.items():
        path = f"arrays/{name}.npy"
        backend.save(array, path)
        lazy = backend.open_array(path)
        assert (lazy.shape, lazy.dtype, lazy.ndim) == (array.shape, array.dtype, array.ndim)
        assert (lazy.size, lazy.nbytes) == (array.size, array.nbytes)
        whole = np.asarray(lazy)
        assert whole.dtype == array.dtype
        np.testing.assert_array_equal(whole, array)
        for key in [*KEYS, *_random_keys(array.shape, 150, seed=len(name))]:
            try:
                expected = array[key]
            except IndexError:
                with pytest.raises(IndexError):
                    lazy[key]
                continue
            got = lazy[key]
            assert isinstance(got, np.ndarray), (name, key)
            assert got.shape == np.shape(expected), (name, key)
            np.testing.assert_array_equal(got, expected, err_msg=f"{name}[{key!r}]")


def test_results_are_arrays_of_their_own(backend: StorageBackend) -> None:
    array = np.arange(24, dtype=np.int32).reshape(4, 6)
    backend.save(array, "a.npy")
    lazy = backend.open_array("a.npy")
    part = lazy[1:3]
    part[:] = -1  # writeable, and writing it changes nothing stored
    np.testing.assert_array_equal(lazy[1:3], array[1:3])
    np.testing.assert_array_equal(backend.load("a.npy"), array)
    assert len(lazy) == 4
    assert repr(lazy) == "LazyArray('a.npy', shape=(4, 6), dtype=int32)"
    assert np.asarray(lazy, dtype=np.float64).dtype == np.float64


def test_errors(backend: StorageBackend) -> None:
    backend.save(np.arange(10), "d/a.npy")
    backend.save(np.array(1.0), "d/scalar.npy")
    with pytest.raises(NotFoundError):
        backend.open_array("d/missing.npy")
    with pytest.raises(IsADirectoryError):
        backend.open_array("d")
    lazy = backend.open_array("d/a.npy")
    with pytest.raises(IndexError, match="basic indexing"):
        lazy[[1, 2]]
    with pytest.raises(IndexError, match="basic indexing"):
        lazy[np.array([True] * 10)]
    with pytest.raises(IndexError, match="out of bounds"):
        lazy[10]
    with pytest.raises(IndexError, match="too many indices"):
        lazy[1, 2]
    with pytest.raises(IndexError, match="single ellipsis"):
        lazy[..., ...]
    with pytest.raises(TypeError, match="unsized"):
        len(backend.open_array("d/scalar.npy"))


def test_what_is_not_an_array_is_refused(backend: StorageBackend) -> None:
    if isinstance(backend, DiskBackend):
        backend.save(b"raw bytes", "d/data.bin")
        backend.save(np.arange(3), "d/a.npy")
        with open(backend.root / "d" / "broken.npy", "wb") as fh:
            fh.write(b"not an npy header")
        with pytest.raises(SerializationError, match=r"not a readable \.npy"):
            backend.open_array("d/broken.npy")
    else:
        backend.save(b"raw bytes", "d/data.bin")
        backend.save({"a": 1}, "d/doc.json")
        with pytest.raises(SerializationError, match=r"not a numpy array|does not hold"):
            backend.open_array("d/doc.json")
    with pytest.raises(SerializationError):
        backend.open_array("d/data.bin")


def test_file_manager_opens_arrays_on_a_named_backend(tmp_path: Path) -> None:
    manager = FileManager({"disk": DiskBackend(tmp_path), "mem": MemoryBackend()})
    manager.save(np.arange(12.0).reshape(3, 4), "x.npy", backend="mem")
    np.testing.assert_array_equal(manager.open_array("/x.npy", backend="mem")[1], [4, 5, 6, 7])
    with pytest.raises(NotFoundError):
        manager.open_array("x.npy", backend="disk")


def test_a_backend_without_lazy_arrays_says_so() -> None:
    class Plain(MemoryBackend):
        open_array = StorageBackend.open_array

    with pytest.raises(UnsupportedOperationError, match="open_array"):
        Plain().open_array("x")


# -- what a selection reads -------------------------------------------------------------


class _Reads:
    """Bytes read, by every way a lazy array can read them."""

    def __init__(self) -> None:
        self.bytes = 0
        self.requests = 0

    def add(self, n: int) -> None:
        self.bytes += n
        self.requests += 1


@pytest.fixture
def reads(stored: StorageBackend, monkeypatch: pytest.MonkeyPatch) -> _Reads:
    backend = stored
    counted = _Reads()
    if isinstance(backend, SQLBackend):

        @sa.event.listens_for(backend.engine, "before_cursor_execute")
        def record(conn: Any, cursor: Any, text: str, params: Any, *args: Any) -> None:
            if "substr(polystore_blobs.data" in text:
                values = params.values() if isinstance(params, dict) else params
                counted.add([v for v in values if isinstance(v, int)][-1])
            elif "polystore_blobs.data" in text:
                raise AssertionError(f"a lazy array selected whole content: {text}")

        store = backend.blob_store
        assert store is not None
        read_range = store.read_range

        def counting(content_hash: str, start: int, end: int) -> bytes:
            data = read_range(content_hash, start, end)
            counted.add(len(data))
            return data

        monkeypatch.setattr(store, "read_range", counting)
        monkeypatch.setattr(store, "open", None)  # nothing reads a whole object
    else:
        preadv = os.preadv

        def counting_preadv(fd: int, buffers: list[Any], offset: int) -> int:
            n = preadv(fd, buffers, offset)
            counted.add(n)
            return n

        monkeypatch.setattr(os, "preadv", counting_preadv)
    return counted


def test_a_few_rows_read_only_their_bytes(stored: StorageBackend, reads: _Reads) -> None:
    array = RNG.random((500, 300))  # 1.2 MB
    stored.save(array, "big.npy")
    lazy = stored.open_array("big.npy")
    np.testing.assert_array_equal(lazy[100:104], array[100:104])
    assert (reads.bytes, reads.requests) == (4 * 300 * 8, 1)
    np.testing.assert_array_equal(lazy[7, 10:20], array[7, 10:20])
    assert reads.bytes == 4 * 300 * 8 + 10 * 8


def test_distant_pieces_are_read_apart_and_close_ones_together(
    stored: StorageBackend, reads: _Reads
) -> None:
    array = RNG.integers(0, 1000, (40, 20000), dtype=np.int32)  # rows of 80,000 bytes
    stored.save(array, "wide.npy")
    lazy = stored.open_array("wide.npy")
    # Two columns of every row: 40 runs of 8 bytes, too far apart to read together.
    np.testing.assert_array_equal(lazy[:, 5:7], array[:, 5:7])
    assert (reads.bytes, reads.requests) == (40 * 8, 40)
    # Every 1000th element of one row: the gaps are small, so one request.
    before = reads.bytes
    np.testing.assert_array_equal(lazy[3, ::1000], array[3, ::1000])
    assert reads.requests == 41
    assert reads.bytes - before == (19 * 1000 + 1) * 4


def test_a_strided_selection_with_large_gaps_reads_each_element_alone(
    stored: StorageBackend, reads: _Reads
) -> None:
    array = np.arange(200_000, dtype=np.float64)
    stored.save(array, "long.npy")
    lazy = stored.open_array("long.npy")
    np.testing.assert_array_equal(lazy[::50_000], array[::50_000])
    assert (reads.bytes, reads.requests) == (4 * 8, 4)


# -- what a view sees ---------------------------------------------------------------------


def test_a_view_reads_what_the_path_held_when_it_was_opened(backend: StorageBackend) -> None:
    """Never a mix of two versions: the old content while it is stored, then an error."""
    backend.save(np.zeros(1000), "a.npy")
    lazy = backend.open_array("a.npy")
    backend.save(np.ones(1000), "a.npy")
    if isinstance(backend, SQLBackend) and backend.inline_limit:
        # Inline content goes with its last reference, in the overwrite's transaction.
        with pytest.raises(NotFoundError, match="open the array again"):
            lazy[:5]
    else:
        np.testing.assert_array_equal(lazy[:5], np.zeros(5))
    np.testing.assert_array_equal(backend.open_array("a.npy")[:5], np.ones(5))


def test_a_view_of_collected_content_says_so(catalog_url: str, tmp_path: Path) -> None:
    backend = SQLBackend(catalog_url, blob_store=LocalBlobStore(tmp_path), inline_limit=0)
    try:
        backend.save(np.zeros(1000), "a.npy")
        lazy = backend.open_array("a.npy")
        backend.save(np.ones(1000), "a.npy")
        backend.gc(grace=0)
        with pytest.raises(NotFoundError, match="open the array again"):
            lazy[:5]
    finally:
        backend.close()


def test_a_view_follows_content_rebalance_moved(catalog_url: str, tmp_path: Path) -> None:
    backend = SQLBackend(catalog_url, blob_store=LocalBlobStore(tmp_path), inline_limit=0)
    try:
        array = np.arange(1000.0)
        backend.save(array, "a.npy")
        lazy = backend.open_array("a.npy")
        backend.rebalance(inline_limit=1 << 20)  # now inline, its object deleted
        np.testing.assert_array_equal(lazy[10:20], array[10:20])
    finally:
        backend.close()


# -- pickling and dask ---------------------------------------------------------------------


def _shared(kind: str, tmp_path: Path, catalog_url: str | None) -> StorageBackend:
    if kind == "disk":
        return DiskBackend(tmp_path / "disk")
    assert catalog_url is not None
    return SQLBackend(catalog_url, blob_store=LocalBlobStore(tmp_path / "blobs"), inline_limit=1000)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=_PG), "disk"])
def shared(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[], StorageBackend]]:
    url = None if request.param == "disk" else _url(request, request.param)
    opened: list[StorageBackend] = []

    def open_() -> StorageBackend:
        opened.append(_shared(request.param, tmp_path, url))
        return opened[-1]

    yield open_
    for backend in opened:
        backend.close()


def test_views_pickle_by_configuration(shared: Callable[[], StorageBackend]) -> None:
    backend = shared()
    array = RNG.random((50, 40))  # over the inline limit: external content too
    backend.save(array, "a.npy")
    backend.save(np.arange(10), "small.npy")  # inline
    for path, expected in (("a.npy", array), ("small.npy", np.arange(10))):
        # With its backend, to close the copy's catalog: one copy serves both.
        backend_copy, copy = pickle.loads(pickle.dumps((backend, backend.open_array(path))))
        try:
            assert isinstance(copy, LazyArray)
            np.testing.assert_array_equal(copy[2:5], expected[2:5])
        finally:
            backend_copy.close()


def test_a_disk_view_copied_after_the_file_changed_refuses(tmp_path: Path) -> None:
    backend = DiskBackend(tmp_path)
    backend.save(np.zeros(10), "a.npy")
    data = pickle.dumps(backend.open_array("a.npy"))
    backend.save(np.ones(10), "a.npy")
    with pytest.raises(ConflictError, match="changed since"):
        pickle.loads(data)[:2]


def test_a_memory_view_refuses_to_pickle() -> None:
    backend = MemoryBackend()
    backend.save(np.zeros(10), "a.npy")
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(backend.open_array("a.npy"))


def test_dask_reads_a_view_on_the_processes_scheduler(
    shared: Callable[[], StorageBackend],
) -> None:
    da = pytest.importorskip("dask.array")
    backend = shared()
    array = RNG.random((64, 30))
    backend.save(array, "plate/img.npy")
    lazy = da.from_array(backend.open_array("plate/img.npy"), chunks=(16, 15))
    total = lazy.sum(axis=0).compute(scheduler="processes", num_workers=2)
    np.testing.assert_allclose(total, array.sum(axis=0))


def test_a_view_of_content_on_s3_reads_ranges(
    open_backend: Callable[..., SQLBackend], catalog_url: str, s3_url: str
) -> None:
    """Through the S3 protocol (moto's server): ranged GETs, never the whole object."""
    from polystore.blobs import from_url

    backend = open_backend(catalog_url, blob_store=from_url(s3_url), inline_limit=0)
    array = RNG.random((200, 100))
    backend.save(array, "s3/a.npy")
    store = backend.blob_store
    assert store is not None
    fetched: list[int] = []
    read_range = store.read_range

    def counting(content_hash: str, start: int, end: int) -> bytes:
        data = read_range(content_hash, start, end)
        fetched.append(len(data))
        return data

    store.read_range = counting  # type: ignore[method-assign]
    lazy = backend.open_array("s3/a.npy")
    np.testing.assert_array_equal(lazy[50:53, 10:20], array[50:53, 10:20])
    assert fetched == [2 * 800 + 80]  # rows 50-52, columns 10-19: one request
    del store.read_range  # (the store pickles with its attributes)
    copy_backend, copy = pickle.loads(pickle.dumps((backend, lazy)))
    try:
        np.testing.assert_array_equal(copy[-1], array[-1])
    finally:
        copy_backend.close()
