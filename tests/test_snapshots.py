"""Snapshots (DESIGN §9): the API, reads at a snapshot, diff, restore, history and gc,
the migration, consistency under concurrent writers, the SQL in the docs and the CLI.

Every test runs on SQLite and on PostgreSQL (``catalog_url``).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from catalog_checks import made_before_0010
from processes import run_together
from test_schema_docs import sql_blocks

from polystore import (
    AlreadyExistsError,
    Change,
    NotFoundError,
    ReadOnlyError,
    Snapshot,
    SQLBackend,
    migrate,
)
from polystore.blobs import LocalBlobStore

DOCS = Path(__file__).resolve().parents[1] / "docs"
POLYSTORE = Path(sys.executable).parent / "polystore"


@pytest.fixture
def backend(catalog_url: str) -> Iterator[SQLBackend]:
    with SQLBackend(catalog_url) as opened:
        yield opened


def count(backend: SQLBackend, table: str) -> int:
    with backend.engine.connect() as conn:
        return int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())


@contextmanager
def writes() -> Iterator[list[str]]:
    """Every statement that writes (INSERT, UPDATE, DELETE) any engine sends while inside."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if re.match(r"\s*(INSERT|UPDATE|DELETE)\b", statement, re.IGNORECASE):
            seen.append(statement)

    sa.event.listen(sa.Engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", record)


def fill(backend: SQLBackend) -> None:
    backend.save_batch(
        [np.arange(3), np.arange(4.0), "text", {"a": 1}],
        ["p/a/x.npy", "p/a/y.npy", "p/b/t.txt", "q/meta.json"],
    )
    backend.save(np.zeros(2), "p/a/x.npy", attrs={"well": "A01"})


# -- the API ----------------------------------------------------------------------------


def test_snapshot_list_names_and_delete(backend: SQLBackend) -> None:
    fill(backend)
    first = backend.snapshot("first", message="before the run")
    assert isinstance(first, Snapshot)
    assert (first.name, first.message) == ("first", "before the run")
    unnamed = backend.snapshot()
    assert unnamed.name is None and unnamed.id != first.id
    with pytest.raises(AlreadyExistsError):
        backend.snapshot("first")
    last = backend.snapshot("last")
    assert [s.id for s in backend.snapshots()] == [first.id, unnamed.id, last.id]
    assert first.created_at <= unnamed.created_at <= last.created_at
    for ref in (first, "first", first.id):
        assert backend.at(ref).snapshot == first
    with pytest.raises(NotFoundError):
        backend.at("nope")
    with pytest.raises(NotFoundError):
        backend.at(10**9)
    backend.delete_snapshot("first")
    backend.delete_snapshot(unnamed.id)
    assert backend.snapshots() == [last]
    with pytest.raises(NotFoundError):
        backend.delete_snapshot("first")
    backend.snapshot("first")  # (the name is free again)


def test_reads_at_a_snapshot(backend: SQLBackend) -> None:
    fill(backend)
    snap = backend.snapshot("s")
    # Everything changes afterwards: content, attrs, a move, a delete, new files.
    backend.save(np.ones(5), "p/a/x.npy", attrs={"well": "B02"})
    backend.move("p/b", "p/c")
    backend.delete("q", recursive=True)
    backend.save(np.arange(9), "new/n.npy")
    view = backend.at(snap)
    assert view.list_dir("") == ["p", "q"]
    assert view.list_dir("p") == ["a", "b"]
    assert view.list_files("", recursive=True) == [
        "p/a/x.npy",
        "p/a/y.npy",
        "p/b/t.txt",
        "q/meta.json",
    ]
    assert view.list_files("p/a", pattern="x*") == ["p/a/x.npy"]
    assert np.array_equal(view.load("p/a/x.npy"), np.zeros(2))
    values = view.load_batch(["p/b/t.txt", "p/a/y.npy", "q/meta.json", "p/a/x.npy"])
    assert values[0] == "text" and values[2] == {"a": 1}
    assert np.array_equal(values[1], np.arange(4.0)) and np.array_equal(values[3], np.zeros(2))
    assert view.exists("q/meta.json") and view.is_dir("p/b") and view.is_file("p/b/t.txt")
    assert not view.exists("new") and not view.exists("p/c")
    stat = view.stat("p/a/x.npy")
    assert (stat.attrs, stat.shape, stat.kind) == ({"well": "A01"}, (2,), "file")
    assert stat.hash != backend.stat("p/a/x.npy").hash
    assert [s.path for s in view.query(attrs={"well": "A01"})] == ["p/a/x.npy"]
    assert [s.path for s in view.query(under="p", kind="dir")] == ["p/a", "p/b"]
    assert [s.path for s in view.query(dtype="float64")] == ["p/a/x.npy", "p/a/y.npy"]
    with pytest.raises(NotFoundError):
        view.load("new/n.npy")
    with pytest.raises(NotFoundError):
        view.load_batch(["p/a/x.npy", "p/c/t.txt"])
    # The live catalog is what was written last.
    assert backend.list_dir("") == ["new", "p"]
    assert np.array_equal(backend.load("p/a/x.npy"), np.ones(5))
    assert backend.fsck().ok


@pytest.mark.parametrize("inline_limit", [1 << 20, 0], ids=["inline", "external"])
def test_lazy_arrays_at_a_snapshot(catalog_url: str, tmp_path: Path, inline_limit: int) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    with SQLBackend(catalog_url, blob_store=store, inline_limit=inline_limit) as backend:
        old = np.arange(600.0).reshape(20, 30)
        backend.save(old, "a/x.npy")
        snap = backend.snapshot("before")
        backend.save(-old, "a/x.npy")
        backend.gc(grace=0)  # the snapshot keeps the old content
        lazy = backend.at(snap).open_array("a/x.npy")
        assert lazy.shape == (20, 30)
        np.testing.assert_array_equal(lazy[3:5, ::7], old[3:5, ::7])
        np.testing.assert_array_equal(backend.open_array("a/x.npy")[3], -old[3])
        with pytest.raises(NotFoundError):
            backend.at(snap).open_array("a/missing.npy")
        backend.delete_snapshot(snap)
        backend.gc(grace=0)  # now nothing keeps it
        with pytest.raises(NotFoundError):
            lazy[0]
        with pytest.raises(NotFoundError):
            backend.at(snap)


def test_content_streams_as_at_a_snapshot(backend: SQLBackend) -> None:
    """What ``polystore get --at`` streams for large bytes: the old content, in chunks."""
    old = bytes(range(256)) * 40
    backend.save(old, "big.bin")
    snap = backend.snapshot("s")
    backend.save(b"new", "big.bin")
    view = backend.at(snap)
    assert b"".join(view.iter_content("big.bin", chunk_size=1000)) == old
    assert view.serializers is backend.serializers
    with pytest.raises(NotFoundError):
        list(view.iter_content("missing.bin"))


def test_every_write_at_a_snapshot_is_refused(backend: SQLBackend) -> None:
    fill(backend)
    view = backend.at(backend.snapshot("s"))
    before = backend.list_files("", recursive=True)
    for call in (
        lambda: view.save(1, "p/z"),
        lambda: view.save_batch([1], ["p/z"]),
        lambda: view.delete("p", recursive=True),
        lambda: view.move("p", "m"),
        lambda: view.copy("p", "m"),
        lambda: view.ensure_directory("d"),
    ):
        with pytest.raises(ReadOnlyError):
            call()
    assert backend.list_files("", recursive=True) == before
    backend.delete_snapshot("s")
    with pytest.raises(NotFoundError):  # a view of a deleted snapshot reads nothing
        view.list_dir("")


def test_a_snapshot_writes_two_rows_whatever_the_catalog_size(backend: SQLBackend) -> None:
    def cost() -> list[str]:
        with writes() as seen:
            backend.snapshot()
        return seen

    backend.save(1, "one")
    small = cost()
    backend.save_batch(list(range(3000)), [f"d{i % 30}/f{i}" for i in range(3000)])
    large = cost()
    assert len(small) == len(large) == 2  # the snapshot row, the epoch counter
    assert count(backend, "polystore_node_history") == 0


def test_without_snapshots_overwrites_do_not_grow_the_catalog(backend: SQLBackend) -> None:
    for i in range(30):
        backend.save(np.full(100, i), "f.npy")
        backend.move("f.npy", "g.npy")
        backend.move("g.npy", "f.npy")
    assert count(backend, "polystore_node_history") == 0
    assert count(backend, "polystore_blobs") == 1
    # A snapshot taken and deleted leaves nothing behind either.
    backend.snapshot("s")
    backend.delete_snapshot("s")
    for i in range(10):
        backend.save(np.full(100, i), "f.npy")
    assert count(backend, "polystore_node_history") == 0


def test_a_snapshot_keeps_one_version_per_changed_row(backend: SQLBackend) -> None:
    backend.save(np.zeros(3), "d/f.npy")
    backend.snapshot("s")
    for i in range(20):
        backend.save(np.full(3, i), "d/f.npy")
    assert count(backend, "polystore_node_history") == 1
    backend.move("d", "e")  # a directory move: one more row, its own
    assert count(backend, "polystore_node_history") == 2
    assert backend.at("s").list_files("", recursive=True) == ["d/f.npy"]
    assert backend.fsck().ok


def test_sql_another_program_runs_keeps_the_history_right(backend: SQLBackend) -> None:
    """The triggers, not polystore's write paths, keep old versions: plain SQL too."""
    backend.save(1, "d/f", attrs={"v": 1})
    backend.save(2, "d/g")
    backend.snapshot("s")
    with backend.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE polystore_nodes SET attrs = :a WHERE name = 'f'"), {"a": '{"v": 2}'}
        )
        conn.execute(sa.text("DELETE FROM polystore_nodes WHERE name = 'g'"))
        conn.execute(sa.text("UPDATE polystore_blobs SET refcount = refcount - 1 WHERE refcount = 1 "
                             "AND hash NOT IN (SELECT blob_hash FROM polystore_nodes "
                             "WHERE blob_hash IS NOT NULL)"))  # fmt: skip
        epochs = conn.execute(sa.text("SELECT epoch FROM polystore_nodes WHERE name = 'f'"))
        assert epochs.scalar_one() == 1  # (stamped with the current epoch by a trigger)
    view = backend.at("s")
    assert view.stat("d/f").attrs == {"v": 1} and backend.stat("d/f").attrs == {"v": 2}
    assert view.load("d/g") == 2 and not backend.exists("d/g")
    assert count(backend, "polystore_node_history") == 2
    with backend.engine.begin() as conn:  # once more: already kept, nothing more to keep
        conn.execute(sa.text("UPDATE polystore_nodes SET attrs = NULL WHERE name = 'f'"))
    assert count(backend, "polystore_node_history") == 2
    assert view.stat("d/f").attrs == {"v": 1}
    assert backend.fsck().ok


# -- content and gc ------------------------------------------------------------------------


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
def test_gc_keeps_what_a_snapshot_reaches(catalog_url: str, tmp_path: Path, external: bool) -> None:
    store = LocalBlobStore(tmp_path / "blobs") if external else None
    with SQLBackend(catalog_url, blob_store=store, inline_limit=0 if external else 1 << 20) as b:
        b.save(np.arange(100), "f.npy")
        b.save(np.arange(50), "g.npy")
        b.snapshot("s")
        b.save(np.arange(7), "f.npy")  # the old content is now only the snapshot's
        b.delete("g.npy")
        report = b.gc(grace=0)
        assert report.blobs_deleted == 0
        assert np.array_equal(b.at("s").load("f.npy"), np.arange(100))
        assert np.array_equal(b.at("s").load_batch(["g.npy"])[0], np.arange(50))
        check = b.fsck(verify=True)
        assert check.ok and check.garbage == 0 and check.history_versions == 2, str(check)
        b.delete_snapshot("s")
        assert count(b, "polystore_node_history") == 0
        report = b.gc(grace=0)
        assert report.blobs_deleted == 2
        if external:
            assert report.objects_deleted == 2
        check = b.fsck(verify=True)
        assert check.ok and check.garbage == 0, str(check)
        assert np.array_equal(b.load("f.npy"), np.arange(7))


def test_gc_prunes_versions_no_snapshot_sees(backend: SQLBackend) -> None:
    backend.save(1, "f")
    backend.snapshot("s")
    backend.save(2, "f")
    with backend.engine.begin() as conn:  # (deleted behind polystore's back)
        conn.execute(sa.text("DELETE FROM polystore_snapshots"))
    report = backend.gc(grace=0)
    assert report.history_pruned == 1 and report.blobs_deleted == 1
    assert backend.fsck().ok


# -- diff and restore ---------------------------------------------------------------------


def test_diff(backend: SQLBackend) -> None:
    fill(backend)
    old = backend.snapshot("old")
    backend.save(np.ones(2), "p/a/x.npy", attrs={"well": "A01"})  # content
    backend.save(np.arange(4.0), "p/a/y.npy", attrs={"k": 1})  # attrs only
    backend.move("p/b", "p/c")  # a directory move: every file in it
    backend.save({"a": 1}, "q/meta.json")  # the same again: no change
    backend.save(0, "z")
    backend.ensure_directory("empty")  # directories are not files
    new = backend.snapshot("new")
    backend.delete("z")
    expected = [
        Change("p/a/x.npy", "modified"),
        Change("p/a/y.npy", "modified"),
        Change("p/b/t.txt", "deleted"),
        Change("p/c/t.txt", "added"),
        Change("z", "added"),
    ]
    assert backend.diff(old, new) == expected
    assert backend.diff("old", "new", path="p/a") == expected[:2]
    assert backend.diff("old", path="p/a/x.npy") == expected[:1]
    assert backend.diff(old) == expected[:-1]  # (to now: z is gone again)
    assert backend.diff(new, old) == [
        Change("p/a/x.npy", "modified"),
        Change("p/a/y.npy", "modified"),
        Change("p/b/t.txt", "added"),
        Change("p/c/t.txt", "deleted"),
        Change("z", "deleted"),
    ]
    assert backend.diff(new, new) == []


def _files_of(view: Any) -> dict[str, Any]:
    return {st.path: (st.hash, st.attrs, st.dtype, st.shape) for st in view.query(kind="file")}


def test_diff_agrees_with_comparing_whole_trees(backend: SQLBackend) -> None:
    """Random saves, moves, copies and deletes between snapshots: diff (from the rows
    that changed) says what comparing every file of the two states says."""
    rng = np.random.default_rng(7)
    dirs = ["a", "a/b", "a/b/c", "d", "e/f"]
    snaps = [backend.snapshot("s0")]
    for step in range(1, 7):
        for _ in range(12):
            op = rng.integers(6)
            files = backend.list_files("", recursive=True)
            here = [d for d in dirs if backend.is_dir(d)]
            try:
                if op <= 1 or not files:
                    target = f"{dirs[rng.integers(len(dirs))]}/f{rng.integers(8)}"
                    attrs = {"k": int(rng.integers(2))}
                    backend.save(int(rng.integers(3)), target, attrs=attrs)
                elif op == 2:
                    backend.delete(files[rng.integers(len(files))])
                elif op == 3 and here:
                    src = here[rng.integers(len(here))]
                    backend.move(src, f"m{step}_{rng.integers(100)}")
                elif op == 4 and here:
                    src = here[rng.integers(len(here))]
                    backend.copy(src, f"c{step}_{rng.integers(100)}")
                elif here:
                    backend.delete(here[rng.integers(len(here))], recursive=True)
            except (AlreadyExistsError, NotFoundError, OSError):
                pass
        snaps.append(backend.snapshot(f"s{step}"))
    states = [_files_of(backend.at(s)) for s in snaps] + [_files_of(backend)]
    for i, old in enumerate(snaps):
        for j, new in enumerate([*snaps, None]):
            before, after = states[i], states[j]
            expected = sorted(
                [Change(p, "deleted") for p in before.keys() - after.keys()]
                + [Change(p, "added") for p in after.keys() - before.keys()]
                + [Change(p, "modified") for p in before.keys() & after.keys()
                   if before[p] != after[p]]
            )  # fmt: skip
            assert backend.diff(old, new) == expected, (i, j)
    assert backend.fsck().ok


def _state(backend: Any, under: str = "") -> dict[str, Any]:
    found = {}
    for stat in backend.query(under=under):
        found[stat.path] = (stat.kind, stat.hash, stat.attrs, stat.shape, stat.serializer)
    return found


def test_restore_a_tree_a_file_and_everything(backend: SQLBackend) -> None:
    fill(backend)
    backend.save("keep", "outside.txt")
    snap = backend.snapshot("s")
    at_snapshot = _state(backend.at(snap))
    backend.save(np.ones(9), "p/a/x.npy", attrs={"well": "Z"})
    backend.delete("p/a/y.npy")
    backend.save("new", "p/a/extra/n.txt")
    backend.move("p/b", "p/c")
    backend.save("b is a file now", "p/b")
    backend.save("changed", "outside.txt")

    backend.restore(snap, "p")
    live = _state(backend, "p")
    assert live == {k: v for k, v in at_snapshot.items() if k.startswith("p/")}
    assert backend.load("outside.txt") == "changed"  # outside the path: untouched
    assert np.array_equal(backend.load("p/a/x.npy"), np.zeros(2))
    assert backend.fsck().ok
    assert backend.diff(snap, path="p") == []

    backend.delete("q/meta.json")
    backend.restore("s", "q/meta.json")  # one file
    assert backend.load("q/meta.json") == {"a": 1}
    backend.restore("s", "q/none")  # absent then: absent now
    assert not backend.exists("q/none")

    backend.save(1, "later/file")
    backend.restore(snap)  # everything
    assert _state(backend) == at_snapshot
    assert backend.diff(snap) == []
    assert backend.fsck(verify=True).ok


def test_restore_is_one_transaction(backend: SQLBackend) -> None:
    fill(backend)
    backend.snapshot("s")
    backend.delete("p", recursive=True)
    with pytest.raises(RuntimeError), backend.transaction():
        backend.restore("s")
        assert backend.exists("p/a/x.npy")
        raise RuntimeError
    assert not backend.exists("p")
    assert backend.fsck().ok


# -- the migration --------------------------------------------------------------------------


def test_migration_down_and_up_with_snapshots(catalog_url: str) -> None:
    made_before_0010(catalog_url)
    with SQLBackend(catalog_url) as backend:
        fill(backend)
        backend.snapshot("s")
        backend.save(np.arange(3), "p/a/x.npy")
        backend.delete("q", recursive=True)
        live = _state(backend)
    migrate.downgrade(catalog_url, "0005")
    assert migrate.current(catalog_url) == "0005"
    migrate.upgrade(catalog_url)
    assert migrate.check(catalog_url) == []
    with SQLBackend(catalog_url) as backend:
        assert _state(backend) == live  # the live catalog is whole...
        assert backend.snapshots() == []  # ...the snapshots are gone...
        assert backend.gc(grace=0).blobs_deleted == 2  # ...and what only they kept goes
        assert backend.fsck(verify=True).ok
        backend.snapshot("again")
        backend.save(1, "p/a/x.npy")
        assert np.array_equal(backend.at("again").load("p/a/x.npy"), np.arange(3))


# -- the SQL in the docs --------------------------------------------------------------------


def test_the_documented_sql_answers_what_a_path_held(backend: SQLBackend) -> None:
    fill(backend)
    backend.snapshot("before")
    stat = backend.stat("p/a/x.npy")
    backend.save(np.ones(3), "p/a/x.npy")
    backend.move("p", "moved")
    dialect = backend.engine.dialect.name
    blocks = list(sql_blocks((DOCS / "snapshots.rst").read_text("utf-8")))
    assert sorted(b.name for b in blocks) == ["path-at-postgresql", "path-at-sqlite"]
    (block,) = [b for b in blocks if b.name == f"path-at-{dialect}"]
    with backend.engine.connect() as conn:
        rows = conn.execute(sa.text(block.sql)).all()
    assert [tuple(r) for r in rows] == [("p/a/x.npy", "file", stat.size, stat.hash)]


# -- consistency under concurrent writers ----------------------------------------------------

WRITERS = 2
BATCH = 20


def _worker(url: str, role: str, number: int, seconds: float, out: Any) -> None:
    errors: list[str] = []
    done = 0
    try:
        with SQLBackend(url) as backend:
            stop = time.monotonic() + seconds
            while time.monotonic() < stop:
                if role == "writer":
                    # Every file of writer w holds (w, k) after its batch k.
                    value = np.array([number, done], dtype=np.int64)
                    backend.save_batch(
                        [value] * BATCH, [f"w{number}/d{i % 3}/f{i}" for i in range(BATCH)]
                    )
                    if done % 5 == 4:  # and a directory move, back and forth
                        backend.move(f"w{number}/d0", f"w{number}/tmp")
                        backend.move(f"w{number}/tmp", f"w{number}/d0")
                elif role == "snapshots":
                    backend.snapshot(f"s{done}")
                    if done % 3 == 2:
                        backend.delete_snapshot(f"s{done - 1}")
                    time.sleep(0.05)
                else:
                    backend.gc(grace=0)
                done += 1
    except Exception:  # noqa: BLE001 -- reported to the parent, which fails
        errors.append(traceback.format_exc())
    out.put({"role": role, "done": done, "errors": errors})


def test_snapshots_hold_whole_batches_while_others_write(catalog_url: str) -> None:
    with SQLBackend(catalog_url) as backend:
        backend.save(0, "start")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["numpy", "sqlalchemy", "polystore.backends.sql"])
    out = ctx.Queue()
    roles = ["writer"] * WRITERS + ["snapshots", "gc"]
    seconds = 8.0
    procs = [
        ctx.Process(target=_worker, args=(catalog_url, role, k, seconds, out))
        for k, role in enumerate(roles)
    ]
    for proc in procs:
        proc.start()
    try:
        reports = [out.get(timeout=seconds + 120) for _ in procs]
    except queue.Empty:
        pytest.fail("a worker never reported")
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    assert [r["errors"] for r in reports] == [[]] * len(roles)
    done = {r["role"]: r["done"] for r in reports}
    assert done["snapshots"] >= 5 and done["writer"] >= 5, done

    with SQLBackend(catalog_url) as backend:
        snaps = backend.snapshots()
        assert len(snaps) >= 3
        for snap in snaps:
            view = backend.at(snap)
            files = view.list_files("", recursive=True)
            values = view.load_batch(files)
            batches: dict[int, set[int]] = {}
            for path, value in zip(files, values, strict=True):
                if path != "start":
                    batches.setdefault(int(value[0]), set()).add(int(value[1]))
            for writer, seen in batches.items():
                assert len(seen) == 1, f"{snap.name}: writer {writer} split: {seen}"
            for writer in batches:
                assert len([f for f in files if f.startswith(f"w{writer}/")]) == BATCH
        report = backend.fsck(verify=True)
        assert report.ok, str(report)
        for snap in snaps:
            backend.delete_snapshot(snap)
        backend.gc(grace=0)
        assert count(backend, "polystore_node_history") == 0
        report = backend.fsck(verify=True)
        assert report.ok and report.garbage == 0, str(report)


# -- restore while others write in the same tree ------------------------------------------

RESTORE_FILES = 300


def _restore_worker(
    config: dict[str, Any], role: str, number: int, ready: Any, go: Any, out: Any
) -> None:
    """``restorer``: fills ``r/new`` (which snapshot ``s`` lacks) and restores ``r``
    (and now and then ``r/x.bin`` alone) to ``s``; ``mover``: moves files out of
    ``r`` into ``out/``, where nothing else writes, and reads each back;
    ``overwriter``: overwrites and deletes ``r/x.bin``, which ``s`` holds."""
    errors: list[str] = []
    moved: dict[str, bytes] = {}
    done = 0
    try:
        with SQLBackend(config["url"], blob_store=config["blob_store"], inline_limit=64) as backend:
            ready.put(number)
            go.wait()
            stop = time.monotonic() + config["seconds"]
            while time.monotonic() < stop:
                if role == "restorer":
                    names = [f"r/new/n{i}.bin" for i in range(RESTORE_FILES)]
                    backend.save_batch(
                        [f"{done}|{i}|".encode() * 9 for i in range(RESTORE_FILES)], names
                    )
                    backend.restore("s", "r/x.bin" if done % 4 == 3 else "r")
                elif role == "mover":
                    try:
                        name = backend.list_dir("r/new")[-1]
                        backend.move(f"r/new/{name}", f"out/{done}.bin")
                    except (NotFoundError, NotADirectoryError, IndexError):
                        continue  # restored away meanwhile: nothing to move
                    moved[f"out/{done}.bin"] = backend.load(f"out/{done}.bin")
                else:
                    if done % 3 == 2:
                        with contextlib.suppress(NotFoundError):
                            backend.delete("r/x.bin")
                    else:
                        backend.save(f"{number}|{done}|".encode() * 20, "r/x.bin")
                done += 1
    except Exception:  # noqa: BLE001 -- reported to the parent, which fails
        errors.append(traceback.format_exc())
    out.put({"role": role, "done": done, "errors": errors, "moved": moved})


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
def test_restore_never_touches_what_was_moved_out_and_counts_what_it_replaced(
    catalog_url: str, tmp_path: Path, external: bool
) -> None:
    """A restore of ``r`` races moves out of ``r`` and overwrites of a file in it.

    Every file moved out stays where it went, with its bytes (a restore that
    deleted by id once deleted it there); every reference count is the number
    of files and kept versions using the content, so ``gc`` leaves a clean
    catalog.
    """
    blob_store = str(tmp_path / "blobs") if external else None
    with SQLBackend(catalog_url, blob_store=blob_store, inline_limit=64) as backend:
        backend.save(b"then" * 40, "r/x.bin")
        backend.save(b"kept", "r/keep.bin")
        backend.snapshot("s")
    config = {"url": catalog_url, "blob_store": blob_store, "seconds": 6.0}
    reports = run_together(
        _restore_worker, config, ["restorer", "mover", "overwriter"], seconds=config["seconds"]
    )
    assert [r["errors"] for r in reports] == [[]] * 3
    done = {r["role"]: r["done"] for r in reports}
    (moved,) = [r["moved"] for r in reports if r["role"] == "mover"]
    assert done["restorer"] >= 3 and moved, (done, len(moved))

    with SQLBackend(catalog_url, blob_store=blob_store, inline_limit=64) as backend:
        assert sorted(backend.list_dir("out")) == sorted(p.split("/")[1] for p in moved)
        assert backend.load_batch(list(moved)) == list(moved.values())
        report = backend.fsck(verify=True)
        assert report.ok, str(report)
        backend.restore("s", "r")
        assert backend.load("r/x.bin") == b"then" * 40
        backend.delete("r", recursive=True)
        backend.delete_snapshot("s")
        backend.gc(grace=0)
        report = backend.fsck(verify=True)
        assert report.ok and report.garbage == 0, str(report)
        assert backend.load_batch(list(moved)) == list(moved.values())


# -- the command line -----------------------------------------------------------------------


def run(url: str, *args: str, code: int = 0) -> str:
    result = subprocess.run(
        [str(POLYSTORE), "--url", url, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "POLYSTORE_URL": ""},
    )
    assert result.returncode == code, (result.stdout, result.stderr)
    return result.stdout if code == 0 else result.stderr


def test_the_command_line(catalog_url: str, tmp_path: Path) -> None:
    with SQLBackend(catalog_url) as backend:
        backend.save("hello", "d/a.txt")
        backend.save(b"\x00\x01", "d/b.bin")
    assert "before" in run(catalog_url, "snapshot", "create", "before", "-m", "the start")
    run(catalog_url, "snapshot", "create", "before", code=1)
    with SQLBackend(catalog_url) as backend:
        backend.save("changed", "d/a.txt")
        backend.delete("d/b.bin")
        backend.save("new", "e/c.txt")
    listed = run(catalog_url, "snapshot", "list")
    assert "before" in listed and "the start" in listed
    assert run(catalog_url, "diff", "before").splitlines() == [
        "M d/a.txt",
        "D d/b.bin",
        "A e/c.txt",
    ]
    assert run(catalog_url, "--at", "before", "ls").split() == ["d/"]
    assert run(catalog_url, "--at", "before", "ls", "d").split() == ["a.txt", "b.bin"]
    assert run(catalog_url, "--at", "before", "cat", "d/a.txt").strip() == "hello"
    assert "└── b.bin" in run(catalog_url, "--at", "before", "tree")
    assert "b.bin" in run(catalog_url, "--at", "before", "stat", "d/b.bin")
    run(catalog_url, "--at", "before", "du")
    run(catalog_url, "--at", "before", "get", "d/b.bin", str(tmp_path / "b.bin"))
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    run(catalog_url, "--at", "nope", "ls", code=1)
    run(catalog_url, "--at", "before", "rm", "d/a.txt", code=2)  # not a read command
    run(catalog_url, "restore", "before", "d")
    with SQLBackend(catalog_url) as backend:
        assert backend.load("d/a.txt") == "hello" and backend.load("d/b.bin") == b"\x00\x01"
        assert backend.exists("e/c.txt")
    run(catalog_url, "snapshot", "delete", "before")
    assert "before" not in run(catalog_url, "snapshot", "list")
    run(catalog_url, "snapshot", "delete", "before", code=1)
