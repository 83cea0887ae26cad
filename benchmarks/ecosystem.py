"""The ecosystem goals: zarr through ``PolystoreStore``, and slices of lazy arrays.

``zarr_small``: a zarr array of 10,000 chunks of 4 KiB (float32, no
compressor) written and read back whole, through ``PolystoreStore`` on a fresh
SQLite catalog and through zarr's ``LocalStore``, in the same rounds. zarr's
own ``MemoryStore`` runs too: it stores nothing anywhere, so its time is
zarr's own cost per chunk -- the floor under every store.

``zarr_large``: 1 GiB in chunks of 16 MiB, ``PolystoreStore`` with content in
the catalog's local blob store (hashed, fsynced) against ``LocalStore``
(neither). Two more writers, like for like and for scale: ``PolystoreStore``
over a blob store opened with ``fsync=False`` (hashed, not fsynced: what
``LocalStore`` does but the hash), and the disk's floor for the durable
write -- the same bytes as plain files of one chunk each, each fsynced, and
their directory, with no zarr, no hash and no catalog.

``array_slice``: 4 rows of a 512 MiB array stored in an SQL catalog (content
in its local blob store), read through ``open_array`` against ``load`` of the
whole array: time, and peak memory as ``tracemalloc`` sees it (numpy reports
its buffers to it).
"""

from __future__ import annotations

import os
import shutil
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
from drivers import fresh_file, fresh_name, open_catalog, remove_sqlite
from harness import Bench, Row, Side, median, step, time_runs

from polystore.backends.sql import SQLBackend
from polystore.blobs import LocalBlobStore

__all__ = ["array_slice", "zarr_large", "zarr_small"]

MiB = 1 << 20


def _missing_zarr(name: str) -> list[Row] | None:
    try:
        import zarr  # noqa: F401

        from polystore.zarr import PolystoreStore  # noqa: F401
    except ImportError as exc:
        reason = f"zarr is not installed ({exc}): pip install 'polystore[zarr]'"
        return [Row(name=name, what=reason, kind="skip", note=reason)]
    return None


class _Store:
    """A fresh place for one array: a catalog, a directory, or memory.

    Kinds: ``polystore`` (and ``polystore-tx``, writing inside
    ``store.transaction()``; ``polystore-nosync``, its blob store not
    fsyncing; ``polystore-nosync-sha256``, that in a catalog whose content
    SHA-256 names), ``local`` (zarr's ``LocalStore``), ``memory`` (zarr's
    ``MemoryStore``), and ``files-fsync`` (no zarr: each chunk a plain file,
    fsynced).
    """

    def __init__(self, bench: Bench, kind: str, *, external: bool = False) -> None:
        from zarr.storage import LocalStore, MemoryStore

        from polystore.zarr import PolystoreStore

        self.kind = kind
        self.backend: SQLBackend | None = None
        self.path: Path | None = None
        if kind.startswith("polystore"):
            self.path = fresh_file(bench, "zarr")
            options: dict[str, Any] = {"inline_limit": 0} if external else {}
            if external:
                blobs = f"{self.path}.blobs"
                nosync = kind.startswith("polystore-nosync")
                options["blob_store"] = LocalBlobStore(blobs, fsync=False) if nosync else blobs
            algorithm = "sha256" if kind.endswith("-sha256") else "blake3"
            self.backend = open_catalog(self.path, hash_algorithm=algorithm, **options)
            self.store: Any = PolystoreStore(self.backend)
        elif kind in ("local", "files-fsync"):
            self.path = fresh_name(bench, f"zarr-{kind}")
            self.store = LocalStore(self.path)
        else:
            self.store = MemoryStore()

    def write(self, data: np.ndarray, chunks: tuple[int, ...]) -> None:
        import zarr

        if self.kind == "files-fsync":
            assert self.path is not None
            _fsynced_files(self.path, memoryview(data).cast("B"), chunks[0] * data.itemsize)
            return

        def write() -> None:
            zarr.create_array(
                self.store, shape=data.shape, chunks=chunks, dtype=data.dtype, compressors=None
            )[:] = data

        if self.kind == "polystore-tx":
            with self.store.transaction():
                write()
        else:
            write()

    def read(self) -> np.ndarray:
        import zarr

        return zarr.open_array(self.store, mode="r")[:]  # type: ignore[no-any-return]

    def remove(self) -> None:
        if self.backend is not None:
            assert self.path is not None
            self.backend.close()
            remove_sqlite(self.path)
            shutil.rmtree(f"{self.path}.blobs", ignore_errors=True)
        elif self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)


def _fsynced_files(directory: Path, data: memoryview, size: int) -> None:
    """``data`` as files of ``size`` bytes in new ``directory``, each fsynced, then it."""
    directory.mkdir()
    for n, start in enumerate(range(0, data.nbytes, size)):
        fd = os.open(directory / str(n), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = data[start : start + size]
            while view.nbytes:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_and_read(
    bench: Bench,
    kinds: tuple[str, ...],
    data: np.ndarray,
    chunks: tuple[int, ...],
    repeat: int,
    *,
    external: bool = False,
    write_only: tuple[str, ...] = (),
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds to write ``data`` whole through each kind of store, and to read it back
    (the ``write_only`` kinds are written only).

    With ``external`` (large arrays) each run starts, untimed, with ``os.sync()``:
    what earlier runs left -- a gigabyte of dirty pages from a side that does
    not fsync, the freed blocks of the last cleanup (which this machine's
    ``discard`` mount trims at the next journal commit) -- would otherwise be
    paid for by whichever side fsyncs next.
    """

    def settled(store: _Store) -> _Store:
        if external:
            os.sync()
        return store

    def write_side(kind: str) -> Side:
        return Side(
            prepare=lambda: settled(_Store(bench, kind, external=external)),
            run=lambda store: store.write(data, chunks),
            cleanup=lambda store: store.remove(),
        )

    def read_side(kind: str) -> Side:
        def prepare() -> _Store:
            store = _Store(bench, kind, external=external)
            store.write(data, chunks)
            return settled(store)

        def check(_: Any, result: np.ndarray) -> None:
            assert np.array_equal(result, data), kind

        return Side(prepare=prepare, run=lambda s: s.read(), check=check, cleanup=_Store.remove)

    writes = time_runs({kind: write_side(kind) for kind in kinds + write_only}, repeat, warmup=0)
    reads = time_runs({kind: read_side(kind) for kind in kinds}, repeat, warmup=0)
    return writes, reads


def _row(
    name: str, what: str, times: dict[str, list[float]], ours: str, theirs: str, goal: float | None
) -> Row:
    return Row(
        name=name,
        what=what,
        polystore=median(times[ours]),
        raw=median(times[theirs]),
        goal=goal,
        samples={ours: times[ours], theirs: times[theirs]},
    )


def zarr_small(bench: Bench) -> list[Row]:
    missing = _missing_zarr("zarr_small")
    if missing:
        return missing
    n = 10_000 if bench.sizes.batch >= 10_000 else 1_000
    data = np.random.default_rng(0).random(n * 1024, dtype=np.float32)
    kinds = ("polystore", "polystore-tx", "local", "memory")
    with step(f"zarr_small: {n} chunks of 4 KiB, written and read through each store"):
        writes, reads = _write_and_read(bench, kinds, data, (1024,), bench.repeat)
    arr = f"{n} chunks of 4 KiB"
    return [
        _row(
            "zarr_small_write~local",
            f"zarr: write {arr} through PolystoreStore (SQLite; concurrent chunk writes "
            "share commits) vs LocalStore; goal: 3x faster",
            writes, "polystore", "local", 1 / 3,
        ),
        _row(
            "zarr_small_write_tx~local",
            f"zarr: write {arr} inside store.transaction() vs LocalStore",
            writes, "polystore-tx", "local", None,
        ),
        _row(
            "zarr_small_write_memory~local",
            f"zarr: write {arr} to zarr's MemoryStore (zarr's own cost, no storage) vs LocalStore",
            writes, "memory", "local", None,
        ),
        _row(
            "zarr_small_read~local",
            f"zarr: read {arr} back whole through PolystoreStore vs LocalStore; goal: 3x faster",
            reads, "polystore", "local", 1 / 3,
        ),
        _row(
            "zarr_small_read_memory~local",
            f"zarr: read {arr} from zarr's MemoryStore (zarr's own cost) vs LocalStore",
            reads, "memory", "local", None,
        ),
    ]  # fmt: skip


def zarr_large(bench: Bench) -> list[Row]:
    missing = _missing_zarr("zarr_large")
    if missing:
        return missing
    full = bench.sizes.batch >= 10_000
    total, chunk = (1024 * MiB, 16 * MiB) if full else (64 * MiB, 4 * MiB)
    data = np.random.default_rng(1).random(total // 4, dtype=np.float32)
    size = f"{total // MiB} MiB in chunks of {chunk // MiB} MiB"
    with step(f"zarr_large: {size}, through each store"):
        writes, reads = _write_and_read(
            bench,
            ("polystore", "local"),
            data,
            (chunk // 4,),
            min(bench.repeat, 3),
            external=True,
            write_only=("polystore-nosync", "polystore-nosync-sha256", "files-fsync"),
        )
    what = (
        "through PolystoreStore (SQLite catalog, local blob store: hashed, each chunk fsynced "
        "before its commit) vs LocalStore (no hash, no fsync)"
    )
    return [
        _row("zarr_large_write~local", f"zarr: write {size} {what}; goal: 1.5x",
             writes, "polystore", "local", 1.5),
        _row("zarr_large_write_nosync~local",
             f"zarr: write {size} through PolystoreStore over LocalBlobStore(fsync=False) "
             "(hashed, not fsynced) vs LocalStore (no hash, no fsync): like for like",
             writes, "polystore-nosync", "local", None),
        _row("zarr_large_write_floor~local",
             f"the disk's floor under the durable write: {size} as plain files, one per chunk, "
             "each fsynced, and their directory (no zarr, hash or catalog) vs LocalStore",
             writes, "files-fsync", "local", None),
        _row("zarr_large_read~local", f"zarr: read {size} {what}; goal: 1.5x",
             reads, "polystore", "local", 1.5),
        _row("zarr_large_write_nosync~sha256",
             f"zarr: write {size} through PolystoreStore over LocalBlobStore(fsync=False), a new "
             "catalog (BLAKE3) vs one whose content SHA-256 names, as catalogs that held "
             "content before revision 0010 do: what the hash costs, without the disk's noise",
             writes, "polystore-nosync", "polystore-nosync-sha256", None),
    ]  # fmt: skip


def array_slice(bench: Bench) -> list[Row]:
    full = bench.sizes.batch >= 10_000
    rows_n = 65_536 if full else 8_192
    data = np.random.default_rng(2).random((rows_n, 1024))  # 512 MiB (64 MiB --quick)
    path = fresh_file(bench, "slice")
    backend = SQLBackend(f"sqlite:///{path}", blob_store=f"{path}.blobs")
    try:
        with step(f"array_slice: storing a {data.nbytes // MiB} MiB array"):
            backend.save(data, "big.npy")
        where = rows_n // 2
        expected = data[where : where + 4].copy()
        del data

        def whole(_: Any) -> Any:
            return backend.load("big.npy")

        def part(_: Any) -> Any:
            return backend.open_array("big.npy")[where : where + 4]

        def check_part(_: Any, result: np.ndarray) -> None:
            assert np.array_equal(result, expected)

        with step("array_slice: 4 rows through open_array, and load() of the whole"):
            times = time_runs(
                {"slice": Side(run=part, check=check_part), "load": Side(run=whole)},
                min(bench.repeat, 3),
            )
            peaks = {name: _peak(run) for name, run in (("slice", part), ("load", whole))}
    finally:
        backend.close()
        remove_sqlite(path)
        shutil.rmtree(f"{path}.blobs", ignore_errors=True)
    size = f"{rows_n}x1024 float64 ({rows_n * 8192 // MiB} MiB)"
    return [
        _row(
            "array_slice~load",
            f"open_array(p)[i:i+4] of a {size} array vs load(p) of it all; goal: < 5%",
            times, "slice", "load", 0.05,
        ),
        Row(
            name="array_slice_memory~load",
            what=f"peak memory (tracemalloc) of the 4-row slice vs load(): the slice's goal is "
            f"< 64 MiB; it took {peaks['slice'] / MiB:.2f} MiB, load() "
            f"{peaks['load'] / MiB:.0f} MiB",
            polystore=peaks["slice"],
            raw=peaks["load"],
            goal=64 * MiB / (rows_n * 8192),
            kind="bytes",
        ),
    ]  # fmt: skip


def _peak(run: Any) -> int:
    tracemalloc.start()
    try:
        run(None)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
