"""A zarr array through ``PolystoreStore`` on SQLite, against zarr's own LocalStore and ZipStore.

Each run writes a whole float32 array (no compressor, so the stores move the same
bytes) or reads it back whole, through zarr's synchronous API, which runs the
store calls on zarr's I/O thread. The array is written twice: in large chunks
(1 MB, at the default inline limit) and small ones (40 KB). PolystoreStore
commits the chunks zarr writes at once together (group commit); ``in transaction()`` writes
them all in one. LocalStore and ZipStore never fsync; the SQLite catalog
checkpoints its WAL, which does.

A third figure reads a 10 x 10 slice of a sharded array (one object holding all
the chunks): each store reads the shard's index and one chunk by byte range.

zarr is optional: without it the scenario prints one SKIP row.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
from drivers import fresh_file, fresh_name, remove_sqlite
from harness import Bench, Row, Side, median, step, time_calls, time_runs

from polystore.backends.sql import SQLBackend

__all__ = ["zarr_sqlite"]


def _layouts(bench: Bench) -> list[tuple[str, tuple[int, int], tuple[int, int]]]:
    """(label, array shape, chunk shape): large chunks, then small ones."""
    if bench.sizes.batch < 10_000:  # --quick
        return [("250KB", (1000, 1000), (250, 250)), ("10KB", (1000, 1000), (50, 50))]
    return [("1MB", (4000, 4000), (500, 500)), ("40KB", (4000, 4000), (100, 100))]


def zarr_sqlite(bench: Bench) -> list[Row]:
    try:
        import zarr  # noqa: F401

        from polystore.zarr import PolystoreStore  # noqa: F401
    except ImportError as exc:
        reason = f"zarr is not installed ({exc}): pip install 'polystore[zarr]'"
        return [Row(name="zarr_sqlite", what=reason, kind="skip", note=reason)]
    rows: list[Row] = []
    for label, shape, chunks in _layouts(bench):
        rows += _write_and_read(bench, label, shape, chunks)
    rows += _slice(bench)
    return rows


class _Target:
    """One place an array goes: a fresh SQLite catalog, directory or zip file."""

    def __init__(self, bench: Bench, kind: str) -> None:
        from zarr.storage import LocalStore, ZipStore

        from polystore.zarr import PolystoreStore

        self.kind = kind
        self.backend: SQLBackend | None = None
        if kind.startswith("polystore"):
            self.path = fresh_file(bench, "zarr")
            self.backend = SQLBackend(f"sqlite:///{self.path}")
            self.store: Any = PolystoreStore(self.backend)
        elif kind == "local":
            self.path = fresh_name(bench, "zarr-local")
            self.store = LocalStore(self.path)
        else:
            self.path = fresh_name(bench, "zarr").with_suffix(".zip")
            self.store = ZipStore(self.path, mode="w")

    def reader(self) -> Any:
        """A read-only store on what was written."""
        from zarr.storage import LocalStore, ZipStore

        from polystore.zarr import PolystoreStore

        if self.backend is not None:
            return PolystoreStore(self.backend, read_only=True)
        if self.kind == "local":
            return LocalStore(self.path, read_only=True)
        return ZipStore(self.path, mode="r")

    def count(self) -> int:
        """How many objects the array left behind (chunks + its zarr.json)."""
        if self.backend is not None:
            return len(self.backend.list_files("", recursive=True))
        if self.kind == "local":
            return sum(1 for p in Path(self.path).rglob("*") if p.is_file())
        import zipfile

        with zipfile.ZipFile(self.path) as archive:
            return len(archive.namelist())

    def remove(self) -> None:
        if self.backend is not None:
            self.backend.close()
            remove_sqlite(self.path)
            shutil.rmtree(f"{self.path}.blobs", ignore_errors=True)
        elif self.kind == "local":
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            self.store.close()
            Path(self.path).unlink(missing_ok=True)


def _write(target: _Target, data: np.ndarray, chunks: tuple[int, int], **kwargs: Any) -> None:
    import zarr

    def write() -> None:
        zarr.create_array(
            target.store,
            shape=data.shape,
            chunks=chunks,
            dtype=data.dtype,
            compressors=None,
            **kwargs,
        )[:] = data

    if target.kind == "polystore-tx":
        with target.store.transaction():
            write()
    else:
        write()
    if target.kind == "zip":
        target.store.close()  # the central directory: part of writing a zip


def _write_and_read(
    bench: Bench, label: str, shape: tuple[int, int], chunks: tuple[int, int]
) -> list[Row]:
    import zarr

    data = np.random.default_rng(0).random(shape, dtype=np.float32)
    objects = (shape[0] // chunks[0]) * (shape[1] // chunks[1]) + 1
    size = f"{shape[0]}x{shape[1]} float32 ({data.nbytes >> 20} MiB) in {objects - 1} chunks"

    def write_side(kind: str) -> Side:
        def check(target: _Target, _: Any) -> None:
            assert target.count() == objects, (kind, target.count(), objects)

        return Side(
            prepare=lambda: _Target(bench, kind),
            run=lambda target: _write(target, data, chunks),
            check=check,
            cleanup=lambda target: target.remove(),
        )

    kinds = ("polystore", "polystore-tx", "local", "zip")
    with step(f"zarr {label}: writing {size} through each store"):
        writes = time_runs({kind: write_side(kind) for kind in kinds}, bench.repeat)

    written = {kind: _Target(bench, kind) for kind in ("polystore", "local", "zip")}
    try:
        for target in written.values():
            _write(target, data, chunks)
        readers = {kind: target.reader() for kind, target in written.items()}

        def read_side(kind: str) -> Side:
            def check(_: Any, result: np.ndarray) -> None:
                assert np.array_equal(result, data), kind

            return Side(run=lambda _: zarr.open_array(readers[kind], mode="r")[:], check=check)

        with step(f"zarr {label}: reading it back whole through each store"):
            reads = time_runs({kind: read_side(kind) for kind in written}, bench.repeat)
        bench.profile(f"zarr_read_{label}", lambda: read_side("polystore").run(None))
    finally:
        for target in written.values():
            target.remove()

    def row(name: str, what: str, times: dict[str, list[float]], ours: str, theirs: str) -> Row:
        return Row(
            name=name,
            what=what,
            polystore=median(times[ours]),
            raw=median(times[theirs]),
            samples={ours: times[ours], theirs: times[theirs]},
        )

    write_what = f"zarr: write {size}, each chunk committed as zarr writes it, vs zarr's"
    tx_what = f"zarr: write {size} inside store.transaction() (one commit), vs zarr's"
    read_what = f"zarr: read {size} back whole, vs zarr's"
    return [
        row(f"zarr_write_{label}~local", f"{write_what} LocalStore", writes, "polystore", "local"),
        row(f"zarr_write_{label}~zip", f"{write_what} ZipStore", writes, "polystore", "zip"),
        row(
            f"zarr_write_tx_{label}~local", f"{tx_what} LocalStore", writes, "polystore-tx", "local"
        ),
        row(f"zarr_write_tx_{label}~zip", f"{tx_what} ZipStore", writes, "polystore-tx", "zip"),
        row(f"zarr_read_{label}~local", f"{read_what} LocalStore", reads, "polystore", "local"),
        row(f"zarr_read_{label}~zip", f"{read_what} ZipStore", reads, "polystore", "zip"),
    ]


def _slice(bench: Bench) -> list[Row]:
    """A 10 x 10 slice of a sharded array: byte ranges of one object, per call."""
    import zarr

    quick = bench.sizes.batch < 10_000
    shape, inner = ((1000, 1000), (100, 100)) if quick else ((2000, 2000), (100, 100))
    data = np.random.default_rng(1).random(shape, dtype=np.float32)
    targets = {kind: _Target(bench, kind) for kind in ("polystore", "local", "zip")}
    try:
        with step(f"zarr slice: a {shape[0]}x{shape[1]} array in one shard, three ways"):
            for target in targets.values():
                _write(target, data, inner, shards=shape)
        arrays = {kind: zarr.open_array(t.reader(), mode="r") for kind, t in targets.items()}
        expected = data[1234 % shape[0] : 1234 % shape[0] + 10, 567:577]

        def call(kind: str) -> Any:
            array = arrays[kind]
            return lambda: array[1234 % shape[0] : 1234 % shape[0] + 10, 567:577]

        calls = {kind: call(kind) for kind in targets}
        for kind, reading in calls.items():
            assert np.array_equal(reading(), expected), kind
        samples = time_calls(calls, max(bench.sizes.calls // 10, 20), bench.repeat)
    finally:
        for target in targets.values():
            target.remove()
    shard = f"a {shape[0]}x{shape[1]} float32 array in one shard of {inner[0]}x{inner[1]} chunks"
    return [
        Row(
            name=f"zarr_slice~{theirs}",
            what=f"zarr: read a 10x10 slice of {shard} (the shard index and one "
            f"chunk, by byte range) vs zarr's {name} (per call)",
            polystore=median(samples["polystore"]),
            raw=median(samples[theirs]),
            per_call=True,
            samples={"polystore": samples["polystore"], theirs: samples[theirs]},
        )
        for theirs, name in (("local", "LocalStore"), ("zip", "ZipStore"))
    ]
