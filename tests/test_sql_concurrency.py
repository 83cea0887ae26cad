"""Several processes and threads writing one catalog: nothing lost, nothing leaked."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from catalog_checks import assert_refcounts_consistent

from polystore.backends.sql import SQLBackend

WORKERS = 4
SAVES = 500


def _save_many(url: str, worker: int) -> int:
    backend = SQLBackend(url)
    try:
        for i in range(SAVES):
            # Shared directories, created on demand by whichever writer comes first.
            backend.save(np.full(8, worker * SAVES + i, np.int64), f"d{i % 10}/w{worker}_{i}.npy")
    finally:
        backend.close()
    return SAVES


def _overwrite_one(url: str, worker: int) -> list[bytes]:
    backend = SQLBackend(url)
    written = []
    try:
        for i in range(60):
            # Half the values collide across workers, so dedup and refcounts are raced too.
            value = f"v{i % 3}".encode() if i % 2 else f"w{worker}-{i}".encode()
            backend.save(value, "hot/one.bin")
            written.append(value)
    finally:
        backend.close()
    return written


ROUNDS = 30
SHARED_DIRS = 12


def _batches_into_new_directories(url: str, worker: int) -> int:
    """Each round, one batch into directories every worker creates at once, in its own order."""
    backend = SQLBackend(url)
    order = list(range(SHARED_DIRS))
    try:
        for r in range(ROUNDS):
            np.random.default_rng(worker * ROUNDS + r).shuffle(order)
            names = [f"r{r}/d{j}/w{worker}.npy" for j in order]
            backend.save_batch([np.full(4, r * 100 + j, np.int64) for j in order], names)
    finally:
        backend.close()
    return ROUNDS


def _run_processes(target: Callable[[str, int], Any], url: str) -> list[Any]:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(WORKERS) as pool:
        return pool.starmap(target, [(url, k) for k in range(WORKERS)])


@pytest.mark.slow
def test_processes_lose_no_write(catalog_url: str) -> None:
    SQLBackend(catalog_url).close()  # migrate first; the race on a fresh DB is tested elsewhere
    assert _run_processes(_save_many, catalog_url) == [SAVES] * WORKERS
    with SQLBackend(catalog_url) as backend:
        files = backend.list_files("", recursive=True)
        assert len(files) == WORKERS * SAVES
        assert backend.list_dir("") == [f"d{i}" for i in range(10)]
        sample = backend.load_batch(files)
        for path, arr in zip(files, sample, strict=True):
            worker, i = (int(x) for x in path.rsplit("/", 1)[1][1:-4].split("_"))
            assert arr[0] == worker * SAVES + i
        assert_refcounts_consistent(backend)


@pytest.mark.slow
def test_processes_creating_the_same_directories_in_batches(catalog_url: str) -> None:
    SQLBackend(catalog_url).close()
    assert _run_processes(_batches_into_new_directories, catalog_url) == [ROUNDS] * WORKERS
    with SQLBackend(catalog_url) as backend:
        assert backend.list_dir("") == sorted(f"r{r}" for r in range(ROUNDS))
        for r in range(ROUNDS):
            assert backend.list_dir(f"r{r}") == sorted(f"d{j}" for j in range(SHARED_DIRS))
        files = backend.list_files("", recursive=True)
        assert len(files) == ROUNDS * SHARED_DIRS * WORKERS
        for path, value in zip(files, backend.load_batch(files), strict=True):
            r, j = int(path.split("/")[0][1:]), int(path.split("/")[1][1:])
            assert value.tolist() == [r * 100 + j] * 4
        assert backend.fsck().ok
        assert_refcounts_consistent(backend)


@pytest.mark.slow
def test_concurrent_overwrites_converge(catalog_url: str) -> None:
    SQLBackend(catalog_url).close()
    written = _run_processes(_overwrite_one, catalog_url)
    with SQLBackend(catalog_url) as backend:
        final = backend.load("hot/one.bin")
        assert final in {v for values in written for v in values}
        assert backend.list_files("hot") == ["hot/one.bin"]
        assert_refcounts_consistent(backend)
        with backend.engine.connect() as conn:
            blobs = conn.execute(sa.text("SELECT COUNT(*) FROM polystore_blobs")).scalar_one()
        assert blobs == 1  # every replaced value was released


def test_threads_share_one_backend(catalog_url: str) -> None:
    errors: list[BaseException] = []
    with SQLBackend(catalog_url) as backend:

        def work(k: int) -> None:
            try:
                for i in range(40):
                    backend.save_batch([f"{k}-{i}".encode()] * 2, [f"t{k}/{i}a", f"t{k}/{i}b"])
                    assert backend.load(f"t{k}/{i}a") == f"{k}-{i}".encode()
            except Exception as exc:  # noqa: BLE001 -- collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert len(backend.list_files("", recursive=True)) == 4 * 40 * 2
        assert_refcounts_consistent(backend)


def test_deadlocked_transactions_raise_conflict_error(pg_url: str) -> None:
    """Two transaction() blocks that lock in opposite orders: one gets ConflictError.

    PostgreSQL aborts one of them to break the deadlock; that one wrote nothing
    and says to run it again, the other commits.
    """
    from polystore import ConflictError

    setup = SQLBackend(pg_url)
    setup.save_batch([b"0", b"1", b"2"], ["x/f", "y1/f", "y2/f"])
    first, second = SQLBackend(pg_url), SQLBackend(pg_url)
    saved, deleted = threading.Event(), threading.Event()
    outcome: dict[str, str] = {}

    def one() -> None:
        try:
            with first.transaction():
                first.save(b"one", "x/f")  # holds x/f
                saved.set()
                deleted.wait(10)
                first.delete("y1", recursive=True)  # waits for the tree version
            outcome["one"] = "committed"
        except ConflictError:
            outcome["one"] = "conflict"

    def two() -> None:
        try:
            with second.transaction():
                saved.wait(10)
                second.delete("y2", recursive=True)  # holds the tree version
                deleted.set()
                second.save(b"two", "x/f")  # waits for x/f
            outcome["two"] = "committed"
        except ConflictError:
            outcome["two"] = "conflict"

    threads = [threading.Thread(target=one), threading.Thread(target=two)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert sorted(outcome.values()) == ["committed", "conflict"], outcome
        winner = "one" if outcome["one"] == "committed" else "two"
        assert setup.load("x/f") == winner.encode()
        assert setup.exists("y1/f") == (winner == "two")  # the loser deleted nothing
        assert setup.exists("y2/f") == (winner == "one")
        assert_refcounts_consistent(setup)
    finally:
        for b in (setup, first, second):
            b.close()
