"""Snapshots (issue 17): what a snapshot costs, and what keeping snapshots costs.

* ``snapshot_cost`` -- ``snapshot()`` on a catalog of 1,000,000 files vs one of
  1,000 (goal: within 2x; it writes two rows whatever the size);
* ``snapshot_save_sqlite`` / ``snapshot_save_postgres`` -- ``save_batch`` of
  10,000 x 4 KiB into a catalog with 10 snapshots kept vs the same catalog
  with none (goal: within 1.1x); overwriting files the snapshots see is shown
  too (info: each overwritten row is copied to the history once);
* ``snapshot_reads`` -- ``at(s).load_batch`` of 10,000 arrays and
  ``at(s).list_dir`` of a 100,000-entry directory vs the same calls live
  (goal: within 1.5x);
* ``snapshot_diff`` -- ``diff`` of two snapshots of 100,000 files that differ
  in 1% of them, on SQLite (goal: under 0.5 s, shown against a 1 s budget).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from drivers import batch_paths, fresh_file, human, make_arrays, remove_sqlite
from harness import Bench, Row, Side, median, step, time_calls, time_runs
from lookups import _catalog

from polystore.backends.sql import SQLBackend

__all__ = [
    "snapshot_cost",
    "snapshot_diff",
    "snapshot_reads",
    "snapshot_save_postgres",
    "snapshot_save_sqlite",
]

SNAPSHOT_GOAL = 2.0
SAVE_GOAL = 1.1
READ_GOAL = 1.5
DIFF_BUDGET = 1.0  # seconds
DIFF_GOAL = 0.5  # of the budget
KEPT = 10


def snapshot_cost(bench: Bench) -> list[Row]:
    small, large = 1_000, bench.sizes.large_catalog
    built = {
        "small": _catalog(bench, small, human(small)),
        "large": _catalog(bench, large, human(large)),
    }
    try:
        calls: dict[str, Callable[[], Any]] = {
            key: (lambda b=b: b.snapshot()) for key, (_, b, _, _) in built.items()
        }
        samples = time_calls(calls, 50, bench.repeat)
    finally:
        for poly_path, backend, raw_path, _ in built.values():
            backend.close()
            remove_sqlite(poly_path)
            remove_sqlite(raw_path)
    return [
        Row(
            name="snapshot_cost",
            what=f"snapshot() on a SQLite catalog of {human(large)} files vs of "
            f"{human(small)} files (per call)",
            polystore=median(samples["large"]),
            raw=median(samples["small"]),
            goal=SNAPSHOT_GOAL,
            per_call=True,
            note=built["large"][3],
            samples=samples,
        )
    ]


def _save_rows(bench: Bench, url_for: Callable[[str], str], drop: Callable[[str], None],
               db: str) -> list[Row]:  # fmt: skip
    n = bench.sizes.batch
    values, names = make_arrays(n), batch_paths(n)
    seed_values = make_arrays(n, seed=1)

    def prepare(kept: int, fresh: bool) -> Callable[[], Any]:
        def make() -> Any:
            url = url_for(f"snapsave-{kept}")
            backend = SQLBackend(url)
            # A catalog the snapshots see: the batch's files, rewritten between snapshots.
            backend.save_batch(seed_values, names)
            # The same writes on both sides; only the snapshots differ.
            for i in range(KEPT):
                backend.save(np.full(4, i), "other/f.npy")
                if kept:
                    backend.snapshot(f"s{i}")
            targets = [f"new/{p}" for p in names] if fresh else names
            return url, backend, targets

        return make

    def cleanup(state: Any) -> None:
        url, backend, _ = state
        backend.close()
        drop(url)

    def run(state: Any) -> None:
        state[1].save_batch(values, state[2])

    rows = []
    for fresh in (True, False):
        sides = {
            f"{k}": Side(run=run, prepare=prepare(k, fresh), cleanup=cleanup) for k in (KEPT, 0)
        }
        times = time_runs(sides, bench.repeat)
        what = "new files" if fresh else "overwriting files the snapshots see"
        rows.append(
            Row(
                name=f"snapshot_save_{db}" + ("" if fresh else "~overwrite"),
                what=f"save_batch of {human(n)} x 4 KiB ({what}) on {db} with {KEPT} snapshots "
                "kept vs none",
                polystore=median(times[str(KEPT)]),
                raw=median(times["0"]),
                goal=SAVE_GOAL if fresh else None,
                kind="ratio" if fresh else "info",
                samples=times,
            )
        )
    return rows


def snapshot_save_sqlite(bench: Bench) -> list[Row]:
    def url_for(stem: str) -> str:
        return f"sqlite:///{fresh_file(bench, stem)}"

    def drop(url: str) -> None:
        remove_sqlite(url.removeprefix("sqlite:///"))  # type: ignore[arg-type]

    return _save_rows(bench, url_for, drop, "sqlite")


def snapshot_save_postgres(bench: Bench) -> list[Row]:
    import uuid

    import psycopg

    assert bench.pg_url is not None
    base = bench.pg_url
    plain = base.replace("postgresql+psycopg://", "postgresql://")

    def url_for(stem: str) -> str:
        schema = f"bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
        sep = "&" if "?" in base else "?"
        return f"{base}{sep}options=-csearch_path%3D{schema}"

    def drop(url: str) -> None:
        schema = url.rsplit("%3D", 1)[1]
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')

    return _save_rows(bench, url_for, drop, "postgres")


def snapshot_reads(bench: Bench) -> list[Row]:
    n, listing = bench.sizes.batch, bench.sizes.listing
    values, names = make_arrays(n), batch_paths(n)
    path = fresh_file(bench, "snapreads")
    backend = SQLBackend(f"sqlite:///{path}")
    try:
        with step(f"snapshot_reads: {human(n)} arrays and a directory of {human(listing)}"):
            backend.save_batch(values, names)
            tiny = np.zeros(1, dtype=np.float32)
            for start in range(0, listing, 50_000):
                part = [f"wide/{i:06d}" for i in range(start, min(listing, start + 50_000))]
                backend.save_batch([tiny] * len(part), part)
            snap = backend.snapshot("s")
            # Then the live catalog moves on, so the snapshot reads history too.
            backend.save_batch(make_arrays(n // 100, seed=2), names[: n // 100])
            view = backend.at(snap)
        assert all(
            np.array_equal(a, b) for a, b in zip(view.load_batch(names), values, strict=True)
        )
        assert len(view.list_dir("wide")) == listing
        loads = time_runs(
            {
                "snapshot": Side(run=lambda _: view.load_batch(names)),
                "live": Side(run=lambda _: backend.load_batch(names)),
            },
            bench.repeat,
        )
        lists = time_runs(
            {
                "snapshot": Side(run=lambda _: view.list_dir("wide")),
                "live": Side(run=lambda _: backend.list_dir("wide")),
            },
            bench.repeat,
        )
    finally:
        backend.close()
        remove_sqlite(path)
    return [
        Row(
            name="snapshot_reads~load_batch",
            what=f"at(s).load_batch of {human(n)} x 4 KiB vs the live load_batch (SQLite)",
            polystore=median(loads["snapshot"]),
            raw=median(loads["live"]),
            goal=READ_GOAL,
            samples=loads,
        ),
        Row(
            name="snapshot_reads~list_dir",
            what=f"at(s).list_dir of {human(listing)} entries vs the live list_dir (SQLite)",
            polystore=median(lists["snapshot"]),
            raw=median(lists["live"]),
            goal=READ_GOAL,
            samples=lists,
        ),
    ]


def snapshot_diff(bench: Bench) -> list[Row]:
    files = bench.sizes.listing
    path = fresh_file(bench, "snapdiff")
    backend = SQLBackend(f"sqlite:///{path}")
    tiny = np.zeros(1, dtype=np.float32)
    names = [f"d{i // 1000:03d}/f{i:06d}" for i in range(files)]
    try:
        with step(f"snapshot_diff: {human(files)} files, two snapshots 1% apart"):
            for start in range(0, files, 50_000):
                backend.save_batch([tiny] * len(names[start : start + 50_000]),
                                   names[start : start + 50_000])  # fmt: skip
            old = backend.snapshot("old")
            changed = names[::100]
            backend.save_batch([np.ones(1, dtype=np.float32)] * len(changed), changed)
            new = backend.snapshot("new")
        assert len(backend.diff(old, new)) == len(changed)
        samples = time_runs({"diff": Side(run=lambda _: backend.diff(old, new))}, bench.repeat)
    finally:
        backend.close()
        remove_sqlite(path)
    return [
        Row(
            name="snapshot_diff",
            what=f"diff of two snapshots of {human(files)} files differing in 1% (SQLite) "
            f"vs a budget of {DIFF_BUDGET:.0f} s",
            polystore=median(samples["diff"]),
            raw=DIFF_BUDGET,
            goal=DIFF_GOAL,
            samples=samples,
        )
    ]
