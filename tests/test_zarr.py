"""``polystore.zarr.PolystoreStore``: zarr's own store suite, and zarr, xarray and dask on it.

zarr's conformance suite (``zarr.testing.store.StoreTests``) runs whole, nothing
skipped, on SQLite and PostgreSQL, with content inline, in a local blob store
and on S3. Its tests are coroutines; this project runs no asyncio plugin, so
:func:`_blocking` runs each one with ``zarr.core.sync.sync`` -- on zarr's own
I/O thread, where zarr runs every store call its synchronous API makes.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import json
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
import zarr
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import cpu, default_buffer_prototype
from zarr.core.sync import sync
from zarr.testing.store import StoreTests

from polystore import DiskBackend, MemoryBackend, SQLBackend, paths
from polystore.blobs import BlobStore, LocalBlobStore
from polystore.errors import SerializationError, UnsupportedOperationError
from polystore.zarr import PolystoreStore


def _blocking(test: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> Any:
        return sync(test(*args, **kwargs))

    return run


def run_coroutines(cls: type) -> type:
    """Make every coroutine test of ``cls`` (inherited ones too) a plain test."""
    for name in dir(cls):
        if name.startswith("test_") and inspect.iscoroutinefunction(getattr(cls, name)):
            setattr(cls, name, _blocking(getattr(cls, name)))
    return cls


# -- zarr's conformance suite ----------------------------------------------------------


class _StoreSuite(StoreTests[PolystoreStore, cpu.Buffer]):
    store_cls = PolystoreStore
    buffer_cls = cpu.Buffer
    #: Where the keys live in the backend.
    root = ""

    # The suite's helpers that bypass the store: the backend itself.

    async def set(self, store: PolystoreStore, key: str, value: cpu.Buffer) -> None:
        store.backend.save(value.to_bytes(), paths.join(store.path, key))

    async def get(self, store: PolystoreStore, key: str) -> cpu.Buffer:
        data = store.backend.load(paths.join(store.path, key))
        assert isinstance(data, bytes)
        return self.buffer_cls.from_bytes(data)

    @pytest.fixture
    def store_kwargs(self, backend: Any) -> dict[str, Any]:
        return {"backend": backend, "path": self.root}

    # The suite's coroutine fixtures, as plain ones.

    @pytest.fixture
    def store(self, open_kwargs: dict[str, Any]) -> PolystoreStore:
        return sync(self.store_cls.open(**open_kwargs))

    @pytest.fixture
    def store_not_open(self, store_kwargs: dict[str, Any]) -> PolystoreStore:
        return self.store_cls(**store_kwargs)

    def test_store_repr(self, store: PolystoreStore) -> None:
        assert repr(store).startswith("PolystoreStore(")
        assert f"path={store.path!r}" in repr(store)

    def test_store_supports_writes(self, store: PolystoreStore) -> None:
        assert store.supports_writes
        assert store.supports_deletes

    def test_store_supports_listing(self, store: PolystoreStore) -> None:
        assert store.supports_listing


class _SQLStoreSuite(_StoreSuite):
    def make_backend(self, url: str, tmp_path: Path, request: pytest.FixtureRequest) -> SQLBackend:
        return SQLBackend(url)

    @pytest.fixture
    def backend(
        self,
        fresh_catalog: Callable[[Path], str],
        tmp_path: Path,
        request: pytest.FixtureRequest,
    ) -> Iterator[SQLBackend]:
        backend = self.make_backend(fresh_catalog(tmp_path), tmp_path, request)
        yield backend
        # Whatever the test did, the catalog and its blob store still agree.
        report = backend.fsck(verify=True)
        backend.close()
        assert report.ok, str(report)


@run_coroutines
class TestStoreInline(_SQLStoreSuite):
    """Content in the catalog's own table, keys at the root of the catalog."""


@run_coroutines
class TestStoreInLocalBlobStore(_SQLStoreSuite):
    """Every value in a local blob store (inline_limit=0), keys under a directory."""

    root = "data/zarr"

    def make_backend(self, url: str, tmp_path: Path, request: pytest.FixtureRequest) -> SQLBackend:
        store = LocalBlobStore(tmp_path / "blobs", fsync=False)
        return SQLBackend(url, blob_store=store, inline_limit=0)


@run_coroutines
class TestStoreOnS3(_SQLStoreSuite):
    """Every value on S3 (a moto server): ranged reads are ranged GETs."""

    root = "on-s3"

    @pytest.fixture
    def backend(self, sqlite_url: str, s3_store: BlobStore) -> Iterator[SQLBackend]:  # type: ignore[override]
        backend = SQLBackend(sqlite_url, blob_store=s3_store, inline_limit=0)
        yield backend
        report = backend.fsck(verify=True)
        backend.close()
        assert report.ok, str(report)


@run_coroutines
class TestStoreInMemory(_StoreSuite):
    """Any backend works, through load and save (partial reads slice whole values)."""

    root = "mem"

    @pytest.fixture
    def backend(self) -> MemoryBackend:
        return MemoryBackend()

    async def test_serializable_store(self, store: PolystoreStore) -> None:  # type: ignore[override]
        # DESIGN §7: a memory backend cannot be shared between processes.
        with pytest.raises(TypeError, match="MemoryBackend"):
            pickle.dumps(store)


# -- zarr, through the store -------------------------------------------------------------


@pytest.fixture
def catalog(catalog_url: str) -> Iterator[SQLBackend]:
    backend = SQLBackend(catalog_url)
    yield backend
    backend.close()


def _sql(backend: SQLBackend, sqlite: str, postgresql: str, **params: Any) -> list[Any]:
    text = postgresql if backend.engine.dialect.name == "postgresql" else sqlite
    with backend.engine.connect() as conn:
        return list(conn.execute(sa.text(text), params).all())


def test_groups_and_arrays_round_trip(catalog: SQLBackend) -> None:
    store = PolystoreStore(catalog, "experiments/run1")
    root = zarr.open_group(store=store, mode="w", attributes={"operator": "ada"})
    data = np.arange(20 * 30, dtype="f4").reshape(20, 30)
    array = root.create_array("temperature", shape=data.shape, chunks=(8, 8), dtype="f4")
    array[:] = data
    root.create_group("masks").create_array("m", shape=(4,), dtype="bool")[:] = True

    again = zarr.open_group(store=PolystoreStore(catalog, "experiments/run1"), mode="r")
    assert again.attrs["operator"] == "ada"
    assert sorted(again.keys()) == ["masks", "temperature"]
    np.testing.assert_array_equal(again["temperature"][:], data)
    np.testing.assert_array_equal(again["temperature"][3:11, 7:9], data[3:11, 7:9])
    assert again["masks/m"][:].all()
    # Keys are files: the catalog's directories are zarr's hierarchy.
    assert catalog.list_dir("experiments/run1") == ["masks", "temperature", "zarr.json"]
    assert catalog.load("experiments/run1/temperature/c/0/0")[:0] == b""
    assert catalog.is_dir("experiments/run1/temperature/c")


def test_a_store_opened_from_a_url(catalog_url: str) -> None:
    store = PolystoreStore(catalog_url)
    zarr.create_array(store, name="x", shape=(6,), chunks=(2,), dtype="i8")[:] = range(6)
    store.close()  # closes the catalog it opened; the next use opens it again
    assert zarr.open_array(store, path="x", mode="r")[:].tolist() == list(range(6))
    assert store.backend.is_file("x/c/2")
    store.close()


def test_identical_chunks_are_stored_once(catalog: SQLBackend) -> None:
    store = PolystoreStore(catalog, "dedup")
    array = zarr.create_array(store, shape=(40, 40), chunks=(10, 10), dtype="f4", fill_value=0)
    array[:] = 7.0  # 16 chunks, byte for byte the same
    chunks = catalog.list_files("dedup/c", recursive=True)
    assert len(chunks) == 16
    ((files, blobs),) = _sql(
        catalog,
        "SELECT count(*), count(DISTINCT hash) FROM polystore_catalog "
        "WHERE kind = 'file' AND path LIKE 'dedup/c/%'",
        "SELECT count(*), count(DISTINCT hash) FROM polystore_catalog "
        "WHERE kind = 'file' AND path LIKE 'dedup/c/%'",
    )
    assert (files, blobs) == (16, 1)
    ((rows,),) = _sql(
        catalog,
        "SELECT count(*) FROM polystore_blobs b JOIN polystore_catalog c ON c.hash = b.hash "
        "WHERE c.path = 'dedup/c/0/0'",
        "SELECT count(*) FROM polystore_blobs b JOIN polystore_catalog c ON c.hash = b.hash "
        "WHERE c.path = 'dedup/c/0/0'",
    )
    assert rows == 1


def test_metadata_documents_are_attrs_sql_can_query(catalog: SQLBackend) -> None:
    store = PolystoreStore(catalog, "plate1")
    root = zarr.open_group(store=store, mode="w")
    for well, (units, shape) in {"A01": ("K", (64, 64)), "A02": ("C", (32,))}.items():
        root.create_array(well, shape=shape, chunks=(16,) * len(shape), dtype="u2",
                          attributes={"units": units, "well": well})  # fmt: skip
    root.create_group("notes", attributes={"units": "K"})

    stat = catalog.stat("plate1/A01/zarr.json")
    assert stat.attrs["node_type"] == "array" and stat.attrs["shape"] == [64, 64]
    assert json.loads(catalog.load("plate1/A01/zarr.json")) == stat.attrs

    arrays_in_kelvin = _sql(
        catalog,
        """SELECT path, json_extract(attrs, '$.shape') AS shape FROM polystore_catalog
           WHERE name = 'zarr.json' AND json_extract(attrs, '$.node_type') = 'array'
             AND json_extract(attrs, '$.attributes.units') = :units ORDER BY path""",
        """SELECT path, attrs->'shape' AS shape FROM polystore_catalog
           WHERE name = 'zarr.json' AND attrs->>'node_type' = 'array'
             AND attrs->'attributes'->>'units' = :units ORDER BY path""",
        units="K",
    )
    shapes = [(path, json.loads(s) if isinstance(s, str) else s) for path, s in arrays_in_kelvin]
    assert shapes == [("plate1/A01/zarr.json", [64, 64])]
    by_dtype = _sql(
        catalog,
        "SELECT path FROM polystore_catalog "
        "WHERE json_extract(attrs, '$.data_type') = 'uint16' ORDER BY path",
        "SELECT path FROM polystore_catalog WHERE attrs->>'data_type' = 'uint16' ORDER BY path",
    )
    assert [p for (p,) in by_dtype] == ["plate1/A01/zarr.json", "plate1/A02/zarr.json"]


def test_metadata_that_cannot_be_attrs_is_still_stored(catalog: SQLBackend) -> None:
    store = PolystoreStore(catalog)
    big = {"zarr_format": 3, "node_type": "group", "attributes": {"x": "y" * 70_000}}
    for document in (json.dumps(big).encode(), b'{"a": NaN}', b"[1, 2]", b"\xff not json"):
        sync(store.set("g/zarr.json", cpu.Buffer.from_bytes(document)))
        assert catalog.load("g/zarr.json") == document
        assert catalog.stat("g/zarr.json").attrs == {}


# -- transactions -------------------------------------------------------------------------


def _count_blobs(backend: SQLBackend) -> int:
    ((n,),) = _sql(backend, *["SELECT count(*) FROM polystore_blobs"] * 2)
    return int(n)


def test_transaction_commits_everything_together(catalog: SQLBackend) -> None:
    store = PolystoreStore(catalog, "tx")
    data = np.arange(100, dtype="i4").reshape(10, 10)
    with store.transaction():
        array = zarr.create_array(store, name="a", shape=(10, 10), chunks=(5, 5), dtype="i4")
        array[:] = data
        # zarr wrote from its own thread; nothing is in the catalog yet...
        assert not catalog.exists("tx")
        # ...but reads through the store, and its read-only copies, see the writes.
        np.testing.assert_array_equal(array[:], data)
        np.testing.assert_array_equal(zarr.open_array(store, path="a", mode="r")[:], data)
        assert sorted(sync(_collect(store.list_prefix("a/c/")))) == [
            "a/c/0/0", "a/c/0/1", "a/c/1/0", "a/c/1/1"]  # fmt: skip
    assert catalog.list_files("tx/a/c", recursive=True) == [
        "tx/a/c/0/0", "tx/a/c/0/1", "tx/a/c/1/0", "tx/a/c/1/1"]  # fmt: skip
    np.testing.assert_array_equal(zarr.open_array(store, path="a", mode="r")[:], data)


def test_an_exception_in_a_transaction_leaves_nothing(catalog: SQLBackend) -> None:
    store = PolystoreStore(catalog, "tx")
    zarr.create_array(store, name="kept", shape=(4,), dtype="i4")[:] = [1, 2, 3, 4]
    before = _count_blobs(catalog)
    with pytest.raises(RuntimeError, match="stop"), store.transaction():
        zarr.create_array(store, name="lost", shape=(8,), chunks=(2,), dtype="f8")[:] = 1.5
        zarr.open_array(store, path="kept")[:] = 0
        sync(store.delete_dir("kept"))
        raise RuntimeError("stop")
    assert catalog.list_dir("tx") == ["kept", "zarr.json"] or catalog.list_dir("tx") == ["kept"]
    assert zarr.open_array(store, path="kept", mode="r")[:].tolist() == [1, 2, 3, 4]
    assert _count_blobs(catalog) == before


def test_a_failure_while_committing_leaves_nothing(
    catalog: SQLBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = PolystoreStore(catalog, "tx")
    saves = []

    def failing_save(data: Any, path: str, **kwargs: Any) -> None:
        saves.append(path)  # the metadata documents go last, after the chunks' batch
        raise OSError("disk on fire")

    monkeypatch.setattr(catalog, "save", failing_save)
    with pytest.raises(OSError, match="disk on fire"), store.transaction():
        zarr.create_array(store, name="a", shape=(8,), chunks=(2,), dtype="i2")[:] = 3
    assert saves
    assert not catalog.exists("tx")
    assert _count_blobs(catalog) == 0


@pytest.mark.parametrize("where", ["inline", "blob store"])
def test_a_write_stores_the_bytes_its_buffer_held_when_set(
    catalog_url: str, tmp_path: Path, where: str
) -> None:
    # The store hands an SQL catalog a view of zarr's buffer, not a copy: the
    # save must have copied the bytes out by the time set() returns, and a
    # transaction must keep its own copy until it commits.
    options: dict[str, Any] = {}
    if where == "blob store":
        options = {"blob_store": LocalBlobStore(tmp_path / "blobs"), "inline_limit": 0}
    backend = SQLBackend(catalog_url, **options)
    store = PolystoreStore(backend, "views")
    source = np.arange(4096, dtype="u1")
    buffer = cpu.Buffer.from_array_like(source)
    sync(store.set("direct", buffer))
    source[:] = 1  # the caller reuses its buffer once set() has returned
    with store.transaction():
        sync(store.set("in_block", buffer))
        store.set_sync("in_block_sync", buffer)
        source[:] = 2  # before the block commits
    assert backend.load("views/direct") == bytes(np.arange(4096, dtype="u1"))
    assert backend.load("views/in_block") == bytes([1] * 4096)
    assert backend.load("views/in_block_sync") == bytes([1] * 4096)
    assert backend.fsck(verify=True).ok
    backend.close()


def test_other_backends_get_their_own_bytes() -> None:
    backend = MemoryBackend()  # keeps what it is given
    store = PolystoreStore(backend)
    source = np.zeros(16, dtype="u1")
    sync(store.set("k", cpu.Buffer.from_array_like(source)))
    source[:] = 9
    assert backend.load("k") == bytes(16)


def test_nested_transactions_discard_only_the_inner_block(catalog: SQLBackend) -> None:
    store = PolystoreStore(catalog)
    one = cpu.Buffer.from_bytes(b"1")
    with store.transaction():
        sync(store.set("outer", one))
        with pytest.raises(KeyError), store.transaction():
            sync(store.set("inner", one))
            sync(store.delete("outer"))
            raise KeyError("inner")
        with store.transaction():
            sync(store.delete_dir(""))
            sync(store.set("after/clear", one))
        assert sync(store.exists("after/clear")) and not sync(store.exists("outer"))
    assert catalog.list_files("", recursive=True) == ["after/clear"]


def test_transactions_need_a_backend_with_transactions(tmp_path: Path) -> None:
    store = PolystoreStore(DiskBackend(tmp_path))
    with pytest.raises(UnsupportedOperationError), store.transaction():
        pass


def test_a_store_in_a_transaction_refuses_pickling(catalog: SQLBackend) -> None:
    store = PolystoreStore(catalog)
    with store.transaction(), pytest.raises(TypeError, match="transaction"):
        pickle.dumps(store)


async def _collect(iterator: Any) -> list[str]:
    return [item async for item in iterator]


# -- partial reads -------------------------------------------------------------------------


class _Spy:
    """What a backend read: paths loaded whole, SQL ranges and blob-store ranges."""

    def __init__(self, backend: SQLBackend, monkeypatch: pytest.MonkeyPatch) -> None:
        self.loaded: list[str] = []
        self.sql_ranges: list[int] = []
        self.store_ranges: list[int] = []
        self.store_opens: list[str] = []
        load = backend.load

        def counting_load(path: str, **kwargs: Any) -> Any:
            self.loaded.append(path)
            return load(path, **kwargs)

        monkeypatch.setattr(backend, "load", counting_load)

        @sa.event.listens_for(backend.engine, "before_cursor_execute")
        def statement(conn: Any, cursor: Any, text: str, params: Any, *args: Any) -> None:
            if "substr(" in text:
                values = params.values() if isinstance(params, dict) else params
                _first, length = (v for v in values if isinstance(v, int))
                self.sql_ranges.append(length)

        self._listener = statement
        blob_store = backend.blob_store
        if blob_store is not None:
            read_range, open_ = blob_store.read_range, blob_store.open

            def counting_range(content_hash: str, start: int, end: int) -> bytes:
                data = read_range(content_hash, start, end)
                self.store_ranges.append(len(data))
                return data

            def counting_open(content_hash: str) -> Any:
                self.store_opens.append(content_hash)
                return open_(content_hash)

            monkeypatch.setattr(blob_store, "read_range", counting_range)
            monkeypatch.setattr(blob_store, "open", counting_open)


@pytest.mark.parametrize("inline_limit", [1 << 20, 0], ids=["inline", "blob-store"])
def test_a_sharded_array_reads_only_the_chunks_it_needs(
    open_backend: Callable[..., SQLBackend],
    catalog_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    inline_limit: int,
) -> None:
    backend = open_backend(
        catalog_url, blob_store=LocalBlobStore(tmp_path / "blobs"), inline_limit=inline_limit
    )
    store = PolystoreStore(backend, "sharded")
    data = np.arange(200 * 200, dtype="f4").reshape(200, 200)
    array = zarr.create_array(store, shape=data.shape, shards=(200, 200), chunks=(20, 20),
                              dtype="f4", compressors=None)  # fmt: skip
    array[:] = data
    shard = "sharded/c/0/0"
    shard_size = backend.stat(shard).size
    assert shard_size > data.nbytes  # one object: 100 chunks and their index

    spy = _Spy(backend, monkeypatch)
    reader = zarr.open_array(PolystoreStore(backend, "sharded"), mode="r")
    np.testing.assert_array_equal(reader[15:25, 35:45], data[15:25, 35:45])  # in 4 chunks
    assert shard not in spy.loaded
    read = spy.store_ranges if inline_limit == 0 else spy.sql_ranges
    chunk, index = 20 * 20 * 4, 100 * 16 + 4
    assert sum(read) == 4 * chunk + index, read
    assert backend.stat(shard).hash not in spy.store_opens


@pytest.mark.parametrize("inline_limit", [1 << 20, 0], ids=["inline", "blob-store"])
def test_byte_ranges_read_only_their_bytes(
    open_backend: Callable[..., SQLBackend],
    catalog_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    inline_limit: int,
) -> None:
    backend = open_backend(
        catalog_url, blob_store=LocalBlobStore(tmp_path / "blobs"), inline_limit=inline_limit
    )
    store = PolystoreStore(backend)
    content = bytes(range(256)) * 400
    sync(store.set("k", cpu.Buffer.from_bytes(content)))
    spy = _Spy(backend, monkeypatch)
    proto = default_buffer_prototype()
    got = sync(store.get("k", proto, RangeByteRequest(1000, 1010)))
    assert got is not None and got.to_bytes() == content[1000:1010]
    tail = store.get_sync("k", byte_range=SuffixByteRequest(7))
    assert tail is not None and tail.to_bytes() == content[-7:]
    assert spy.loaded == []
    assert (spy.store_ranges if inline_limit == 0 else spy.sql_ranges) == [10, 7]


# -- equality and pickling -------------------------------------------------------------------


def test_equal_when_url_path_and_read_only_are(
    open_backend: Callable[..., SQLBackend], catalog_url: str
) -> None:
    backend = open_backend(catalog_url)
    store = PolystoreStore(backend, "a")
    assert store == PolystoreStore(catalog_url, "/a/")
    assert store == store.with_read_only(False)
    assert store != store.with_read_only(True)
    assert store != PolystoreStore(backend, "b")
    assert hash(store) == hash(PolystoreStore(catalog_url, "a"))
    memory = MemoryBackend()
    assert PolystoreStore(memory) == PolystoreStore(memory)
    assert PolystoreStore(memory) != PolystoreStore(MemoryBackend())


def test_pickles_by_configuration(
    open_backend: Callable[..., SQLBackend], catalog_url: str, tmp_path: Path
) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs", fsync=False)
    backend = open_backend(catalog_url, blob_store=blobs, inline_limit=0)
    store = PolystoreStore(backend, "p", read_only=True)
    writer = store.with_read_only(False)
    zarr.create_array(writer, shape=(3,), dtype="i1")[:] = [1, 2, 3]

    copy = pickle.loads(pickle.dumps(store))
    assert copy == store and copy.read_only
    assert copy.backend is not backend  # its own catalog, opened on first use
    assert isinstance(copy.backend, SQLBackend)
    assert copy.backend.inline_limit == 0
    assert copy.backend.blob_store is not None and copy.backend.blob_store.name == "local"
    assert zarr.open_array(copy, mode="r")[:].tolist() == [1, 2, 3]
    copy.close()


def test_in_memory_catalogs_refuse_pickling(
    open_backend: Callable[..., SQLBackend],
) -> None:
    with pytest.raises(TypeError, match="MemoryBackend"):
        pickle.dumps(PolystoreStore(MemoryBackend()))
    backend = open_backend("sqlite://")
    with pytest.raises(TypeError, match="in-memory SQLite"):
        pickle.dumps(PolystoreStore(backend))


def test_importing_polystore_does_not_import_zarr() -> None:
    code = "import sys, polystore; assert 'zarr' not in sys.modules, 'zarr imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- xarray and dask ----------------------------------------------------------------------------


def test_xarray_to_zarr_and_open_zarr(catalog: SQLBackend) -> None:
    xr = pytest.importorskip("xarray")
    dataset = xr.Dataset(
        {"temperature": (("time", "x"), np.random.default_rng(0).random((6, 5)))},
        coords={"time": np.arange(6), "x": np.linspace(0, 1, 5)},
        attrs={"site": "north"},
    )
    store = PolystoreStore(catalog, "climate.zarr")
    dataset.to_zarr(store, mode="w", consolidated=False)
    again = xr.open_zarr(PolystoreStore(catalog, "climate.zarr"), consolidated=False)
    xr.testing.assert_identical(again.load(), dataset)
    assert catalog.stat("climate.zarr/temperature/zarr.json").attrs["shape"] == [6, 5]


@pytest.mark.parametrize("scheduler", ["threads", "processes"])
def test_dask_from_zarr(
    open_backend: Callable[..., SQLBackend], sqlite_url: str, scheduler: str
) -> None:
    da = pytest.importorskip("dask.array")
    backend = open_backend(sqlite_url)
    store = PolystoreStore(backend, "big")
    data = np.arange(60 * 40, dtype="f8").reshape(60, 40)
    zarr.create_array(store, shape=data.shape, chunks=(20, 20), dtype="f8")[:] = data
    lazy = da.from_zarr(PolystoreStore(backend, "big", read_only=True))
    assert lazy.chunks == ((20, 20, 20), (20, 20))
    assert float(lazy.sum().compute(scheduler=scheduler)) == float(data.sum())


def test_the_zarr_benchmark_runs(tmp_path: Path) -> None:
    """The benchmark scenario still runs (quick sizes, one round); its times are not checked."""
    run = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
    result = subprocess.run(
        [sys.executable, str(run), "--quick", "--repeat", "1", "--only", "zarr_sqlite",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| zarr_")]
    assert len(rows) == 14, result.stdout
    assert all(row.rstrip().endswith("| info   |") for row in rows), rows


# -- group commit: concurrent writes share transactions --------------------------------


def test_writes_arriving_during_a_commit_share_the_next_one() -> None:
    from polystore.zarr import _GroupCommit

    applied: list[dict[str, bytes | None]] = []
    first_started, release = threading.Event(), threading.Event()

    def apply(writes: dict[str, bytes | None]) -> None:
        applied.append(dict(writes))
        if len(applied) == 1:
            first_started.set()
            release.wait(10)
        if "bad" in writes:
            raise SerializationError("bad value")

    commits = _GroupCommit(apply, SimpleNamespace(local=False))  # (on a worker thread)

    async def main() -> list[Any]:
        first = asyncio.ensure_future(commits.submit(("a", b"1")))
        await asyncio.to_thread(first_started.wait, 10)
        rest = [asyncio.ensure_future(commits.submit((k, b"2"))) for k in ("b", "bad", "c")]
        await asyncio.sleep(0.05)  # all three queued behind the commit in flight
        release.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)

    outcomes = asyncio.run(main())
    assert outcomes[0] is None and outcomes[1] is None and outcomes[3] is None
    assert isinstance(outcomes[2], SerializationError)  # only its own write failed
    # One commit alone, one for the three queued together (it failed), then each again.
    assert applied[:2] == [{"a": b"1"}, {"b": b"2", "bad": b"2", "c": b"2"}]
    assert sorted(map(tuple, applied[2:])) == [("b",), ("bad",), ("c",)]


def test_a_group_on_the_loop_runs_outside_the_callers_context() -> None:
    # zarr's sync API hands each call to its loop with the calling thread's
    # context; a group run on the loop must not see it (a worker thread does not).
    from polystore.zarr import _GroupCommit

    marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="unset")
    seen: list[tuple[str, int]] = []
    commits = _GroupCommit(
        lambda writes: seen.append((marker.get(), threading.get_ident())),
        SimpleNamespace(local=True, inline_up_to=float("inf"), writer_busy=False),
    )

    async def main() -> None:
        marker.set("the caller's")
        await asyncio.gather(*(commits.submit((k, b"v")) for k in "abc"))

    asyncio.run(main())
    assert seen == [("unset", threading.get_ident())]  # one group, on the loop's thread


def test_no_call_of_the_store_joins_a_transaction_open_in_the_calling_thread(
    catalog: SQLBackend,
) -> None:
    # zarr's sync API hands each call to its loop with the calling thread's
    # context, where a catalog.transaction() may be open: the store's calls
    # on worker threads must not run in it, as its group commits do not.
    store = PolystoreStore(catalog)

    async def keys() -> list[str]:
        return [key async for key in store.list()]

    with catalog.transaction():
        catalog.save(b"not committed yet", "k")
        assert sync(store.exists("k")) is False
        assert sync(keys()) == []
    assert sync(store.exists("k")) is True
    assert sync(keys()) == ["k"]


def test_a_write_through_zarr_inside_a_callers_transaction_fails_at_once(
    catalog: SQLBackend,
) -> None:
    # Run on zarr's thread, it could not join the transaction, only wait for
    # its locks (SQLite's write lock: the whole busy timeout, retried).
    store = PolystoreStore(catalog)
    value = cpu.Buffer.from_bytes(b"1")
    writes = [
        lambda: store.set("k", value),
        lambda: store.set_if_not_exists("k", value),
        lambda: store.delete("k"),
        lambda: store.delete_dir("d"),
        lambda: store._set_many([("k", value)]),
    ]
    with catalog.transaction():
        for write in writes:
            with pytest.raises(UnsupportedOperationError, match=r"PolystoreStore\.transaction"):
                sync(write())
        with store.transaction():  # kept until the block ends, on this thread: joined
            sync(store.set("k", value))
    assert catalog.load("k") == b"1"
    sync(store.delete_dir("d"))  # outside any transaction: fine


def test_a_conditional_write_in_a_store_block_sees_the_callers_transaction(
    catalog: SQLBackend,
) -> None:
    # The block's writes are applied by this thread, in the caller's
    # transaction: set_if_not_exists must not replace what that one wrote.
    store = PolystoreStore(catalog)
    with catalog.transaction():
        catalog.save(b"mine", "k")
        with store.transaction():
            sync(store.set_if_not_exists("k", cpu.Buffer.from_bytes(b"zarr")))
            sync(store.set_if_not_exists("new", cpu.Buffer.from_bytes(b"zarr")))
    assert catalog.load("k") == b"mine" and catalog.load("new") == b"zarr"


def test_reads_through_zarr_refuse_a_transaction_on_an_in_memory_catalog() -> None:
    # One connection: a read from zarr's thread would take it from the
    # transaction and roll the transaction back.
    with SQLBackend("sqlite://") as catalog:
        store = PolystoreStore(catalog)
        with catalog.transaction():
            catalog.save(b"1", "k")
            for read in (
                lambda: store.exists("k"),
                lambda: store.get("k", default_buffer_prototype()),
            ):
                with pytest.raises(UnsupportedOperationError, match="one connection"):
                    sync(read())
            assert catalog.load("k") == b"1"  # the transaction is whole
        assert sync(store.exists("k")) and catalog.load("k") == b"1"


def test_a_group_goes_to_a_worker_while_another_thread_writes() -> None:
    # Waiting on zarr's loop for another thread's write would hold all of zarr's I/O.
    from polystore.zarr import _GroupCommit

    threads: list[int] = []
    commits = _GroupCommit(
        lambda writes: threads.append(threading.get_ident()),
        SimpleNamespace(local=True, inline_up_to=float("inf"), writer_busy=True),
    )

    async def main() -> None:
        await asyncio.gather(*(commits.submit((k, b"v")) for k in "abc"))

    asyncio.run(main())
    assert threads and threading.get_ident() not in threads


def test_chunks_of_unknown_size_are_not_read_on_zarrs_loop(
    open_backend: Callable[..., SQLBackend], sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import polystore.zarr

    backend = open_backend(sqlite_url)
    data = np.arange(8000, dtype="f4")
    array = zarr.create_array(
        PolystoreStore(backend), shape=data.shape, chunks=(1000,), dtype="f4", compressors=None
    )
    array[:] = data
    monkeypatch.setattr(polystore.zarr, "GROUP_UNDER", 3000)  # chunks of 4000 bytes: "large"
    threads: list[str] = []
    batch_loads(backend, monkeypatch, threads)
    load = backend.load

    def recorded(path: str) -> Any:
        threads.append(threading.current_thread().name)
        return load(path)

    monkeypatch.setattr(backend, "load", recorded)
    # A new store knows nothing of the sizes of its chunks: the first are read
    # on a worker thread, and once they are seen to be large, the rest too.
    np.testing.assert_array_equal(zarr.open_array(PolystoreStore(backend), mode="r")[:], data)
    assert threads and "zarr_io" not in threads


def test_small_writes_to_an_sqlite_catalog_go_on_zarrs_loop_others_on_workers(
    open_backend: Callable[..., SQLBackend],
    sqlite_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = open_backend(sqlite_url, blob_store=LocalBlobStore(tmp_path / "b"), inline_limit=2048)
    saved: dict[str, list[tuple[str, ...]]] = {}  # thread name -> batches of paths
    save_batch = backend.save_batch

    def recorded(values: list[Any], paths: list[str], **kwargs: Any) -> None:
        saved.setdefault(threading.current_thread().name, []).append(tuple(paths))
        save_batch(values, paths, **kwargs)

    monkeypatch.setattr(backend, "save_batch", recorded)
    store = PolystoreStore(backend)
    with zarr.config.set({"async.concurrency": 8}):
        for chunk in (256, 1024):  # chunks of 1 KiB (in the catalog), then 4 KiB (not)
            data = np.arange(64 * chunk, dtype="f4")
            array = zarr.create_array(
                store,
                name=str(chunk),
                shape=data.shape,
                chunks=(chunk,),
                dtype="f4",
                compressors=None,
            )
            array[:] = data
            np.testing.assert_array_equal(zarr.open_array(store, path=str(chunk))[:], data)
    on_loop = saved.pop("zarr_io")
    on_workers = [path for batches in saved.values() for batch in batches for path in batch]
    assert sorted(p for p in on_workers if "/c/" in p) == sorted(f"1024/c/{i}" for i in range(64))
    on_loop_paths = [path for batch in on_loop for path in batch]
    assert sorted(p for p in on_loop_paths if "/c/" in p) == sorted(f"256/c/{i}" for i in range(64))
    assert len(on_loop) < 64  # chunks written at once shared commits


def test_concurrent_chunk_writes_take_fewer_commits_than_chunks(
    open_backend: Callable[..., SQLBackend], sqlite_url: str
) -> None:
    backend = open_backend(sqlite_url)
    commits = 0

    @sa.event.listens_for(backend.engine, "commit")
    def count(conn: Any) -> None:
        nonlocal commits
        commits += 1

    data = np.arange(4000, dtype="f4")
    array = zarr.create_array(PolystoreStore(backend), shape=data.shape, chunks=(10,), dtype="f4")
    commits = 0
    array[:] = data
    np.testing.assert_array_equal(zarr.open_array(PolystoreStore(backend), mode="r")[:], data)
    assert 0 < commits < 400  # 400 chunks, written up to zarr's concurrency at a time


def batch_loads(
    backend: SQLBackend, monkeypatch: pytest.MonkeyPatch, threads: list[str] | None = None
) -> list[tuple[list[str], bool]]:
    """Each ``load_batch`` call from now on: its paths, and whether it loaded (or raised);
    the name of the thread of each, in ``threads``."""
    calls: list[tuple[list[str], bool]] = []
    load_batch = backend.load_batch

    def counted(paths: list[str], **kwargs: Any) -> list[Any]:
        if threads is not None:
            threads.append(threading.current_thread().name)
        calls.append((list(paths), False))
        values = load_batch(paths, **kwargs)
        calls[-1] = (calls[-1][0], True)
        return values

    monkeypatch.setattr(backend, "load_batch", counted)
    return calls


def test_concurrent_chunk_reads_share_batch_loads(
    open_backend: Callable[..., SQLBackend], catalog_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = open_backend(catalog_url)
    data = np.arange(4000, dtype="f4")
    store = PolystoreStore(backend)
    array = zarr.create_array(store, shape=data.shape, chunks=(10,), dtype="f4", fill_value=-1)
    array[:2000] = data[:2000]  # the last 200 chunks are never written
    threads: list[str] = []
    calls = batch_loads(backend, monkeypatch, threads)
    single: list[str] = []  # the thread of each load() of a chunk
    load = backend.load

    def counted(path: str) -> Any:
        if path.startswith("c/"):
            single.append(threading.current_thread().name)
        return load(path)

    monkeypatch.setattr(backend, "load", counted)
    read = zarr.open_array(store, mode="r")[:]
    np.testing.assert_array_equal(read[:2000], data[:2000])
    assert (read[2000:] == -1).all()  # missing chunks: the fill value
    batches = [len(paths) for paths, loaded in calls if loaded]
    assert batches and max(batches) > 1
    if backend.engine.dialect.name == "sqlite":
        # Once the chunks are known to be small, each is read on zarr's loop
        # itself, without waiting: only the first group went to a worker thread.
        assert sum(batches) + len(single) == 400 and "zarr_io" not in threads
        assert single.count("zarr_io") >= 300
    else:  # a database server is read from worker threads, in groups
        assert len(batches) < 400 and "zarr_io" not in threads + single


def test_a_read_cancelled_as_it_starts_does_not_stop_the_store(
    open_backend: Callable[..., SQLBackend], catalog_url: str
) -> None:
    backend = open_backend(catalog_url)
    backend.save(b"bytes", "k")
    store = PolystoreStore(backend)

    async def main() -> Any:
        first = asyncio.ensure_future(store.get("k"))
        await asyncio.sleep(0)  # it has queued its read, and is cancelled at once
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        return await asyncio.wait_for(store.get("k"), timeout=30)

    assert asyncio.run(main()).to_bytes() == b"bytes"


def test_once_a_large_chunk_is_read_chunks_are_read_each_alone(
    open_backend: Callable[..., SQLBackend], sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Large values are read several at once, each on a thread of its own.
    import polystore.zarr

    backend = open_backend(sqlite_url)
    data = np.arange(8000, dtype="f4")
    store = PolystoreStore(backend)
    array = zarr.create_array(store, shape=data.shape, chunks=(1000,), dtype="f4", compressors=None)
    array[:] = data
    monkeypatch.setattr(polystore.zarr, "GROUP_UNDER", 3000)  # chunks of 4000 bytes: "large"
    batches = batch_loads(backend, monkeypatch)
    # (The reads queued before the first chunk was seen are still read together.)
    np.testing.assert_array_equal(zarr.open_array(store, mode="r")[:], data)
    batches.clear()
    np.testing.assert_array_equal(zarr.open_array(store, mode="r")[:], data)
    assert batches == []
    monkeypatch.setattr(polystore.zarr, "GROUP_UNDER", 1 << 20)  # small again
    threads: list[str] = []
    load = backend.load

    def counted(path: str) -> Any:
        threads.append(threading.current_thread().name)
        return load(path)

    monkeypatch.setattr(backend, "load", counted)
    for _ in range(2):  # (the first read's chunks are all asked for before one is seen)
        np.testing.assert_array_equal(zarr.open_array(store, mode="r")[:], data)
    assert threads.count("zarr_io") >= 8  # each read on zarr's loop again, as it asks


def test_reads_in_one_group_each_get_their_own_outcome(
    open_backend: Callable[..., SQLBackend], catalog_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = open_backend(catalog_url)
    backend.save(b"bytes", "s/k1")
    backend.save(np.zeros(3), "s/k2")  # not written by a zarr store
    store = PolystoreStore(backend, "s")
    calls = batch_loads(backend, monkeypatch)

    async def main() -> list[Any]:
        gets = [store.get(key) for key in ("k1", "k2", "k3", "k1")]
        return await asyncio.gather(*gets, return_exceptions=True)

    first, second, third, again = asyncio.run(main())
    assert calls == [(["s/k1", "s/k2", "s/k3", "s/k1"], False)]  # one group, which failed
    assert first.to_bytes() == again.to_bytes() == b"bytes"
    assert isinstance(second, SerializationError)
    assert third is None


def test_large_concurrent_writes_commit_in_groups_of_half_of_those_in_flight(
    open_backend: Callable[..., SQLBackend],
    sqlite_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Large chunks are committed half of zarr's writes in flight at a time, so
    # that zarr prepares the next chunks while the other half is written.
    import polystore.zarr

    backend = open_backend(sqlite_url, blob_store=LocalBlobStore(tmp_path / "b"), inline_limit=0)
    batches: list[int] = []
    save_batch = backend.save_batch

    def counted(values: list[Any], paths: list[str], **kwargs: Any) -> None:
        batches.append(len(values))
        save_batch(values, paths, **kwargs)

    monkeypatch.setattr(backend, "save_batch", counted)
    data = np.arange(64 * 256, dtype="f4")  # 64 chunks of 1 KiB
    store = PolystoreStore(backend)
    with zarr.config.set({"async.concurrency": 8}):
        array = zarr.create_array(store, shape=data.shape, chunks=(256,), dtype="f4")
        array[:] = data  # small: whatever queued shares a commit
        assert len(batches) < 64
        batches.clear()
        monkeypatch.setattr(polystore.zarr, "SPLIT_OVER", 2048)  # now "large"
        array[:] = data + 1
    assert sum(batches) == 64
    assert max(batches) <= 4
    np.testing.assert_array_equal(zarr.open_array(store, mode="r")[:], data + 1)
