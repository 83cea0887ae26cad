"""Issue 19's large-array goals: one 512 MiB array saved and loaded whole.

polystore (``SQLBackend`` on a SQLite file, the content in its default blob
store ``<file>.blobs/``: hashed (BLAKE3, a new catalog's), checksummed, fsynced, and
checked by its piece checksums on every load) against ``np.save`` of the same
array to one ``.npy`` file followed by an fsync, and ``np.load`` of that file.
Each save goes into a fresh catalog, so no save finds its content stored
already. Loads read files just written, from the page cache for both sides.
``--quick`` uses 64 MiB.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from drivers import bulk_row, fresh_file, fresh_name, open_catalog, profile_side, remove_sqlite
from harness import Bench, Row, Side, step, time_runs

from polystore.backends.sql import SQLBackend

__all__ = ["hash_reads", "large_load", "large_save"]

GOAL = 1.5
MiB = 1 << 20


def _array(bench: Bench) -> np.ndarray:
    rows = 65_536 if bench.sizes.batch >= 10_000 else 8_192
    return np.random.default_rng(5).random((rows, 1024))


def _catalog(bench: Bench, stem: str, hash_algorithm: str = "blake3") -> tuple[Path, SQLBackend]:
    path = fresh_file(bench, stem)
    return path, open_catalog(path, hash_algorithm=hash_algorithm)


def _drop_catalog(state: tuple[Path, SQLBackend]) -> None:
    path, backend = state
    backend.close()
    remove_sqlite(path)
    shutil.rmtree(f"{path}.blobs", ignore_errors=True)


def _np_save(path: Path, data: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, data)
        f.flush()
        os.fsync(f.fileno())


def large_save(bench: Bench) -> list[Row]:
    data = _array(bench)
    mib = data.nbytes // MiB

    def poly_check(state: tuple[Path, SQLBackend], _: Any) -> None:
        assert state[1].stat("big.npy").size == data.nbytes

    def raw_prepare() -> Path:
        return fresh_name(bench, "large-save").with_suffix(".npy")

    def raw_check(path: Path, _: Any) -> None:
        assert path.stat().st_size > data.nbytes

    sides = {
        "polystore": Side(
            prepare=lambda: _catalog(bench, "large-save"),
            run=lambda s: s[1].save(data, "big.npy"),
            check=poly_check,
            cleanup=_drop_catalog,
        ),
        "raw": Side(
            prepare=raw_prepare,
            run=lambda path: _np_save(path, data),
            check=raw_check,
            cleanup=lambda path: path.unlink(missing_ok=True),
        ),
        "sha256": Side(
            prepare=lambda: _catalog(bench, "large-save-sha256", "sha256"),
            run=lambda s: s[1].save(data, "big.npy"),
            check=poly_check,
            cleanup=_drop_catalog,
        ),
    }
    with step(f"large_save: {mib} MiB"):
        times = time_runs(sides, min(bench.repeat, 5))
    profile_side(bench, "large_save", sides["polystore"])
    what = (
        f"save of one {mib} MiB float64 array into a fresh SQLite catalog (default blob store: "
        "BLAKE3, piece checksums, fsync) vs np.save to a .npy file + fsync"
    )
    by_hash = {"polystore": times["polystore"], "raw": times["sha256"]}
    return [
        bulk_row("large_save", what, times, GOAL),
        bulk_row(
            "large_save~sha256",
            "the same save into a new catalog (BLAKE3) vs into one whose content SHA-256 "
            "names, as catalogs that held content before revision 0010 do (info)",
            by_hash,
            None,
        ),
    ]


def large_load(bench: Bench) -> list[Row]:
    data = _array(bench)
    mib = data.nbytes // MiB
    state = _catalog(bench, "large-load")
    npy = fresh_name(bench, "large-load").with_suffix(".npy")
    try:
        with step(f"large_load: storing {mib} MiB twice"):
            state[1].save(data, "big.npy")
            _np_save(npy, data)

        def check(_: Any, got: np.ndarray) -> None:
            assert np.array_equal(got, data)

        sides = {
            "polystore": Side(run=lambda _: state[1].load("big.npy"), check=check),
            "raw": Side(run=lambda _: np.load(npy), check=check),
        }
        with step("large_load"):
            times = time_runs(sides, min(bench.repeat, 5))
        profile_side(bench, "large_load", sides["polystore"])
    finally:
        _drop_catalog(state)
        npy.unlink(missing_ok=True)
    what = (
        f"load of one {mib} MiB float64 array from the default blob store (checked by its "
        "piece checksums) vs np.load of a .npy file; both from the page cache"
    )
    return [bulk_row("large_load", what, times, GOAL)]


def hash_reads(bench: Bench) -> list[Row]:
    """What reads that hash every byte cost, by the hash: ``fsck(verify=True)`` and a
    streamed read (``polystore get``/``cat``) of one array's content, in a new catalog
    (BLAKE3) and in one whose content SHA-256 names; both from the page cache."""
    data = _array(bench)
    mib = data.nbytes // MiB
    catalogs = {name: _catalog(bench, f"hash-{name}", name) for name in ("blake3", "sha256")}
    try:
        with step(f"hash_reads: storing {mib} MiB in each catalog"):
            for _, backend in catalogs.values():
                backend.save(data.tobytes(), "big.bin")

        def streamed(backend: SQLBackend) -> int:
            return sum(len(piece) for piece in backend.iter_content("big.bin"))

        def verified(backend: SQLBackend) -> Any:
            return backend.fsck(verify=True)

        def check_size(_: Any, n: int) -> None:
            assert n == data.nbytes

        def check_ok(_: Any, report: Any) -> None:
            assert report.ok and report.verified

        rows = []
        for name, read, check in (("stream", streamed, check_size), ("fsck", verified, check_ok)):
            sides = {
                "polystore": Side(run=lambda _, r=read: r(catalogs["blake3"][1]), check=check),
                "raw": Side(run=lambda _, r=read: r(catalogs["sha256"][1]), check=check),
            }
            with step(f"hash_reads: {name}"):
                times = time_runs(sides, min(bench.repeat, 5))
            what = {
                "stream": f"iter_content of a {mib} MiB file (what polystore get streams, each "
                "piece hashed)",
                "fsck": f"fsck(verify=True) of a catalog holding one {mib} MiB file",
            }[name]
            rows.append(
                bulk_row(
                    f"hash_{name}~sha256",
                    f"{what}: a new catalog (BLAKE3) vs one whose content SHA-256 names (info)",
                    times,
                    None,
                )
            )
        return rows
    finally:
        for state in catalogs.values():
            _drop_catalog(state)
