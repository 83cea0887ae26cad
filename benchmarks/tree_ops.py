"""Tree edits: moving a directory of 10,000 files, and deleting a large tree recursively.

``move_dir`` times one ``move()`` of a directory, warm, per call, against the
raw driver's ``UPDATE`` of one row in a transaction of its own: the work a
catalog move cannot avoid. Its goal is absolute (issue 19: under 0.5 ms).

``delete_tree`` builds a tree of files with ``save_batch`` and deletes it with
one ``delete(recursive=True)``, both timed: the goal is a delete no slower per
file than the saves that built the tree (the ratio is delete / save).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np
from drivers import (
    Postgres,
    batch_dirs,
    batch_paths,
    fresh_file,
    human,
    make_arrays,
    raw_sqlite,
    remove_sqlite,
    tree_paths,
)
from harness import Bench, Row, log, median, time_calls

from polystore.backends.sql import SQLBackend

#: Seconds a warm directory move may take (issue 19).
MOVE_BUDGET = 0.5e-3
#: A recursive delete's time over the time of the saves that built the tree.
DELETE_GOAL = 1.0

_PLACES = ("batch", "moved")


def _mover(move: Any) -> Any:
    """A call that moves ``batch`` to ``moved``, and the next one back."""
    where = [0]

    def call() -> None:
        here = where[0]
        move(_PLACES[here], _PLACES[1 - here])
        where[0] = 1 - here

    return call


def _raw_nodes(path: Path, rows: int) -> sqlite3.Connection:
    """A sqlite3 node table as large as polystore's, with its unique (parent, name) index."""
    conn = raw_sqlite(path)
    conn.execute(
        "CREATE TABLE nodes (id INTEGER PRIMARY KEY, parent_id INTEGER, name TEXT NOT NULL, "
        "UNIQUE (parent_id, name))"
    )
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO nodes VALUES (1, 0, 'batch')")
    conn.executemany(
        "INSERT INTO nodes (parent_id, name) VALUES (1, ?)", ((f"{i:05d}",) for i in range(rows))
    )
    conn.execute("COMMIT")
    return conn


def move_dir(bench: Bench) -> list[Row]:
    n = bench.sizes.batch
    calls = max(20, bench.sizes.calls // 10)
    poly_path, raw_path = fresh_file(bench, "move-polystore"), fresh_file(bench, "move-raw")
    backend = SQLBackend(f"sqlite:///{poly_path}")
    conn: sqlite3.Connection | None = None
    pg: Postgres | None = None
    pg_schema: str | None = None
    pg_backend: SQLBackend | None = None
    try:
        log(f"  move_dir: a directory of {human(n)} files, both ways")
        values, names = make_arrays(n), batch_paths(n)
        backend.save_batch(values, names)
        conn = _raw_nodes(raw_path, n)
        raw = conn

        def raw_move(src: str, dst: str) -> None:
            raw.execute("BEGIN IMMEDIATE")
            raw.execute("UPDATE nodes SET parent_id = 0, name = ? WHERE id = 1", (dst,))
            raw.execute("COMMIT")

        sides: dict[str, Any] = {"polystore": _mover(backend.move), "raw": _mover(raw_move)}
        if bench.pg_url is not None:
            pg = Postgres(bench.pg_url)
            pg_schema = pg.create_schema()
            pg_backend = SQLBackend(pg.polystore_url(pg_schema))
            pg_backend.save_batch(values, names)
            sides["polystore_pg"] = _mover(pg_backend.move)
        samples = time_calls(sides, calls, bench.repeat)
        # Every call is paired with its way back: each side ends where it began.
        assert backend.count_nodes() == n + batch_dirs(n)
        assert np.array_equal(backend.load(names[-1]), values[-1])
        if pg_backend is not None:
            assert np.array_equal(pg_backend.load(names[-1]), values[-1])
        bench.profile(
            "move_dir", lambda: [sides["polystore"]() for _ in range(2 * bench.sizes.calls)]
        )
    finally:
        backend.close()
        if conn is not None:
            conn.close()
        if pg_backend is not None:
            pg_backend.close()
        if pg is not None and pg_schema is not None:
            pg.drop_schema(pg_schema)
        remove_sqlite(poly_path)
        remove_sqlite(raw_path)
    rows = [
        Row(
            name="move_dir",
            what=f"move() of a directory of {human(n)} files (and back) in a SQLite catalog, "
            "warm, vs a sqlite3 UPDATE of one row in a BEGIN IMMEDIATE transaction "
            "(per call; the goal is polystore's time)",
            polystore=median(samples["polystore"]),
            raw=median(samples["raw"]),
            goal=MOVE_BUDGET,
            kind="budget",
            per_call=True,
            samples={"polystore": samples["polystore"], "raw": samples["raw"]},
        )
    ]
    if "polystore_pg" in samples:
        rows.append(
            Row(
                name="move_dir_postgres",
                what="the same move() in a PostgreSQL catalog (info; raw: the SQLite UPDATE)",
                polystore=median(samples["polystore_pg"]),
                raw=median(samples["raw"]),
                kind="info",
                per_call=True,
                samples={"polystore": samples["polystore_pg"]},
            )
        )
    return rows


def delete_tree(bench: Bench) -> list[Row]:
    """Save a tree of distinct small files, then delete it recursively; both timed."""
    n = bench.sizes.delete_files
    per_dir = bench.sizes.files_per_dir
    dirs = -(-n // per_dir)
    per_batch = 100 * per_dir  # save_batch calls of 100 directories
    saves: list[float] = []
    deletes: list[float] = []
    rounds = min(bench.repeat, bench.delete_rounds)
    for round_no in range(rounds):
        path = fresh_file(bench, "delete-tree")
        backend = SQLBackend(f"sqlite:///{path}")
        try:
            saved = 0.0
            for start in range(0, dirs, 100):
                names = list(tree_paths(start, min(dirs, start + 100), per_dir))
                first = start * per_dir
                # Distinct content per file: the delete releases as many blobs.
                values = [np.array([first + i], dtype=np.int64) for i in range(len(names))]
                began = time.perf_counter()
                backend.save_batch(values, names)
                saved += time.perf_counter() - began
            assert backend.count_nodes() == 1 + dirs + dirs * per_dir
            began = time.perf_counter()
            backend.delete("tree", recursive=True)
            deleted = time.perf_counter() - began
            assert backend.count_nodes() == 0
            log(
                f"  delete_tree round {round_no + 1}/{rounds}: save {saved:.2f} s, "
                f"delete {deleted:.2f} s"
            )
            saves.append(saved)
            deletes.append(deleted)
        finally:
            backend.close()
            remove_sqlite(path)
    files = dirs * per_dir
    assert per_batch > 0
    return [
        Row(
            name="delete_tree",
            what=f"delete(recursive=True) of a tree of {human(files)} files (distinct 8-byte "
            f"arrays, {per_dir:,} per directory) in a SQLite catalog vs the save_batch calls "
            f"that built it (chunks of {human(per_batch)}); {rounds} rounds",
            polystore=median(deletes),
            raw=median(saves),
            goal=DELETE_GOAL,
            samples={"polystore": deletes, "raw": saves},
        )
    ]
