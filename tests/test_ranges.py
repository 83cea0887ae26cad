"""Ranged reads: ``BlobStore.read_range`` and ``polystore.backends.sql.ranges``.

What a range costs is counted, never timed: the bytes a blob store hands back,
the length the SQL statement asks the database for, and whether anything read
the whole content.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from polystore import SQLBackend
from polystore.blobs import BlobStore, LocalBlobStore
from polystore.errors import (
    IntegrityError,
    IsADirectoryError,
    NotFoundError,
    SerializationError,
)
from polystore.hashing import NEW_CATALOGS

CONTENT = bytes(range(256)) * 64  # 16 KiB


def _hash(data: bytes) -> str:
    """The name a catalog made now gives ``data`` (and a valid object name in any store)."""
    return NEW_CATALOGS.of(data)


# -- the blob stores ----------------------------------------------------------------------


class _ReadsWholeObjects(LocalBlobStore):
    """A store without a ranged read of its own: the interface's default."""

    read_range = BlobStore.read_range


@pytest.fixture(params=["local", "s3", "default"])
def blob_store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "s3":
        store = request.getfixturevalue("s3_store")
        assert isinstance(store, BlobStore)
        return store
    if request.param == "default":
        return _ReadsWholeObjects(tmp_path / "default", fsync=False)
    return LocalBlobStore(tmp_path / "blobs", fsync=False)


def test_blob_store_read_range(blob_store: BlobStore) -> None:
    key = _hash(CONTENT)
    blob_store.put(key, [CONTENT], len(CONTENT))
    assert blob_store.read_range(key, 0, 10) == CONTENT[:10]
    assert blob_store.read_range(key, 1000, 5000) == CONTENT[1000:5000]
    assert blob_store.read_range(key, 16380, 20000) == CONTENT[16380:]  # cut at the end
    assert blob_store.read_range(key, 16384, 16390) == b""
    assert blob_store.read_range(key, 20000, 30000) == b""
    assert blob_store.read_range(key, 7, 7) == b""
    with pytest.raises(NotFoundError):
        blob_store.read_range(_hash(b"absent"), 0, 4)
    with pytest.raises(NotFoundError):
        blob_store.read_range(_hash(b"absent"), 3, 3)
    for start, end in ((-1, 4), (5, 4), (0.5, 4)):
        with pytest.raises(ValueError, match="byte range"):
            blob_store.read_range(key, start, end)  # type: ignore[arg-type]


def test_a_local_range_is_one_pread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalBlobStore(tmp_path, fsync=False)
    key = _hash(CONTENT)
    store.put(key, [CONTENT], len(CONTENT))
    import os

    calls: list[tuple[int, int]] = []
    pread = os.pread

    def counting_pread(fd: int, n: int, offset: int) -> bytes:
        calls.append((n, offset))
        return pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", counting_pread)
    assert store.read_range(key, 4096, 4100) == CONTENT[4096:4100]
    assert calls == [(4, 4096)]


# -- the catalog --------------------------------------------------------------------------


@pytest.fixture(params=[1 << 20, 0], ids=["inline", "blob-store"])
def backend(
    request: pytest.FixtureRequest, catalog_url: str, tmp_path: Path
) -> Iterator[SQLBackend]:
    backend = SQLBackend(
        catalog_url, blob_store=LocalBlobStore(tmp_path / "blobs"), inline_limit=request.param
    )
    yield backend
    backend.close()


def test_ranges_of_a_file(backend: SQLBackend) -> None:
    backend.save(CONTENT, "d/data.bin")
    assert backend.read_range("d/data.bin", 10, 20) == CONTENT[10:20]
    assert backend.read_range("/d//data.bin", 16000) == CONTENT[16000:]
    assert backend.read_range("d/data.bin") == CONTENT
    assert backend.read_range("d/data.bin", 16000, 99999) == CONTENT[16000:]
    assert backend.read_range("d/data.bin", 99999) == b""
    assert backend.read_range("d/data.bin", 5, 5) == b""
    assert backend.read_suffix("d/data.bin", 3) == CONTENT[-3:]
    assert backend.read_suffix("d/data.bin", 0) == b""
    assert backend.read_suffix("d/data.bin", 99999) == CONTENT
    backend.save(b"", "d/empty")
    assert backend.read_range("d/empty", 0, 10) == b""
    assert backend.read_suffix("d/empty", 10) == b""


def test_ranges_of_other_content_are_its_stored_bytes(backend: SQLBackend) -> None:
    array = np.arange(100, dtype="<u4")
    backend.save(array, "a.npy")
    assert backend.read_range("a.npy", 8, 16) == array[2:4].tobytes()
    backend.save("héllo", "s.txt")
    assert backend.read_suffix("s.txt", 4) == "héllo".encode()[-4:]
    with pytest.raises(SerializationError, match="'ndarray', not 'bytes'"):
        backend.read_range("a.npy", 0, 4, serializer="bytes")


def test_errors_are_those_of_load(backend: SQLBackend) -> None:
    backend.save(CONTENT, "d/data.bin")
    with pytest.raises(NotFoundError):
        backend.read_range("d/missing", 0, 1)
    with pytest.raises(NotFoundError):
        backend.read_suffix("d/data.bin/below", 1)
    with pytest.raises(IsADirectoryError):
        backend.read_range("d", 0, 1)
    for start, end in ((-1, 2), (4, 2), (1.5, None)):
        with pytest.raises(ValueError, match=r"start|end"):
            backend.read_range("d/data.bin", start, end)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="length"):
        backend.read_suffix("d/data.bin", -1)


def test_a_range_sees_the_callers_transaction(backend: SQLBackend) -> None:
    backend.save(b"old content", "f")
    with backend.transaction():
        backend.save(b"new content", "f")
        assert backend.read_range("f", 0, 3) == b"new"
    assert backend.read_suffix("f", 7) == b"content"


def _statements(backend: SQLBackend) -> list[tuple[str, Any]]:
    seen: list[tuple[str, Any]] = []

    @sa.event.listens_for(backend.engine, "before_cursor_execute")
    def record(conn: Any, cursor: Any, text: str, params: Any, *args: Any) -> None:
        seen.append((text, params))

    return seen


def test_only_the_range_leaves_the_database(
    open_backend: Callable[..., SQLBackend], catalog_url: str
) -> None:
    """Inline: the database cuts the range out; nothing selects the whole column."""
    backend = open_backend(catalog_url, blob_store=None)
    backend.save(CONTENT, "f")
    seen = _statements(backend)
    assert backend.read_range("f", 100, 140) == CONTENT[100:140]
    assert backend.read_suffix("f", 24) == CONTENT[-24:]
    content_reads = [(t, p) for t, p in seen if "polystore_blobs.data" in t]
    assert len(content_reads) == 2
    for text, params in content_reads:
        assert "substr(polystore_blobs.data" in text
        values = params.values() if isinstance(params, dict) else params
        assert [v for v in values if isinstance(v, int)] in ([101, 40], [len(CONTENT) - 23, 24])


def test_only_the_range_leaves_the_blob_store(
    open_backend: Callable[..., SQLBackend],
    catalog_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = open_backend(catalog_url, blob_store=LocalBlobStore(tmp_path), inline_limit=0)
    backend.save(CONTENT, "f")
    store = backend.blob_store
    assert store is not None
    fetched: list[int] = []
    read = store.read_range

    def counting(content_hash: str, start: int, end: int) -> bytes:
        data = read(content_hash, start, end)
        fetched.append(len(data))
        return data

    def never(content_hash: str) -> Any:
        raise AssertionError("a ranged read opened the whole object")

    monkeypatch.setattr(store, "read_range", counting)
    monkeypatch.setattr(store, "open", never)
    assert backend.read_range("f", 100, 140) == CONTENT[100:140]
    assert backend.read_suffix("f", 24) == CONTENT[-24:]
    assert backend.read_range("f", 99999) == b""  # past the end: nothing to fetch
    assert fetched == [40, 24]


def test_ranges_check_sizes_not_hashes(
    open_backend: Callable[..., SQLBackend], tmp_path: Path, sqlite_url: str
) -> None:
    store = LocalBlobStore(tmp_path / "blobs", fsync=False)
    backend = open_backend(sqlite_url, blob_store=store, inline_limit=0)
    backend.save(CONTENT, "f")
    object_path = store.path(_hash(CONTENT))
    # Same size, other bytes: a range cannot tell (a full load can).
    object_path.write_bytes(b"x" * len(CONTENT))
    assert backend.read_range("f", 0, 4) == b"xxxx"
    with pytest.raises(IntegrityError, match="does not match its checksum"):
        backend.load("f")
    # Shorter than the catalog records: a range reaching past it is refused.
    object_path.write_bytes(CONTENT[:100])
    assert backend.read_range("f", 0, 100) == CONTENT[:100]
    with pytest.raises(IntegrityError, match="gave 0 bytes"):
        backend.read_suffix("f", 10)
    with pytest.raises(IntegrityError, match="gave 50 bytes"):
        backend.read_range("f", 50, 150)
    object_path.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        backend.read_range("f", 0, 1)


def test_content_in_another_store_is_reported(tmp_path: Path, sqlite_url: str) -> None:
    with SQLBackend(
        sqlite_url, blob_store=LocalBlobStore(tmp_path / "a", name="first"), inline_limit=0
    ) as backend:
        backend.save(CONTENT, "f")
    with (
        SQLBackend(
            sqlite_url, blob_store=LocalBlobStore(tmp_path / "b", name="second"), inline_limit=0
        ) as backend,
        pytest.raises(NotFoundError, match="blob store 'first'"),
    ):
        backend.read_range("f", 0, 1)
