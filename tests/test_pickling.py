"""Handles travel to other processes by configuration (DESIGN §7).

``SQLBackend``, ``DiskBackend``, ``BackendRegistry`` and ``FileManager`` pickle
as what they were opened with; a copy of an ``SQLBackend`` opens its catalog on
first use. A ``MemoryBackend`` refuses. The round trips go through ``pickle``
and through real ``spawn`` child processes, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from polystore import (
    BackendConfigError,
    BackendRegistry,
    DiskBackend,
    FileManager,
    MemoryBackend,
    SQLBackend,
)
from polystore.backends.sql import catalog as catalog_module
from polystore.backends.sql.reopen import UnopenedSQLBackend
from polystore.serializers import Encoded, Serializer, SerializerRegistry


def _copy(obj: Any) -> Any:
    return pickle.loads(pickle.dumps(obj))


@pytest.fixture
def sql(catalog_url: str) -> Iterator[SQLBackend]:
    with SQLBackend(catalog_url, inline_limit=64) as backend:
        yield backend


# -- SQLBackend ---------------------------------------------------------------------------


def test_sql_backend_round_trip_keeps_its_options(catalog_url: str, tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    with SQLBackend(
        catalog_url,
        blob_store=str(blobs),
        inline_limit=100,
        allow_pickle=True,
        verify_inline=True,
    ) as original:
        original.save(np.arange(1000, dtype=np.int32), "plate/big")  # 4000 bytes: external
        original.save({1, 2}, "plate/a-set")  # only with allow_pickle
        with _copy(original) as copy:
            assert copy.inline_limit == 100
            assert copy.allow_pickle is True
            assert copy._reader.verify_inline is True
            assert copy.blob_store is not None
            assert Path(copy.blob_store.root) == blobs
            np.testing.assert_array_equal(copy.load("plate/big"), np.arange(1000))
            assert copy.load("plate/a-set") == {1, 2}
            copy.save(np.ones(50, dtype=np.float64), "plate/from-copy")  # 400 bytes: external
        assert original.stat("plate/from-copy").store == original.blob_store.name


def test_a_copy_opens_its_catalog_on_first_use(sqlite_url: str, tmp_path: Path) -> None:
    with SQLBackend(sqlite_url) as original:
        original.save(b"bytes", "a")
        pickled = pickle.dumps(original)
    # Unpickling touches nothing: it works while the catalog is out of reach.
    hidden = tmp_path.with_name(tmp_path.name + "-away")
    tmp_path.rename(hidden)
    try:
        copy = pickle.loads(pickled)
        assert isinstance(copy, SQLBackend)
        assert type(copy) is UnopenedSQLBackend
        assert "unopened" in repr(copy)
        assert copy.url == sqlite_url
        with pytest.raises(BackendConfigError, match="does not exist"):
            copy.exists("a")
        assert type(copy) is UnopenedSQLBackend  # a failed opening leaves it unopened
    finally:
        hidden.rename(tmp_path)
    assert copy.load("a") == b"bytes"  # ...and the next operation opens it
    assert type(copy) is SQLBackend
    copy.close()


def test_an_unopened_copy_pickles_again_and_closes_without_opening(sqlite_url: str) -> None:
    with SQLBackend(sqlite_url) as original:
        original.save(b"x", "a")
        copy = _copy(original)
    again = _copy(copy)
    assert type(copy) is UnopenedSQLBackend and type(again) is UnopenedSQLBackend
    copy.close()  # nothing to release
    assert type(copy) is UnopenedSQLBackend
    assert again.load("a") == b"x"
    again.close()


def test_threads_racing_on_a_copy_open_it_once(
    sql: SQLBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    sql.save_batch([np.full(3, i) for i in range(8)], [f"t/{i}" for i in range(8)])
    copy = _copy(sql)
    opened = []
    real = catalog_module.create_catalog_engine

    def counting(*args: Any, **kwargs: Any) -> Any:
        opened.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(catalog_module, "create_catalog_engine", counting)
    barrier = threading.Barrier(8)
    results: dict[int, Any] = {}

    def work(i: int) -> None:
        barrier.wait()
        results[i] = copy.load(f"t/{i}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(opened) == 1
    assert sorted(results) == list(range(8))
    for i, value in results.items():
        np.testing.assert_array_equal(value, np.full(3, i))
    copy.close()


def test_a_relative_sqlite_path_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with SQLBackend("sqlite:///relative.db") as original:
        original.save(b"here", "a")
        pickled = pickle.dumps(original)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pickle.loads(pickled) as copy:
        assert copy.url == f"sqlite:///{tmp_path}/relative.db"
        assert copy.load("a") == b"here"
    assert not (elsewhere / "relative.db").exists()


def test_an_in_memory_sqlite_catalog_cannot_be_pickled() -> None:
    with SQLBackend("sqlite://") as backend, pytest.raises(TypeError, match="in-memory SQLite"):
        pickle.dumps(backend)


def test_a_copy_keeps_having_no_blob_store(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL without a store keeps content inline; the copy must too, whatever its env."""
    monkeypatch.delenv("POLYSTORE_BLOB_STORE", raising=False)
    with SQLBackend(pg_url, inline_limit=8) as original:
        assert original.blob_store is None
        pickled = pickle.dumps(original)
        monkeypatch.setenv("POLYSTORE_BLOB_STORE", str(tmp_path / "env-store"))
        with pickle.loads(pickled) as copy:
            copy.save(b"more than eight bytes", "a")
            assert copy.blob_store is None
        assert original.stat("a").store == "inline"
        assert original.load("a") == b"more than eight bytes"


def test_an_s3_blob_store_travels_with_its_settings(catalog_url: str, s3_url: str) -> None:
    with SQLBackend(catalog_url, blob_store=s3_url, inline_limit=16) as original:
        original.save(np.arange(100, dtype=np.int64), "big")
        with _copy(original) as copy:
            assert copy.blob_store.name == original.blob_store.name
            np.testing.assert_array_equal(copy.load("big"), np.arange(100))
            copy.save(b"x" * 100, "from-copy")
        assert original.stat("from-copy").store == original.blob_store.name
        assert original.load("from-copy") == b"x" * 100


class Reversed(Serializer):
    """Stores bytes reversed (a custom serializer defined at module level)."""

    name = "reversed"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bytes)

    def encode(self, value: Any) -> Encoded:
        return Encoded(self.name, self.version, value[::-1])

    def decode(self, data: Any, meta: dict[str, Any]) -> Any:
        return bytes(data)[::-1]


def test_custom_serializers_travel_when_they_pickle(sql: SQLBackend) -> None:
    registry = SerializerRegistry.default()
    registry.register(Reversed(), first=True)
    with SQLBackend(sql.url, serializers=registry) as custom:
        custom.save(b"abc", "r")
        with _copy(custom) as copy:
            assert next(iter(copy.serializers)).name == "reversed"
            assert copy.load("r") == b"abc"
    assert sql.stat("r").serializer == "reversed"


def test_custom_serializers_that_do_not_pickle_are_refused_clearly(sql: SQLBackend) -> None:
    class Local(Reversed):
        name = "local"

    registry = SerializerRegistry.default()
    registry.register(Local())
    with (
        SQLBackend(sql.url, serializers=registry) as custom,
        pytest.raises(TypeError, match=r"serializers= registry cannot be"),
    ):
        pickle.dumps(custom)


def test_engine_options_travel_when_they_pickle(sql: SQLBackend) -> None:
    with SQLBackend(sql.url, engine_options={"pool_pre_ping": True}) as custom:
        with _copy(custom) as copy:
            copy.exists("")
            assert copy.engine.pool._pre_ping is True
        local = {"json_serializer": lambda value: json.dumps(value)}  # a lambda: no pickle
        with (
            SQLBackend(sql.url, engine_options=local) as odd,
            pytest.raises(TypeError, match="engine_options cannot be"),
        ):
            pickle.dumps(odd)


def test_a_subclass_must_say_how_it_pickles(sqlite_url: str) -> None:
    class Mine(SQLBackend):
        pass

    with Mine(sqlite_url) as backend, pytest.raises(TypeError, match="__reduce__"):
        pickle.dumps(backend)


# -- DiskBackend, MemoryBackend, registries and managers ----------------------------------------


def test_disk_backend_round_trip(tmp_path: Path) -> None:
    disk = DiskBackend(tmp_path / "root")
    disk.save(np.arange(3), "a/x.npy")
    copy = _copy(disk)
    assert copy.root == disk.root
    np.testing.assert_array_equal(copy.load("a/x.npy"), np.arange(3))


def test_a_memory_backend_refuses_to_be_pickled() -> None:
    with pytest.raises(TypeError, match="cannot be shared between processes"):
        pickle.dumps(MemoryBackend())


def test_a_registry_with_a_memory_backend_refuses_too(tmp_path: Path) -> None:
    registry = BackendRegistry()
    registry["memory"].save(b"x", "a")  # built lazily, then pickled with the registry
    with pytest.raises(TypeError, match="MemoryBackend cannot be pickled"):
        pickle.dumps(FileManager(registry))


def test_file_manager_round_trip(catalog_url: str, tmp_path: Path) -> None:
    registry = BackendRegistry({"images": DiskBackend(tmp_path / "disk")})
    with FileManager(registry, default_backend=catalog_url) as fm:
        fm.save(b"catalog", "a")
        fm.save(b"disk", "b.bin", backend="images")
        copy = _copy(fm)
        assert copy.default_backend == catalog_url
        assert copy.load("a") == b"catalog"
        assert copy.load("b.bin", backend="images") == b"disk"
        copy.save(b"from the copy", "c")
        assert fm.load("c") == b"from the copy"
        copy.close()  # closes the catalog its registry built


def test_file_manager_over_a_url_and_a_plain_mapping(catalog_url: str, tmp_path: Path) -> None:
    with SQLBackend(catalog_url) as sql:
        fm = FileManager({"cat": sql}, default_backend="cat")
        fm.save(b"1", "x")
        copy = _copy(fm)
        assert copy.load("x") == b"1"
        copy.get_backend("cat").close()
    with FileManager(catalog_url) as by_url:
        by_url.save(b"2", "y")
        copy = _copy(by_url)
        assert copy.load("y") == b"2"
        copy.close()


# -- real processes -------------------------------------------------------------------------


def _child_reads_and_writes(fm: FileManager, queue: Any) -> None:
    """In a spawned process: load what the parent saved, save something back."""
    with fm:
        value = fm.load("parent/array.npy")
        fm.save(value * 2, "child/doubled.npy", attrs={"pid": os.getpid()})
        fm.save({"child": "hello"}, "child/meta.json")
        queue.put(float(value.sum()))


@pytest.mark.slow
def test_a_spawned_process_shares_the_catalog(catalog_url: str) -> None:
    with FileManager(catalog_url) as fm:
        fm.save(np.arange(12.0).reshape(3, 4), "parent/array.npy")
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        child = context.Process(target=_child_reads_and_writes, args=(fm, queue))
        child.start()
        child.join(timeout=120)
        assert child.exitcode == 0  # (a failure prints its traceback from the child)
        assert queue.get(timeout=10) == 66.0
        np.testing.assert_array_equal(
            fm.load("child/doubled.npy"), np.arange(12.0).reshape(3, 4) * 2
        )
        assert fm.stat("child/doubled.npy").attrs["pid"] == child.pid
        assert fm.load("child/meta.json") == {"child": "hello"}


class StoredArray:
    """An array-like over a stored array: what ``dask.array.from_array`` slices in workers."""

    def __init__(self, fm: FileManager, path: str, shape: tuple[int, ...], dtype: Any) -> None:
        self.fm, self.path = fm, path
        self.shape, self.dtype, self.ndim = shape, np.dtype(dtype), len(shape)

    def __getitem__(self, key: Any) -> Any:
        return self.fm.load(self.path)[key]


def _save_block(fm: FileManager, block: Any, index: int) -> int:
    fm.save(block, f"out/block{index}.npy")
    return index


@pytest.mark.slow
def test_dask_processes_scheduler_loads_and_saves_through_a_captured_manager(
    catalog_url: str,
) -> None:
    import dask
    import dask.array as da

    with FileManager(catalog_url) as fm:
        images = [np.random.default_rng(i).random((16, 16)) for i in range(4)]
        fm.save_batch(images, [f"plate/{i}.npy" for i in range(4)])
        stacked = da.stack(
            [
                da.from_array(StoredArray(fm, f"plate/{i}.npy", (16, 16), "f8"), chunks=(8, 16))
                for i in range(4)
            ]
        )
        total = stacked.sum(axis=(1, 2)).compute(scheduler="processes", num_workers=2)
        np.testing.assert_allclose(total, [image.sum() for image in images])
        saved = dask.compute(
            *[dask.delayed(_save_block)(fm, images[i] + 1, i) for i in range(4)],
            scheduler="processes",
            num_workers=2,
        )
        assert saved == (0, 1, 2, 3)
        for i in range(4):
            np.testing.assert_array_equal(fm.load(f"out/block{i}.npy"), images[i] + 1)
