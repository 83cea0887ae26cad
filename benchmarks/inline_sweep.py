"""Inline (in the database) or external (a local blob directory)? A sweep over sizes.

    .venv/bin/python benchmarks/inline_sweep.py                # SQLite and PostgreSQL
    .venv/bin/python benchmarks/inline_sweep.py --no-postgres --quick
    .venv/bin/python benchmarks/inline_sweep.py --json sweep.json

For each content size from 4 KiB to 64 MiB, saves distinct uint8 arrays one
``save()`` at a time and loads them back one ``load()`` at a time, through
polystore itself, with three placements:

* ``inline``: ``inline_limit`` above the size, so the bytes go into the catalog;
* ``external``: ``inline_limit=0`` and the default local store (fsync on);
* ``ext-nosync``: the same store with ``fsync=False``, to show what durability costs.

Each point writes about ``--mib`` MiB (at least 4 files, at most 256), takes
the median of ``--rounds`` rounds, and reports milliseconds per file and MB/s.
The default ``inline_limit`` in polystore is chosen from this table; see
docs/blob-stores.rst for the figures and the reasoning.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from polystore import SQLBackend
from polystore.blobs import LocalBlobStore

SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 512 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
QUICK_SIZES = [4 << 10, 64 << 10, 1 << 20]
PLACEMENTS = ("inline", "external", "ext-nosync")
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def human(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"


@contextmanager
def sqlite_catalog(workdir: Path) -> Iterator[str]:
    directory = Path(tempfile.mkdtemp(dir=workdir))
    try:
        yield f"sqlite:///{directory}/catalog.db"
    finally:
        shutil.rmtree(directory)


@contextmanager
def pg_catalog(base_url: str) -> Iterator[str]:
    import psycopg
    from sqlalchemy.engine import make_url

    conninfo = make_url(base_url).set(drivername="postgresql").render_as_string(False)
    schema = f"ps_sweep_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        sep = "&" if "?" in base_url else "?"
        yield f"{base_url}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def open_backend(url: str, placement: str, store_root: Path, size: int) -> SQLBackend:
    store = LocalBlobStore(store_root, fsync=placement != "ext-nosync")
    limit = size if placement == "inline" else 0
    return SQLBackend(url, blob_store=store, inline_limit=limit)


def one_round(
    catalog: Callable[[], Any], placement: str, size: int, count: int, workdir: Path, seed: int
) -> tuple[float, float]:
    """Seconds to save, then to load, ``count`` distinct arrays of ``size`` bytes."""
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(count)]
    store_root = Path(tempfile.mkdtemp(dir=workdir))
    try:
        with catalog() as url, open_backend(url, placement, store_root, size) as backend:
            backend.save(np.zeros(1, np.uint8), "warm.npy")
            start = time.perf_counter()
            for i, array in enumerate(arrays):
                backend.save(array, f"d/{i}.npy")
            saved = time.perf_counter() - start
            start = time.perf_counter()
            for i in range(count):
                backend.load(f"d/{i}.npy")
            loaded = time.perf_counter() - start
            expected = "inline" if placement == "inline" else "local"
            assert backend.stat("d/0.npy").store == expected
        return saved, loaded
    finally:
        shutil.rmtree(store_root)


def sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    workdir = Path(args.workdir or tempfile.gettempdir())
    databases: list[tuple[str, Callable[[], Any]]] = [("sqlite", lambda: sqlite_catalog(workdir))]
    if not args.no_postgres:
        databases.append(("postgresql", lambda: pg_catalog(args.pg_url)))
    results = []
    for db, catalog in databases:
        for size in args.sizes or (QUICK_SIZES if args.quick else SIZES):
            count = max(4, min(256, (args.mib << 20) // size))
            for placement in PLACEMENTS:
                rounds = [
                    one_round(catalog, placement, size, count, workdir, seed)
                    for seed in range(args.rounds)
                ]
                save = statistics.median(r[0] for r in rounds) / count
                load = statistics.median(r[1] for r in rounds) / count
                row = {
                    "database": db,
                    "size": size,
                    "placement": placement,
                    "files": count,
                    "save_ms": save * 1e3,
                    "load_ms": load * 1e3,
                    "save_mb_s": size / save / 1e6,
                    "load_mb_s": size / load / 1e6,
                }
                results.append(row)
                print(
                    f"{db:10} {human(size):>7} {placement:10} x{count:<5} "
                    f"save {row['save_ms']:9.3f} ms ({row['save_mb_s']:7.1f} MB/s)  "
                    f"load {row['load_ms']:9.3f} ms ({row['load_mb_s']:7.1f} MB/s)",
                    file=sys.stderr,
                    flush=True,
                )
    return results


def table(results: list[dict[str, Any]]) -> str:
    """One row per database and size: ms per file, and external/inline ratios."""
    lines = [
        (
            "| database | size | save inline | save external | save ext. no fsync "
            "| load inline | load external | ext/inline save | ext/inline load |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["database"], r["size"], r["placement"]): r for r in results}
    for db, size in dict.fromkeys((r["database"], r["size"]) for r in results):
        inline, ext, nosync = (by_key[db, size, p] for p in PLACEMENTS)
        lines.append(
            f"| {db} | {human(size)} | {inline['save_ms']:.3f} ms | {ext['save_ms']:.3f} ms "
            f"| {nosync['save_ms']:.3f} ms | {inline['load_ms']:.3f} ms "
            f"| {ext['load_ms']:.3f} ms | {ext['save_ms'] / inline['save_ms']:.2f} "
            f"| {ext['load_ms'] / inline['load_ms']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three sizes, a smoke test")
    parser.add_argument(
        "--size",
        dest="sizes",
        action="append",
        type=lambda text: int(text[:-1]) << {"K": 10, "M": 20}[text[-1].upper()],
        help="only this size, like 512K or 4M (repeatable)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per point (median)")
    parser.add_argument("--mib", type=int, default=32, help="MiB written per point")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("POLYSTORE_TEST_PG_URL") or DEFAULT_PG_URL,
        help="PostgreSQL server (a fresh schema per round, dropped afterwards)",
    )
    parser.add_argument("--workdir", help="where SQLite files and blob stores go")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    results = sweep(args)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
