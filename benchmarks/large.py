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

__all__ = ["large_load", "large_save"]

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
