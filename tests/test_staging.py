"""Large content staged in the store while it is hashed, then given its name.

``STAGE_OVER`` is made 64 KiB here, so that staging happens for content of a
few hundred KiB.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from polystore import SQLBackend
from polystore.backends.sql import save as save_module
from polystore.backends.sql import staging
from polystore.backends.sql import uploads as uploads_module
from polystore.blobs import LocalBlobStore, Staging, from_url
from polystore.errors import IsADirectoryError, NotFoundError, UnsupportedOperationError
from polystore.hashing import NEW_CATALOGS

OVER = 64 << 10


@pytest.fixture(autouse=True)
def small_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(staging, "STAGE_OVER", OVER)


def sha(data: bytes) -> str:
    """The name a catalog made now gives ``data`` (and a valid object name in any store)."""
    return NEW_CATALOGS.of(data)


def payload(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


class CountingStore(LocalBlobStore):
    """A local store that counts what each write path is given."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.calls: dict[str, int] = {"stage": 0, "put": 0, "put_staged": 0, "replace": 0}

    def stage(self, chunks: Any, size: int) -> Staging:
        self.calls["stage"] += 1
        return super().stage(chunks, size)

    def put(self, content_hash: str, chunks: Any, size: int, **kw: Any) -> bool:
        self.calls["put"] += 1
        return super().put(content_hash, chunks, size, **kw)

    def put_staged(self, content_hash: str, staging: Staging, **kw: Any) -> bool:
        self.calls["put_staged"] += 1
        return super().put_staged(content_hash, staging, **kw)

    def replace(self, content_hash: str, chunks: Any, size: int, **kw: Any) -> None:
        self.calls["replace"] += 1
        super().replace(content_hash, chunks, size, **kw)


@pytest.fixture
def store(tmp_path: Path) -> CountingStore:
    return CountingStore(tmp_path / "blobs")


@pytest.fixture
def backend(
    catalog_url: str, store: CountingStore, open_backend: Callable[..., SQLBackend]
) -> SQLBackend:
    return open_backend(catalog_url, blob_store=store, inline_limit=1024)


def staged_files(store: LocalBlobStore) -> list[str]:
    return sorted(o.key for o in store.scan() if o.staged)


def objects(store: LocalBlobStore) -> list[str]:
    return sorted(o.hash for o in store.scan() if o.hash is not None)


# -- the store ----------------------------------------------------------------------


def test_a_local_store_stages_then_names_content(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "s")
    data = payload(1000)
    staging = store.stage([data[:300], data[300:]], len(data))
    assert staged_files(store) == [staging.key]
    assert not store.exists(sha(data))
    assert store.put_staged(sha(data), staging)
    assert store.get(sha(data)) == data
    assert staged_files(store) == []
    assert not store.put_staged(sha(data), staging)  # there: nothing to do
    store.delete([sha(data)])
    with pytest.raises(NotFoundError):
        store.put_staged(sha(data), staging)  # named already, and that object deleted since

    store.put(sha(data), [data], len(data))
    again = store.stage([data], len(data))
    assert not store.put_staged(sha(data), again)  # there already: kept, and the copy too
    assert staged_files(store) == [again.key]
    store.discard(again)
    store.discard(again)  # (twice is fine)
    assert staged_files(store) == []

    wrong = payload(1000, seed=1)
    store.replace(sha(data), [wrong], len(wrong))
    fix = store.stage([data], len(data))
    assert store.put_staged(sha(data), fix, replace=True)
    assert store.get(sha(data)) == data


def test_a_short_stage_leaves_nothing(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "s")
    with pytest.raises(ValueError, match="gave 3 bytes, not 4"):
        store.stage([b"abc"], 4)
    assert staged_files(store) == []


def test_sweeping_removes_only_old_staged_content(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "s")
    old, new = store.stage([b"old"], 3), store.stage([b"new"], 3)
    an_hour_ago = time.time() - 3600
    os.utime(store.root / old.key, (an_hour_ago, an_hour_ago))
    assert store.sweep_staged(600) == 1
    assert staged_files(store) == [new.key]
    assert store.sweep_staged(0) == 1
    assert staged_files(store) == []
    assert LocalBlobStore(tmp_path / "none").sweep_staged(0) == 0


def test_keys_outside_the_staging_area_are_refused(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "s")
    for key in ("../x", "incoming/../../etc", "ab/" + "a" * 64, "incoming/zz"):
        with pytest.raises(ValueError, match="not a key of staged content"):
            store.discard(Staging(key, 1))


def test_stores_that_cannot_stage_say_so(s3_url: str) -> None:
    store = from_url(s3_url)
    assert not store.can_stage
    with pytest.raises(UnsupportedOperationError):
        store.stage([b"x"], 1)
    assert store.sweep_staged(0) == 0


# -- saves --------------------------------------------------------------------------


def test_large_content_is_written_once_while_hashed(
    backend: SQLBackend, store: CountingStore
) -> None:
    data = np.arange(OVER, dtype=np.int64)  # 512 KiB
    backend.save(data, "big")
    assert store.calls == {"stage": 1, "put": 0, "put_staged": 1, "replace": 0}
    assert np.array_equal(backend.load("big"), data)
    assert staged_files(store) == []
    assert objects(store) == [backend.stat("big").hash]
    report = backend.fsck(verify=True)
    assert report.ok and report.pending_uploads == 0, report

    # Small external content goes the usual way: hashed, then put.
    backend.save(payload(4096), "small")
    assert store.calls["put"] == 1 and store.calls["stage"] == 1


def test_content_stored_already_is_staged_then_discarded(
    backend: SQLBackend, store: CountingStore
) -> None:
    data = payload(3 * OVER)
    backend.save(data, "a")
    backend.save(data, "b")
    assert store.calls["stage"] == 2 and store.calls["put_staged"] == 2
    assert staged_files(store) == []
    assert objects(store) == [sha(data)]
    assert backend.load("b") == data

    # Inline already (saved under a larger limit): the staged copy is not used.
    inline = payload(2 * OVER, seed=3)
    backend.inline_limit = 1 << 20
    backend.save(inline, "inline")
    backend.inline_limit = 1024
    backend.save(inline, "again")
    assert staged_files(store) == []
    assert sha(inline) not in objects(store)
    assert backend.load("again") == inline


def test_a_failed_save_leaves_neither_staged_content_nor_objects(
    backend: SQLBackend, store: CountingStore
) -> None:
    backend.save(b"x", "d/file")
    before = objects(store)
    with pytest.raises(IsADirectoryError):
        backend.save_batch([payload(2 * OVER), payload(2 * OVER, 1)], ["new", "d"])
    assert staged_files(store) == []
    assert objects(store) == before
    assert backend.list_dir("") == ["d"]
    assert backend.fsck(verify=True).ok

    with pytest.raises(RuntimeError, match="rolled back"), backend.transaction():
        backend.save(payload(2 * OVER, 2), "in_tx")
        raise RuntimeError("rolled back")
    assert staged_files(store) == []
    assert objects(store) == before
    assert not backend.exists("in_tx")


def test_a_wrong_object_already_there_is_replaced_by_the_staged_copy(
    backend: SQLBackend, store: CountingStore
) -> None:
    data = payload(2 * OVER)
    store.put(sha(data), [payload(2 * OVER, seed=8)], len(data))  # planted, wrong bytes
    backend.save(data, "f")
    assert backend.load("f") == data
    assert staged_files(store) == []
    assert backend.fsck(verify=True).ok


def test_a_save_staged_again_after_losing_its_intent_uploads_from_memory(
    backend: SQLBackend, store: CountingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first catalog write finds its intent taken by gc(): the save stages
    # again, and the staged copy has already been given its name (and been
    # released with the intent), so the content is uploaded from memory.
    real = uploads_module.promote
    calls = []

    def losing_once(conn: Any, staged: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise uploads_module.IntentLostError("taken by gc()")
        real(conn, staged)

    monkeypatch.setattr(save_module, "promote", losing_once)
    data = payload(2 * OVER)
    backend.save(data, "f")
    assert len(calls) == 2
    assert store.calls["put_staged"] == 2 and store.calls["put"] == 1
    assert backend.load("f") == data
    assert staged_files(store) == []
    assert backend.fsck(verify=True).ok


def test_content_a_dead_save_staged_is_swept_by_gc(
    backend: SQLBackend, store: CountingStore
) -> None:
    store.stage([payload(100)], 100)  # as a save killed before its intent
    report = backend.fsck()
    assert report.ok and report.pending_uploads == 1
    assert backend.gc().objects_deleted == 0  # within the grace period
    assert len(staged_files(store)) == 1
    assert backend.gc(grace=0).objects_deleted == 1
    assert staged_files(store) == []


def test_a_batch_of_large_contents_stages_them_a_few_at_once(
    backend: SQLBackend, store: CountingStore
) -> None:
    values = [payload(2 * OVER, seed) for seed in range(6)]
    backend.save_batch([*values, b"small"], [*(f"v{i}" for i in range(6)), "small"])
    assert store.calls["stage"] == 6 and store.calls["put_staged"] == 6
    assert backend.load_batch([f"v{i}" for i in range(6)]) == values
    assert staged_files(store) == []
    assert backend.fsck(verify=True).ok


def test_one_failed_staging_fails_the_batch_and_leaves_nothing_staged(
    catalog_url: str, tmp_path: Path, open_backend: Callable[..., SQLBackend]
) -> None:
    class FailingThird(CountingStore):
        def stage(self, chunks: Any, size: int) -> Staging:
            self.calls["stage"] += 1
            if self.calls["stage"] == 3:
                raise OSError("disk on fire")
            return LocalBlobStore.stage(self, chunks, size)

    store = FailingThird(tmp_path / "failing")
    backend = open_backend(catalog_url, blob_store=store, inline_limit=1024)
    with pytest.raises(OSError, match="disk on fire"):
        backend.save_batch([payload(2 * OVER, seed) for seed in range(5)], list("abcde"))
    assert store.calls["stage"] == 5  # the others ran to the end, and were discarded
    assert staged_files(store) == [] and objects(store) == []
    assert backend.list_dir("") == []
