"""Data, raw-driver baselines and small helpers shared by the scenarios.

The baselines are the raw drivers doing each job the simplest good way:
``sqlite3`` with the journal settings polystore's engine sets (WAL,
``synchronous=NORMAL``), psycopg 3 with ``executemany`` for writes and binary
results for reads.
"""

from __future__ import annotations

import itertools
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from harness import Bench, Row, Side, median

ARRAY_LEN = 1024  # float32: 4 KiB per array


# -- data ------------------------------------------------------------------------


def make_arrays(n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` distinct float32 arrays of 4 KiB (distinct, so no deduplication helps)."""
    rng = np.random.default_rng(seed)
    return [rng.random(ARRAY_LEN, dtype=np.float32) for _ in range(n)]


def batch_paths(n: int) -> list[str]:
    """``batch/NN/NNNNN.npy``: 1,000 files per directory, three levels deep."""
    return [f"batch/{i // 1000:02d}/{i:05d}.npy" for i in range(n)]


def batch_dirs(n: int) -> int:
    return 1 + -(-n // 1000)


def tree_paths(first_dir: int, last_dir: int, per_dir: int) -> Iterator[str]:
    for d in range(first_dir, last_dir):
        for f in range(per_dir):
            yield f"tree/d{d:04d}/f{f:04d}.npy"


def human(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return f"{n:,}"


_counter = itertools.count()


def fresh_name(bench: Bench, stem: str) -> Path:
    """A path in the work directory that no earlier run used."""
    return bench.workdir / f"{stem}-{next(_counter)}"


def fresh_file(bench: Bench, stem: str) -> Path:
    return fresh_name(bench, stem).with_suffix(".db")


def remove_sqlite(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def open_catalog(path: Path, *, hash_algorithm: str = "blake3", **options: Any) -> Any:
    """A fresh SQLite catalog at ``path``; ``hash_algorithm="sha256"`` makes it one whose
    content SHA-256 names, as a catalog that held content before revision 0010 does."""
    from polystore.backends.sql import SQLBackend

    url = f"sqlite:///{path}"
    if hash_algorithm != "blake3":
        with SQLBackend(url) as made, made.engine.begin() as conn:
            conn.exec_driver_sql(
                "UPDATE polystore_identity SET hash_algorithm = ?", (hash_algorithm,)
            )
    backend = SQLBackend(url, **options)
    assert backend.hash_algorithm == hash_algorithm
    return backend


# -- raw drivers -----------------------------------------------------------------


def raw_sqlite(path: Path) -> sqlite3.Connection:
    """A sqlite3 connection with the journal settings polystore's engine sets."""
    conn = sqlite3.connect(path, isolation_level=None)  # explicit BEGIN/COMMIT below
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


RAW_BLOBS = "CREATE TABLE blobs (path TEXT PRIMARY KEY, data BLOB NOT NULL)"


def raw_sqlite_insert(conn: sqlite3.Connection, paths: list[str], blobs: list[bytes]) -> None:
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany("INSERT INTO blobs (path, data) VALUES (?, ?)", zip(paths, blobs, strict=True))
    conn.execute("COMMIT")


def raw_sqlite_load(conn: sqlite3.Connection, paths: list[str]) -> list[np.ndarray]:
    """Blobs by path, 500 per ``IN`` list, in one read transaction, as arrays in order."""
    found: dict[str, bytes] = {}
    conn.execute("BEGIN")
    for start in range(0, len(paths), 500):
        part = paths[start : start + 500]
        marks = ",".join("?" * len(part))
        found.update(conn.execute(f"SELECT path, data FROM blobs WHERE path IN ({marks})", part))
    conn.execute("COMMIT")
    return [np.frombuffer(found[p], dtype=np.float32) for p in paths]


class Postgres:
    """Fresh schemas on the benchmark server, for polystore and for psycopg."""

    def __init__(self, url: str) -> None:
        from sqlalchemy.engine import make_url

        self.url = url
        self.conninfo = (
            make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        )

    def create_schema(self) -> str:
        import psycopg

        name = f"ps_bench_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{name}"')
        return name

    def drop_schema(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{name}" CASCADE')

    def polystore_url(self, schema: str) -> str:
        sep = "&" if "?" in self.url else "?"
        return f"{self.url}{sep}options=-csearch_path%3D{schema}"

    def connect(self, schema: str) -> Any:
        import psycopg

        # Autocommit, so every transaction below is an explicit conn.transaction().
        return psycopg.connect(self.conninfo, options=f"-csearch_path={schema}", autocommit=True)

    def create_blobs(self, conn: Any) -> None:
        # The "C" collation, like polystore's name column: byte order, no locale cost.
        conn.execute('CREATE TABLE blobs (path TEXT COLLATE "C" PRIMARY KEY, data BYTEA NOT NULL)')


def pg_insert(conn: Any, paths: list[str], blobs: list[bytes]) -> None:
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO blobs (path, data) VALUES (%s, %b)", zip(paths, blobs, strict=True)
        )


def pg_load(conn: Any, paths: list[str]) -> list[np.ndarray]:
    with conn.transaction(), conn.cursor(binary=True) as cur:
        cur.execute("SELECT path, data FROM blobs WHERE path = ANY(%s)", [paths])
        found = dict(cur.fetchall())
    return [np.frombuffer(found[p], dtype=np.float32) for p in paths]


# -- helpers for scenarios ---------------------------------------------------------------


def profile_side(bench: Bench, name: str, side: Side) -> None:
    if bench.profile_dir is None:
        return
    state = side.prepare()
    try:
        bench.profile(name, lambda: side.run(state))
    finally:
        side.cleanup(state)


def check_arrays(expected: list[np.ndarray]) -> Callable[[Any, Any], None]:
    def check(_state: Any, got: Any) -> None:
        assert len(got) == len(expected), (len(got), len(expected))
        for want, have in zip(expected, got, strict=True):
            assert have.dtype == want.dtype
            assert np.array_equal(have, want)

    return check


def bulk_row(name: str, what: str, times: dict[str, list[float]], goal: float | None) -> Row:
    return Row(
        name=name,
        what=what,
        polystore=median(times["polystore"]),
        raw=median(times["raw"]),
        goal=goal,
        kind="ratio" if goal is not None else "info",
        samples=times,
    )
