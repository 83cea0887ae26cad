"""polystore against the tools a user would otherwise pick, on the same workloads.

    python benchmarks/peers.py                 # full sizes, 8-10 minutes here
    python benchmarks/peers.py --quick         # small sizes, a smoke test, well under a minute
    python benchmarks/peers.py --repeat 5 --workdir /scratch

The peers (``pip install 'polystore[bench]'``; a missing one is a SKIP line):

* **polystore**: ``SQLBackend`` on a SQLite file with default options (content
  up to 1 MiB inline in the catalog, larger content in the default blob store
  ``<file>.blobs/``, named by its SHA-256 and fsynced; every load of external
  content checks its piece checksums), and ``DiskBackend`` (one ``.npy`` file per array,
  written to a temporary file, fsynced, renamed) where the workload applies.
* **np.save files**: one ``.npy`` file per array in a directory tree; saving
  also as a second variant that fsyncs each file (``np.save`` alone leaves the
  data in the page cache).
* **h5py**: one HDF5 file, one dataset per array (contiguous, no compression),
  groups for directories; the file is opened once per run (bulk workloads) or
  kept open (per-call workloads).
* **diskcache**: a ``Cache``, one key per path, arrays pickled by diskcache
  (small values in its SQLite file, large ones in files beside it); batches in
  ``cache.transact()``. It has no directories, slices or renames.
* **zarr** (3.x): a ``LocalStore`` directory, one zarr array per path, no
  compressor (as polystore and the others store raw bytes), the small arrays in
  one chunk each, the large one in chunks of 16 MiB.

Workloads (full sizes; ``--quick`` shrinks them): ``save_batch`` of 10,000
float32 arrays of 4 KiB (paths ``batch/NN/NNNNN.npy``, 10 directories of
1,000), ``load_batch`` of them back, one ``load`` of one of them (per call), a
directory move of those 10,000 files and back (per call), ``list_dir`` of a
directory of 100,000 entries, one 1 GiB float64 array (131,072 x 1,024) saved
and loaded whole, and a 4-row slice of it (per call).

Method, as in ``run.py``: one process; each workload's sides run interleaved,
round by round, rotating which goes first, after one untimed warm-up round; the
**median** is quoted and ``ratio`` is the tool's median over polystore's
(SQLite) median, so above 1 means slower than polystore. Per-call workloads
time every call on its own (``perf_counter_ns``) and quote the median call.
Only the operation is timed: creating data, opening stores and building the
state a load reads are not. Every result is checked -- counts after saves,
every loaded array compared byte for byte, listings against the names -- so no
side can measure a no-op. Sides whose one run takes many seconds (the fsynced
saves of 10,000 files, zarr's per-array metadata) are timed in fewer rounds
(``--slow-rounds``, default 1, no warm-up); the ``rounds`` column says how many.
The 1 GiB workloads run ``min(repeat, 3)`` rounds without a warm-up. Loads
read files that were just written, so they come from the page cache for every
tool.

Progress goes to stderr; stdout is the table and its notes. The exit status is
0 (a measurement, not a test).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from harness import (
    Side,
    checkout,
    format_seconds,
    log,
    markdown_table,
    median,
    step,
    time_calls,
    time_runs,
)

from polystore import DiskBackend
from polystore.backends.sql import SQLBackend

MiB = 1 << 20
#: diskcache evicts beyond its ``size_limit``, 1 GiB by default: a 1 GiB array
#: would be culled as soon as it is stored.
CACHE_LIMIT = 1 << 40

POLYSTORE = "polystore"
PS_DISK = "polystore DiskBackend"
NPY = "np.save files"
NPY_FSYNC = "np.save files + fsync"
H5PY = "h5py"
DISKCACHE = "diskcache"
ZARR = "zarr LocalStore"


@dataclass(frozen=True)
class Sizes:
    small: int  # arrays of 4 KiB saved and loaded in a batch
    listing: int  # entries in the list_dir directory
    big_rows: int  # rows of 1,024 float64 (8 KiB) in the large array
    calls: int  # timed calls per round in the per-call workloads
    move_calls: int  # the same for directory moves


FULL = Sizes(small=10_000, listing=100_000, big_rows=131_072, calls=500, move_calls=50)
QUICK = Sizes(small=300, listing=2_000, big_rows=1_024, calls=20, move_calls=10)


@dataclass
class Result:
    """One line of the table: one tool on one workload."""

    workload: str
    tool: str
    seconds: float | None = None
    rounds: int = 0
    calls: int = 0  # per-call workloads: timed calls in each round
    per_call: bool = False
    note: str = ""  # why there is no time (SKIP, n/a), or what the tool did differently
    samples: list[float] = field(default_factory=list)


@dataclass
class Bench:
    sizes: Sizes
    repeat: int
    slow_rounds: int
    workdir: Path
    missing: dict[str, str]  # tool -> why it cannot run
    counter: int = 0

    def fresh(self, stem: str) -> Path:
        self.counter += 1
        return self.workdir / f"{stem}-{self.counter}"


# -- peers -----------------------------------------------------------------------------


def missing_peers() -> dict[str, str]:
    """The peers whose package is not installed, with the reason."""
    missing = {}
    for tool, module in ((H5PY, "h5py"), (DISKCACHE, "diskcache"), (ZARR, "zarr")):
        try:
            imported = __import__(module)
        except ImportError as exc:
            missing[tool] = (
                f"SKIP: {module} is not installed ({exc}); pip install 'polystore[bench]'"
            )
            continue
        if module == "zarr" and int(imported.__version__.split(".")[0]) < 3:
            missing[tool] = f"SKIP: zarr {imported.__version__} is installed, 3.0 or later needed"
    return missing


def versions() -> str:
    parts = []
    for module in ("h5py", "diskcache", "zarr"):
        try:
            parts.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            parts.append(f"{module} missing")
    return ", ".join(parts)


def remove(path: Path) -> None:
    """A file, a directory, or a SQLite catalog with its journal and blob store."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    shutil.rmtree(f"{path}.blobs", ignore_errors=True)


def make_small(n: int) -> tuple[list[np.ndarray], list[str]]:
    """``n`` distinct float32 arrays of 4 KiB and their paths, ``batch/NN/NNNNN.npy``."""
    rng = np.random.default_rng(0)
    values = [rng.random(1024, dtype=np.float32) for _ in range(n)]
    return values, [f"batch/{i // 1000:02d}/{i:05d}.npy" for i in range(n)]


def npy_save(root: Path, names: list[str], values: list[Any], *, fsync: bool) -> None:
    made: set[Path] = set()
    for name, value in zip(names, values, strict=True):
        path = root / name
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        if fsync:
            with open(path, "wb") as fh:
                np.save(fh, value)
                fh.flush()
                os.fsync(fh.fileno())
        else:
            np.save(path, value)


def ensure(ok: bool, what: str) -> None:
    """A check of a side's result (not ``assert``: it must hold under ``python -O`` too)."""
    if not ok:
        raise AssertionError(f"check failed: {what}")


def count_files(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


def h5_count(path: Path) -> int:
    import h5py

    found = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda _, obj: found.append(1) if isinstance(obj, h5py.Dataset) else None)
    return len(found)


def zarr_create(store: Any, name: str, value: np.ndarray, chunks: tuple[int, ...]) -> None:
    import zarr

    zarr.create_array(store, name=name, data=value, chunks=chunks, compressors=None)


def zarr_read(store: Any, name: str, key: Any = ...) -> Any:
    import zarr

    return zarr.open_array(store, path=name, mode="r")[key]


# -- timing ------------------------------------------------------------------------------


class Keeper:
    """Keeps the state of each side's last save run (for the loads), disposes of the rest."""

    def __init__(self, dispose: dict[str, Callable[[Any], None]]) -> None:
        self.dispose = dispose
        self.kept: dict[str, Any] = {}

    def cleanup(self, tool: str) -> Callable[[Any], None]:
        def keep(state: Any) -> None:
            if tool in self.kept:
                self.dispose[tool](self.kept[tool])
            self.kept[tool] = state

        return keep

    def close(self) -> None:
        for tool, state in self.kept.items():
            self.dispose[tool](state)
        self.kept.clear()


def per_call(
    bench: Bench,
    workload: str,
    calls: dict[str, Callable[[], Any]],
    expected: np.ndarray,
    *,
    notes: dict[str, str] | None = None,
) -> list[Result]:
    """Check that every call returns ``expected``, then time them per call."""
    for tool, call in calls.items():
        got = call()
        assert got.dtype == expected.dtype and np.array_equal(got, expected), tool
    with step(f"{workload}: {', '.join(calls)}"):
        samples = time_calls(calls, bench.sizes.calls, bench.repeat)
    return results(workload, samples, calls=bench.sizes.calls, notes=notes)


def results(
    workload: str,
    times: dict[str, list[float]],
    *,
    calls: int = 0,
    notes: dict[str, str] | None = None,
) -> list[Result]:
    """Medians of ``times``; ``calls``: per-call samples, that many to a round."""
    notes = notes or {}
    return [
        Result(
            workload,
            tool,
            median(samples),
            rounds=len(samples) // calls if calls else len(samples),
            calls=calls,
            per_call=bool(calls),
            note=notes.get(tool, ""),
            samples=samples,
        )
        for tool, samples in times.items()
    ]


def not_run(workload: str, bench: Bench, tools: list[str], na: dict[str, str]) -> list[Result]:
    """Lines for tools that cannot run this workload: missing packages, or no such operation."""
    out = [Result(workload, tool, note=bench.missing[tool]) for tool in tools]
    out += [Result(workload, tool, note=f"n/a: {why}") for tool, why in na.items()]
    return out


def check_list(expected: list[np.ndarray]) -> Callable[[Any, Any], None]:
    def check(_: Any, got: Any) -> None:
        assert len(got) == len(expected), (len(got), len(expected))
        for want, have in zip(expected, got, strict=True):
            assert have.dtype == want.dtype and have.shape == want.shape
            assert np.array_equal(have, want)

    return check


# -- 10,000 arrays of 4 KiB: save, load, load one, move --------------------------------


def small_arrays(bench: Bench) -> list[Result]:
    """Save 10,000 arrays of 4 KiB each way, then load them, one of them, and move them."""
    n = bench.sizes.small
    values, names = make_small(n)
    ndirs = 1 + -(-n // 1000)
    out: list[Result] = []
    has = {tool: tool not in bench.missing for tool in (H5PY, DISKCACHE, ZARR)}

    # -- save --
    def ps_prepare() -> tuple[Path, SQLBackend]:
        path = bench.fresh("ps.db")
        return path, SQLBackend(f"sqlite:///{path}")

    def ps_dispose(state: tuple[Path, Any]) -> None:
        state[1].close()
        remove(state[0])

    def dir_prepare(stem: str) -> Callable[[], Path]:
        def prepare() -> Path:
            path = bench.fresh(stem)
            path.mkdir()
            return path

        return prepare

    def check_files(root: Path, _: Any) -> None:
        assert count_files(root) == n

    def h5_run(path: Path) -> None:
        import h5py

        with h5py.File(path, "w") as f:
            for name, value in zip(names, values, strict=True):
                f.create_dataset(name, data=value)

    def dc_prepare() -> Any:
        import diskcache

        return diskcache.Cache(str(bench.fresh("diskcache")), size_limit=CACHE_LIMIT)

    def dc_run(cache: Any) -> None:
        with cache.transact():
            for name, value in zip(names, values, strict=True):
                cache[name] = value

    def dc_dispose(cache: Any) -> None:
        cache.close()
        remove(Path(cache.directory))

    def zarr_prepare() -> tuple[Path, Any]:
        from zarr.storage import LocalStore

        path = bench.fresh("zarr")
        return path, LocalStore(path)

    def zarr_run(state: tuple[Path, Any]) -> None:
        for name, value in zip(names, values, strict=True):
            zarr_create(state[1], name, value, value.shape)

    dispose: dict[str, Callable[[Any], None]] = {
        POLYSTORE: ps_dispose,
        PS_DISK: remove,
        NPY: remove,
        NPY_FSYNC: remove,
        H5PY: remove,
        DISKCACHE: dc_dispose,
        ZARR: lambda state: remove(state[0]),
    }
    keeper = Keeper(dispose)
    sides = {
        POLYSTORE: Side(
            prepare=ps_prepare,
            run=lambda s: s[1].save_batch(values, names),
            check=lambda s, _: ensure(s[1].count_nodes() == n + ndirs, "polystore node count"),
        ),
        PS_DISK: Side(
            prepare=dir_prepare("disk"),
            run=lambda root: DiskBackend(root).save_batch(values, names),
            check=check_files,
        ),
        NPY: Side(
            prepare=dir_prepare("npy"),
            run=lambda root: npy_save(root, names, values, fsync=False),
            check=check_files,
        ),
        NPY_FSYNC: Side(
            prepare=dir_prepare("npy-fsync"),
            run=lambda root: npy_save(root, names, values, fsync=True),
            check=check_files,
        ),
    }
    if has[H5PY]:
        sides[H5PY] = Side(
            prepare=lambda: bench.fresh("h5").with_suffix(".h5"),
            run=h5_run,
            check=lambda path, _: ensure(h5_count(path) == n, "h5py dataset count"),
        )
    if has[DISKCACHE]:
        sides[DISKCACHE] = Side(
            prepare=dc_prepare, run=dc_run, check=lambda c, _: ensure(len(c) == n, "diskcache keys")
        )
    if has[ZARR]:
        sides[ZARR] = Side(
            prepare=zarr_prepare,
            run=zarr_run,
            check=lambda s, _: ensure(count_files(s[0]) >= 2 * n, "zarr files"),
        )
    for tool, side in sides.items():
        side.cleanup = keeper.cleanup(tool)
    workload = f"save {n:,} x 4 KiB"
    try:
        with step(f"{workload}: {', '.join(sides)}"):
            times = time_runs(
                sides,
                bench.repeat,
                slow={PS_DISK, NPY_FSYNC, ZARR},
                slow_rounds=bench.slow_rounds,
            )
        out += results(
            workload,
            times,
            notes={
                POLYSTORE: "save_batch: one transaction",
                PS_DISK: "save_batch: temp file, fsync, rename, fsync dir",
                H5PY: "create_dataset each, then close",
                NPY: "np.save each",
                NPY_FSYNC: "np.save, flush, fsync each",
                DISKCACHE: "cache[key] = array each, in one transact()",
                ZARR: "create_array each (no compressor)",
            },
        )
        out += not_run(workload, bench, [t for t in (H5PY, DISKCACHE, ZARR) if not has[t]], {})
        out += _small_reads(bench, keeper.kept, values, names)
    finally:
        keeper.close()
    return out


def _small_reads(
    bench: Bench, kept: dict[str, Any], values: list[np.ndarray], names: list[str]
) -> list[Result]:
    """load_batch, one load, a directory move: on what the last save round of each side left."""
    n = len(names)
    out: list[Result] = []
    missing = [t for t in (H5PY, DISKCACHE, ZARR) if t in bench.missing]
    backend: SQLBackend = kept[POLYSTORE][1]
    disk = DiskBackend(kept[PS_DISK])
    npy_root: Path = kept[NPY]
    h5file: Any = None
    if H5PY in kept:
        import h5py

    # -- load_batch --
    def h5_load(_: Any) -> list[Any]:
        with h5py.File(kept[H5PY], "r") as f:
            return [f[name][()] for name in names]

    check = check_list(values)
    sides = {
        POLYSTORE: Side(run=lambda _: backend.load_batch(names), check=check),
        PS_DISK: Side(run=lambda _: disk.load_batch(names), check=check),
        NPY: Side(run=lambda _: [np.load(npy_root / name) for name in names], check=check),
    }
    if H5PY in kept:
        sides[H5PY] = Side(run=h5_load, check=check)
    if DISKCACHE in kept:
        cache = kept[DISKCACHE]
        sides[DISKCACHE] = Side(run=lambda _: [cache[name] for name in names], check=check)
    if ZARR in kept:
        store = kept[ZARR][1]
        sides[ZARR] = Side(run=lambda _: [zarr_read(store, p) for p in names], check=check)
    workload = f"load {n:,} x 4 KiB"
    with step(f"{workload}: {', '.join(sides)}"):
        times = time_runs(sides, bench.repeat, slow={ZARR}, slow_rounds=bench.slow_rounds)
    out += results(
        workload,
        times,
        notes={
            POLYSTORE: "load_batch",
            PS_DISK: "load_batch",
            NPY: "np.load each",
            H5PY: "open the file, ds[()] each",
            DISKCACHE: "cache[key] each",
            ZARR: "open_array(...)[:] each",
        },
    )
    out += not_run(workload, bench, missing, {})

    # -- one load, per call --
    target = names[n // 2]
    value = values[n // 2]
    calls: dict[str, Callable[[], Any]] = {
        POLYSTORE: lambda: backend.load(target),
        PS_DISK: lambda: disk.load(target),
        NPY: lambda: np.load(npy_root / target),
    }
    try:
        if H5PY in kept:
            h5file = h5py.File(kept[H5PY], "r+")
            calls[H5PY] = lambda: h5file[target][()]
        if DISKCACHE in kept:
            calls[DISKCACHE] = lambda: cache[target]
        if ZARR in kept:
            calls[ZARR] = lambda: zarr_read(store, target)
        out += per_call(
            bench,
            f"load one of {n:,} (per call)",
            calls,
            value,
            notes={H5PY: "file kept open", ZARR: "open_array(...)[:]"},
        )
        out += not_run(workload, bench, missing, {})

        # -- a directory of n files moved, and back, per call --
        places = ("batch", "moved")
        flips = dict.fromkeys(places, 0)

        def mover(move: Callable[[str, str], None], tool: str) -> Callable[[], None]:
            state = {"at": 0}

            def call() -> None:
                src = places[state["at"]]
                dst = places[1 - state["at"]]
                move(src, dst)
                state["at"] = 1 - state["at"]
                flips[tool] = state["at"]

            return call

        def h5_move(src: str, dst: str) -> None:
            h5file.move(src, dst)
            h5file.flush()

        moves: dict[str, Callable[[], None]] = {
            POLYSTORE: mover(backend.move, POLYSTORE),
            PS_DISK: mover(disk.move, PS_DISK),
            NPY: mover(lambda s, d: os.rename(npy_root / s, npy_root / d), NPY),
        }
        if h5file is not None:
            moves[H5PY] = mover(h5_move, H5PY)
        workload = f"move a directory of {n:,} files (per call)"
        with step(f"{workload}: {', '.join(moves)}"):
            samples = time_calls(moves, bench.sizes.move_calls, bench.repeat)
        for tool in moves:  # the files moved with their directory, every one
            where = places[flips[tool]]
            moved = f"{where}/{target.partition('/')[2]}"
            got = {
                POLYSTORE: lambda p: backend.load(p),
                PS_DISK: lambda p: disk.load(p),
                NPY: lambda p: np.load(npy_root / p),
                H5PY: lambda p: h5file[p][()],
            }[tool](moved)
            assert np.array_equal(got, value), tool
        assert len(backend.list_files(places[flips[POLYSTORE]], recursive=True)) == n
        assert count_files(npy_root / places[flips[NPY]]) == n
        out += results(
            workload,
            samples,
            calls=bench.sizes.move_calls,
            notes={
                POLYSTORE: "move(): one transaction",
                PS_DISK: "move(): os.rename",
                NPY: "os.rename",
                H5PY: "File.move + flush (no fsync)",
            },
        )
        out += not_run(
            workload,
            bench,
            [t for t in (H5PY,) if t in bench.missing],
            {
                DISKCACHE: "no directories (a move is a get and set of every key)",
                ZARR: f"zarr {_zarr_version()} Group.move raises NotImplementedError",
            },
        )
    finally:
        if h5file is not None:
            h5file.close()
    return out


def _zarr_version() -> str:
    try:
        import zarr
    except ImportError:
        return "3"
    return str(zarr.__version__)


# -- list_dir of 100,000 entries -------------------------------------------------------


def listing(bench: Bench) -> list[Result]:
    """The names in one directory of 100,000 entries, sorted, from each tool."""
    n = bench.sizes.listing
    names = [f"f{i:06d}.npy" for i in range(n)]
    tiny = np.zeros(1, dtype=np.float32)
    out: list[Result] = []
    cache: Any = None
    try:
        ps_path = bench.fresh("list.db")
        with step(f"list_dir: {n:,} files in one polystore directory (save_batch)"):
            backend = SQLBackend(f"sqlite:///{ps_path}")
            backend.save_batch([tiny] * n, [f"big/{name}" for name in names])
        root = bench.fresh("list-files")
        with step(f"list_dir: {n:,} .npy files in a directory"):
            (root / "big").mkdir(parents=True)
            for name in names:
                np.save(root / "big" / name, tiny)
        disk = DiskBackend(root)

        def check(_: Any, got: Any) -> None:
            assert list(got) == names

        sides = {
            POLYSTORE: Side(run=lambda _: backend.list_dir("big"), check=check),
            PS_DISK: Side(run=lambda _: disk.list_dir("big"), check=check),
            NPY: Side(run=lambda _: sorted(os.listdir(root / "big")), check=check),
        }
        slow: set[str] = set()
        if H5PY not in bench.missing:
            import h5py

            h5path = bench.fresh("list").with_suffix(".h5")
            with step(f"list_dir: {n:,} datasets in one HDF5 group"), h5py.File(h5path, "w") as f:
                group = f.create_group("big")
                for name in names:
                    group.create_dataset(name, data=tiny)

            def h5_list(_: Any) -> list[str]:
                with h5py.File(h5path, "r") as f:
                    return list(f["big"].keys())

            sides[H5PY] = Side(run=h5_list, check=check)
        if DISKCACHE not in bench.missing:
            import diskcache

            cache_dir = bench.fresh("list-diskcache")
            cache = diskcache.Cache(str(cache_dir), size_limit=CACHE_LIMIT)
            with step(f"list_dir: {n:,} keys in a diskcache"), cache.transact():
                for name in names:
                    cache[f"big/{name}"] = tiny

            def dc_list(_: Any) -> list[str]:
                return [key[4:] for key in cache.iterkeys() if key.startswith("big/")]

            sides[DISKCACHE] = Side(run=dc_list, check=check)
        if ZARR not in bench.missing:
            import zarr
            from zarr.core.sync import sync
            from zarr.storage import LocalStore

            zroot = bench.fresh("list-zarr")
            store = LocalStore(zroot)
            with step(f"list_dir: {n:,} arrays in one zarr group"):
                zarr.create_group(store, path="big")
                zarr_create(store, f"big/{names[0]}", tiny, tiny.shape)
                # The other arrays are copies of the first one's metadata (and no
                # chunk: all fill value), written directly: what create_array would
                # leave, in a fraction of the time.
                meta = (zroot / "big" / names[0] / "zarr.json").read_bytes()
                for name in names[1:]:
                    (zroot / "big" / name).mkdir()
                    (zroot / "big" / name / "zarr.json").write_bytes(meta)

            def zarr_keys(_: Any) -> list[str]:
                return sorted(zarr.open_group(store, path="big", mode="r").array_keys())

            async def _collect() -> list[str]:
                return [key async for key in store.list_dir("big")]

            def zarr_store_list(_: Any) -> list[str]:
                return sorted(key for key in sync(_collect()) if key != "zarr.json")

            sides[ZARR] = Side(run=zarr_keys, check=check)
            sides[ZARR + " (store.list_dir)"] = Side(run=zarr_store_list, check=check)
            slow.add(ZARR)
        workload = f"list_dir of {n:,} entries"
        with step(f"{workload}: {', '.join(sides)}"):
            times = time_runs(sides, bench.repeat, slow=slow, slow_rounds=bench.slow_rounds)
        out += results(
            workload,
            times,
            notes={
                NPY: "sorted(os.listdir(d))",
                H5PY: "open the file, list(group.keys())",
                DISKCACHE: "no directories: every key, filtered by prefix",
                ZARR: "sorted(group.array_keys()): reads every member's metadata",
                ZARR + " (store.list_dir)": "names only, sorted",
            },
        )
        out += not_run(
            workload, bench, [t for t in (H5PY, DISKCACHE, ZARR) if t in bench.missing], {}
        )
        backend.close()
    finally:
        if cache is not None:
            cache.close()
        # The directories of 100,000 entries stay until the end: removing them
        # takes minutes on a busy disk, so main() does it after printing.
    return out


# -- one large array: save, load, slice --------------------------------------------------


def large_array(bench: Bench) -> list[Result]:
    """One 1 GiB float64 array saved and loaded whole, and 4 rows of it read."""
    rows = bench.sizes.big_rows
    with step(f"large: {rows:,} x 1,024 random float64"):
        data = np.random.default_rng(3).random((rows, 1024))
    size = f"{data.nbytes / MiB:,.0f} MiB" if data.nbytes < 1 << 30 else f"{data.nbytes >> 30} GiB"
    chunk_rows = max(1, min(rows, 16 * MiB // 8192))
    out: list[Result] = []
    repeat = min(bench.repeat, 3)

    def ps_prepare() -> tuple[Path, SQLBackend]:
        path = bench.fresh("big.db")
        return path, SQLBackend(f"sqlite:///{path}")

    def dir_prepare(stem: str) -> Callable[[], Path]:
        def prepare() -> Path:
            path = bench.fresh(stem)
            path.mkdir()
            return path

        return prepare

    def ps_dispose(state: tuple[Path, Any]) -> None:
        state[1].close()
        remove(state[0])

    def check_shape(shape_of: Callable[[Any], tuple[int, ...]]) -> Callable[[Any, Any], None]:
        def check(state: Any, _: Any) -> None:
            assert tuple(shape_of(state)) == data.shape

        return check

    def npy_shape(root: Path) -> tuple[int, ...]:
        return tuple(np.load(root / "big.npy", mmap_mode="r").shape)

    def npy_write(root: Path, fsync: bool) -> None:
        npy_save(root, ["big.npy"], [data], fsync=fsync)

    def h5_run(path: Path) -> None:
        import h5py

        with h5py.File(path, "w") as f:
            f.create_dataset("big", data=data)

    def h5_shape(path: Path) -> tuple[int, ...]:
        import h5py

        with h5py.File(path, "r") as f:
            return tuple(f["big"].shape)

    def dc_prepare() -> Any:
        import diskcache

        return diskcache.Cache(str(bench.fresh("big-diskcache")), size_limit=CACHE_LIMIT)

    def dc_dispose(cache: Any) -> None:
        cache.close()
        remove(Path(cache.directory))

    def dc_run(cache: Any) -> None:
        cache["big"] = data

    def zarr_prepare() -> tuple[Path, Any]:
        from zarr.storage import LocalStore

        path = bench.fresh("big-zarr")
        return path, LocalStore(path)

    def zarr_shape(state: tuple[Path, Any]) -> tuple[int, ...]:
        import zarr

        return tuple(zarr.open_array(state[1], path="big", mode="r").shape)

    keeper = Keeper(
        {
            POLYSTORE: ps_dispose,
            PS_DISK: remove,
            NPY: remove,
            NPY_FSYNC: remove,
            H5PY: remove,
            DISKCACHE: dc_dispose,
            ZARR: lambda state: remove(state[0]),
        }
    )
    sides = {
        POLYSTORE: Side(
            prepare=ps_prepare,
            run=lambda s: s[1].save(data, "big.npy"),
            check=check_shape(lambda s: s[1].stat("big.npy").shape),
        ),
        PS_DISK: Side(
            prepare=dir_prepare("big-disk"),
            run=lambda root: DiskBackend(root).save(data, "big.npy"),
            check=check_shape(npy_shape),
        ),
        NPY: Side(
            prepare=dir_prepare("big-npy"),
            run=lambda root: npy_write(root, False),
            check=check_shape(npy_shape),
        ),
        NPY_FSYNC: Side(
            prepare=dir_prepare("big-npy-fsync"),
            run=lambda root: npy_write(root, True),
            check=check_shape(npy_shape),
        ),
    }
    if H5PY not in bench.missing:
        sides[H5PY] = Side(
            prepare=lambda: bench.fresh("big").with_suffix(".h5"),
            run=h5_run,
            check=check_shape(h5_shape),
        )
    if DISKCACHE not in bench.missing:
        sides[DISKCACHE] = Side(
            prepare=dc_prepare, run=dc_run, check=lambda c, _: ensure("big" in c, "diskcache key")
        )
    if ZARR not in bench.missing:
        sides[ZARR] = Side(
            prepare=zarr_prepare,
            run=lambda s: zarr_create(s[1], "big", data, (chunk_rows, 1024)),
            check=check_shape(zarr_shape),
        )
    for tool, side in sides.items():
        side.cleanup = keeper.cleanup(tool)
    missing = [t for t in (H5PY, DISKCACHE, ZARR) if t in bench.missing]
    h5file: Any = None
    try:
        workload = f"save {size}"
        with step(f"{workload}: {', '.join(sides)}"):
            times = time_runs(sides, repeat, warmup=0)
        out += results(
            workload,
            times,
            notes={
                POLYSTORE: "save: SHA-256 while writing, fsync (default blob store)",
                PS_DISK: "save: temp file, fsync, rename, fsync dir",
                H5PY: "contiguous dataset, then close",
                DISKCACHE: "pickled into a file (size_limit raised)",
                ZARR: f"chunks of {chunk_rows * 8192 // MiB} MiB, no compressor",
            },
        )
        out += not_run(workload, bench, missing, {})
        kept = keeper.kept

        # -- load whole --
        def check_big(_: Any, got: Any) -> None:
            assert got.dtype == data.dtype and np.array_equal(got, data)

        backend: SQLBackend = kept[POLYSTORE][1]
        disk = DiskBackend(kept[PS_DISK])
        npy_path = kept[NPY] / "big.npy"

        def h5_load(_: Any) -> Any:
            import h5py

            with h5py.File(kept[H5PY], "r") as f:
                return f["big"][()]

        loads = {
            POLYSTORE: Side(run=lambda _: backend.load("big.npy"), check=check_big),
            PS_DISK: Side(run=lambda _: disk.load("big.npy"), check=check_big),
            NPY: Side(run=lambda _: np.load(npy_path), check=check_big),
        }
        if H5PY in kept:
            loads[H5PY] = Side(run=h5_load, check=check_big)
        if DISKCACHE in kept:
            loads[DISKCACHE] = Side(run=lambda _: kept[DISKCACHE]["big"], check=check_big)
        if ZARR in kept:
            loads[ZARR] = Side(run=lambda _: zarr_read(kept[ZARR][1], "big"), check=check_big)
        workload = f"load {size}"
        with step(f"{workload}: {', '.join(loads)}"):
            times = time_runs(loads, repeat, warmup=0)
        out += results(
            workload,
            times,
            notes={
                POLYSTORE: "load: reads, checks piece checksums",
                NPY: "np.load",
                H5PY: "open the file, ds[()]",
                DISKCACHE: "unpickled from its file",
            },
        )
        out += not_run(workload, bench, missing, {})

        # -- 4 rows, per call --
        where = rows // 2
        expected = data[where : where + 4].copy()
        slices: dict[str, Callable[[], Any]] = {
            POLYSTORE: lambda: backend.open_array("big.npy")[where : where + 4],
            PS_DISK: lambda: disk.open_array("big.npy")[where : where + 4],
            NPY: lambda: np.array(np.load(npy_path, mmap_mode="r")[where : where + 4]),
        }
        if H5PY in kept:
            import h5py

            h5file = h5py.File(kept[H5PY], "r")
            slices[H5PY] = lambda: h5file["big"][where : where + 4]
        if ZARR in kept:
            slices[ZARR] = lambda: zarr_read(kept[ZARR][1], "big", slice(where, where + 4))
        workload = f"4-row slice of the {size} array (per call)"
        out += per_call(
            bench,
            workload,
            slices,
            expected,
            notes={
                POLYSTORE: "open_array(p)[i:i+4]",
                PS_DISK: "open_array(p)[i:i+4]",
                NPY: "np.load(mmap_mode='r')[i:i+4], copied",
                H5PY: "file kept open, ds[i:i+4]",
                ZARR: f"open_array(...)[i:i+4]: reads one {chunk_rows * 8192 // MiB} MiB chunk",
            },
        )
        out += not_run(
            workload,
            bench,
            [t for t in (H5PY, ZARR) if t in bench.missing],
            {DISKCACHE: "whole values only"},
        )
    finally:
        if h5file is not None:
            h5file.close()
        keeper.close()
    return out


# -- the table -----------------------------------------------------------------------------

#: The listing runs last: its directories of 100,000 entries are removed after the table.
WORKLOADS: list[Callable[[Bench], list[Result]]] = [small_arrays, large_array, listing]
TOOL_ORDER = [POLYSTORE, PS_DISK, NPY, NPY_FSYNC, H5PY, DISKCACHE, ZARR]


def _order(result: Result) -> tuple[int, str]:
    base = result.tool.split(" (")[0]
    return (TOOL_ORDER.index(base) if base in TOOL_ORDER else len(TOOL_ORDER), result.tool)


def table(found: list[Result]) -> str:
    header = ["workload", "tool", "median", "vs polystore", "rounds", "how"]
    lines = [header]
    workloads = list(dict.fromkeys(r.workload for r in found))
    for workload in workloads:
        group = sorted((r for r in found if r.workload == workload), key=_order)
        ours = next((r.seconds for r in group if r.tool == POLYSTORE), None)
        for n, r in enumerate(group):
            if r.seconds is None:
                time_cell, ratio, rounds = "-", "-", "-"
            else:
                time_cell = format_seconds(r.seconds) + ("/call" if r.per_call else "")
                ratio = f"{r.seconds / ours:.2f}x" if ours else "-"
                rounds = f"{r.rounds} x {r.calls} calls" if r.per_call else str(r.rounds)
            lines.append([workload if n == 0 else "", r.tool, time_cell, ratio, rounds, r.note])
    return markdown_table(lines)


def machine() -> str:
    model = platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(
                (
                    line.split(":", 1)[1].strip()
                    for line in cpuinfo
                    if line.startswith("model name")
                ),
                model,
            )
    except OSError:
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
        memory = f", {ram:.0f} GiB RAM"
    except (ValueError, OSError):
        memory = ""
    return (
        f"{model} x{os.cpu_count()}{memory}; Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, NumPy {np.__version__}, {versions()}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="polystore vs np.save files, h5py, diskcache and zarr: one table.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument(
        "--repeat", type=int, default=5, help="timed rounds per workload (default %(default)s)"
    )
    parser.add_argument(
        "--slow-rounds",
        type=int,
        default=1,
        metavar="N",
        help="timed rounds of the slowest sides: fsynced and zarr saves of many files, zarr's "
        "many-file loads and group listing (default %(default)s)",
    )
    parser.add_argument(
        "--workdir", type=Path, help="where every tool writes (default: a temp dir, removed)"
    )
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.slow_rounds < 1:
        parser.error("--repeat and --slow-rounds must be at least 1")
    args.slow_rounds = min(args.slow_rounds, args.repeat)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.environ.pop("POLYSTORE_BLOB_STORE", None):
        log("note: POLYSTORE_BLOB_STORE ignored: every catalog here uses its default blob store")
    missing = missing_peers()
    for why in missing.values():
        log(why)
    started = dt.datetime.now().astimezone()
    load_start = os.getloadavg()[0]
    clock = time.perf_counter()
    found: list[Result] = []
    workdir = Path(tempfile.mkdtemp(prefix="polystore-peers-", dir=args.workdir))
    bench = Bench(
        sizes=QUICK if args.quick else FULL,
        repeat=args.repeat,
        slow_rounds=args.slow_rounds,
        workdir=workdir,
        missing=missing,
    )
    try:
        for workload in WORKLOADS:
            start = time.perf_counter()
            found += workload(bench)
            log(f"{workload.__name__}: {time.perf_counter() - start:.0f} s")
    finally:  # a failed check still shows what was measured before it
        report(args, found, missing, started, load_start, time.perf_counter() - clock)
        with step(f"removing {workdir}"):
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def report(
    args: argparse.Namespace,
    found: list[Result],
    missing: dict[str, str],
    started: dt.datetime,
    load_start: float,
    total: float,
) -> None:
    mode = "quick" if args.quick else "full"
    print(
        f"polystore and its peers, {started:%Y-%m-%d %H:%M %Z}, {mode} sizes, median of "
        f"{args.repeat} interleaved rounds (slowest sides {args.slow_rounds}), "
        f"{total:.0f} s in all, polystore at {checkout()}"
    )
    print(machine())
    print(f"load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    print()
    print(table(found))
    print()
    print(
        "vs polystore: the tool's median over polystore's (SQLBackend, SQLite, default "
        "options); above 1.00x the tool is slower."
    )
    for tool, why in missing.items():
        print(f"{tool}: {why}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
