"""Processes contending for one catalog: exact reference counts, no raw errors, nothing lost.

Each case starts several processes on one catalog (SQLite or PostgreSQL) that
do conflicting things at once -- save the same content, save into the
directories another deletes, move and copy files and directories out of them,
rebalance, run ``gc(grace=0)`` -- for a bounded time. Afterwards the catalog
must be whole:

* ``fsck()`` is clean, and every blob's reference count equals the number of
  files that use it;
* every file in the catalog loads, byte for byte (each content names itself);
* what a worker saw committed where nobody deletes is there: the last content
  saved at each ``keep/`` path, and every move and copy destination;
* ``gc(grace=0)`` afterwards frees nothing that is live: everything loads
  again and fsck stays clean;
* no worker saw an error but the polystore errors its operation allows (a
  source another worker deleted first is :class:`NotFoundError`). A raw
  psycopg, sqlite3 or SQLAlchemy error, a :class:`ConflictError` left after
  the retries, anything else: the test fails.

``POLYSTORE_CONTENTION_SECONDS`` sets each case's time (default 6). The soak
(:func:`test_soak`) runs only when ``POLYSTORE_SOAK_SECONDS`` is set, with
eight processes; every case appends its figures to
``POLYSTORE_RELIABILITY_LOG`` when that names a file.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from catalog_checks import content_hash, refcounts
from processes import join, run_together

from polystore import AlreadyExistsError, IsADirectoryError, NotFoundError
from polystore.backends.sql import SQLBackend
from polystore.blobs.local import LocalBlobStore

SECONDS = float(os.environ.get("POLYSTORE_CONTENTION_SECONDS", "").strip() or 6)
SOAK_SECONDS = float(os.environ.get("POLYSTORE_SOAK_SECONDS", "").strip() or 0)
#: Files X/f0 .. X/f30 that savers write, movers take and the deleter removes.
SLOTS = 31
#: Contents every process saves (dedup contention); the others are unique.
POOL = [f"pool{i}" for i in range(6)]


def content(tag: str) -> bytes:
    """Bytes that name themselves: the tag, then a digest of it, repeated."""
    digest = hashlib.sha256(tag.encode()).digest()
    return tag.encode() + b"|" + digest * (1 + len(tag) % 5)


def tag_of(data: Any) -> str:
    """The tag of bytes made by :func:`content`; AssertionError if they are not such bytes."""
    raw = bytes(data)
    tag = raw.partition(b"|")[0].decode()
    assert raw == content(tag), f"damaged content: {raw[:60]!r}"
    return tag


# -- workers --------------------------------------------------------------------------------


class Worker:
    """One process's loop of one role; counts what it did and every error it met."""

    #: Errors each role may meet for reasons other than a bug (the source was taken first).
    ALLOWED: dict[str, tuple[type[BaseException], ...]] = {
        "mover": (NotFoundError,),
        "copier": (NotFoundError,),
        "deleter": (NotFoundError, IsADirectoryError),  # (a directory not empty)
    }

    def __init__(self, backend: SQLBackend, role: str, number: int, pool_only: bool) -> None:
        self.backend = backend
        self.role = role
        self.name = f"{role}{number}"
        self.pool_only = pool_only
        self.random = random.Random(f"{role}{number}{os.getpid()}")
        self.seq = 0
        self.ops: Counter[str] = Counter()
        self.allowed: Counter[str] = Counter()
        self.errors: list[str] = []
        self.kept: dict[str, str] = {}
        self.made: list[str] = []  # move and copy destinations

    def tag(self) -> str:
        self.seq += 1
        if self.pool_only or self.random.random() < 0.3:
            return self.random.choice(POOL)
        return f"{self.name}-{self.seq}"

    def slot(self) -> str:
        return f"X/f{self.random.randrange(SLOTS)}"

    def run(self, stop: float) -> None:
        step = getattr(self, f"step_{self.role}")
        while time.monotonic() < stop:
            operation = step()
            try:
                operation()
            except self.ALLOWED.get(self.role, ()) as error:
                self.allowed[type(error).__name__] += 1
            except Exception as error:  # noqa: BLE001 -- every other error fails the test
                self.errors.append(
                    f"{self.name}: {type(error).__module__}.{type(error).__name__}: "
                    f"{str(error)[:300]}\n{traceback.format_exc(limit=6)}"
                )

    def counted(self, op: str, call: Any) -> Any:
        def run() -> None:
            call()
            self.ops[op] += 1

        return run

    def step_saver(self) -> Any:
        b, r = self.backend, self.random.random()
        if r < 0.5:
            return self.counted("save", lambda: b.save(content(self.tag()), self.slot()))
        if r < 0.75:
            d = f"X/b{self.random.randrange(4)}"
            tags = [self.tag() for _ in range(4)]
            paths = [f"{d}/{i}.bin" for i in range(4)]
            return self.counted("save_batch", lambda: b.save_batch(list(map(content, tags)), paths))
        path = f"keep/{self.name}/{self.random.randrange(6)}.bin"
        tag = self.tag()

        def keep() -> None:
            b.save(content(tag), path)
            self.kept[path] = tag  # committed: the last one must be there at the end
            # and now: a later save of the same content could re-upload an object
            # that gc took meanwhile, hiding the loss from the checks at the end.
            assert tag_of(b.load(path)) == tag, f"{path}: lost right after its save"

        return self.counted("save keep", keep)

    def _relocate(self, op: str, share_of_files: float, to: str) -> Any:
        """A move or copy of a slot file or a batch directory to a new path under ``to``."""
        if self.random.random() < share_of_files:
            src = self.slot()
        else:
            src = f"X/b{self.random.randrange(4)}"
        dst = f"{to}/{self.name}-{self.seq}"
        self.seq += 1

        def relocate() -> None:
            getattr(self.backend, op)(src, dst)
            self.made.append(dst)

        return self.counted(op, relocate)

    def step_mover(self) -> Any:
        return self._relocate("move", 0.7, "Y")

    def step_copier(self) -> Any:
        return self._relocate("copy", 0.6, "Z")

    def step_deleter(self) -> Any:
        time.sleep(self.random.uniform(0, 0.02))  # let the savers fill X again
        r = self.random.random()
        if r < 0.6:
            return self.counted("delete -r", lambda: self.backend.delete("X", recursive=True))
        if r < 0.8:  # a batch directory, only if it is empty (it seldom is)
            d = f"X/b{self.random.randrange(4)}"
            return self.counted("delete dir", lambda: self.backend.delete(d))
        return self.counted("delete", lambda: self.backend.delete(self.slot()))

    def step_gc(self) -> Any:
        time.sleep(self.random.uniform(0, 0.05))
        # Unreferenced blobs go at once, whatever the grace; the grace spares
        # the uploads of saves in progress (gc(grace=0) would take them, and
        # those saves would fail with ConflictError, as documented).
        return self.counted("gc", lambda: self.backend.gc(grace=60))

    def step_rebalancer(self) -> Any:
        time.sleep(self.random.uniform(0, 0.05))
        limit = self.random.choice([0, 64, 1 << 20])
        return self.counted("rebalance", lambda: self.backend.rebalance(limit))

    def report(self) -> dict[str, Any]:
        return {
            "ops": dict(self.ops),
            "allowed": dict(self.allowed),
            "errors": self.errors,
            "kept": self.kept,
            "made": self.made,
        }


def _open(config: dict[str, Any]) -> SQLBackend:
    return SQLBackend(
        config["url"], blob_store=config["blob_store"], inline_limit=config["inline_limit"]
    )


def _process(config: dict[str, Any], role: str, number: int, ready: Any, go: Any, out: Any) -> None:
    try:
        backend = _open(config)
    except BaseException:  # noqa: BLE001 -- reported to the parent, which fails
        ready.put(number)
        out.put({"errors": [traceback.format_exc()], "ops": {}, "allowed": {}, "kept": {}})
        return
    ready.put(number)
    go.wait()
    worker = Worker(backend, role, number, config["pool_only"])
    try:
        worker.run(time.monotonic() + config["seconds"])
    finally:
        backend.close()
        out.put(json.loads(json.dumps(worker.report())))


def _run(config: dict[str, Any], roles: list[str]) -> list[dict[str, Any]]:
    """Run one process per role for ``config["seconds"]``; their reports."""
    return run_together(_process, config, roles, seconds=config["seconds"])


# -- checks -----------------------------------------------------------------------------------


def check_whole(backend: SQLBackend, reports: list[dict[str, Any]]) -> int:
    """Everything the module docstring promises of the catalog; the number of files."""
    report = backend.fsck(verify=True)
    assert report.ok, str(report)
    stored, referenced = refcounts(backend)
    assert stored == referenced, "reference counts differ from the files that use them"
    files = backend.list_files("", recursive=True)
    for value in backend.load_batch(files):
        tag_of(value)
    for path in files[:200]:  # the single-load path too
        tag_of(backend.load(path))
    for rep in reports:
        for path, tag in rep["kept"].items():
            assert tag_of(backend.load(path)) == tag, f"{path}: lost its last save"
        for made in rep.get("made", []):
            assert backend.exists(made), f"{made}: a move or copy that returned is lost"
    return len(files)


def _figures(case: str, config: dict[str, Any], roles: list[str], reports: list[Any]) -> Any:
    ops: Counter[str] = Counter()
    allowed: Counter[str] = Counter()
    for rep in reports:
        ops.update(rep["ops"])
        allowed.update(rep["allowed"])
    figures = {
        "case": case,
        "database": config["url"].split(":", 1)[0].split("+")[0],
        "processes": len(roles),
        "seconds": config["seconds"],
        "operations": dict(ops),
        "allowed_errors": dict(allowed),
        "errors": sum(len(rep["errors"]) for rep in reports),
    }
    log = os.environ.get("POLYSTORE_RELIABILITY_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(figures) + "\n")
    return figures


def _contend(
    case: str, url: str, tmp_path: Path, roles: list[str], *, seconds: float, **options: Any
) -> None:
    config = {
        "url": url,
        "blob_store": f"file://{tmp_path}/blobs",
        "inline_limit": 0,
        "pool_only": False,
        "seconds": seconds,
    } | options
    with _open(config) as setup:  # migrated before the workers race to open it
        setup.ensure_directory("X")
    reports = _run(config, roles)
    errors = [e for rep in reports for e in rep["errors"]]
    assert not errors, f"{len(errors)} errors:\n" + "\n".join(errors[:8])
    with _open(config) as backend:
        before = check_whole(backend, reports)
        backend.gc(grace=0)
        assert check_whole(backend, reports) == before
    figures = _figures(case, config, roles, reports)
    ops = figures["operations"]
    # Each role got work done (the races were run, not dodged).
    for op in ("save", "move", "delete -r", "gc"):
        if any(op.split()[0] in role for role in roles):
            assert ops.get(op, 0) > 0, figures


# -- the cases ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_moves_and_recursive_deletes_keep_counts_exact(catalog_url: str, tmp_path: Path) -> None:
    """Issue 14's first report: savers, a mover, a recursive deleter and gc on one tree."""
    roles = ["saver", "saver", "mover", "deleter", "gc"]
    _contend("tree", catalog_url, tmp_path, roles, seconds=SECONDS)


@pytest.mark.slow
def test_shared_content_under_moves_copies_deletes_and_gc(catalog_url: str, tmp_path: Path) -> None:
    """The same few contents everywhere: every save races another for one blob row."""
    roles = ["saver", "saver", "mover", "copier", "deleter", "gc", "rebalancer"]
    _contend(
        "dedup", catalog_url, tmp_path, roles, seconds=SECONDS, pool_only=True, inline_limit=64
    )


def _same_instant(config: dict[str, Any], number: int, barrier: Any, out: Any) -> None:
    errors: list[str] = []
    saved: list[str] = []
    try:
        with _open(config) as backend:
            for round_ in range(config["rounds"]):
                data = content(f"round{round_}")
                path = f"same/{number}/{round_}.bin"
                barrier.wait(timeout=60)
                try:
                    if round_ % 2:
                        backend.save_batch([data, content(f"round{round_}b")], [path, path + "b"])
                    else:
                        backend.save(data, path)
                    saved.append(path)
                except Exception as error:  # noqa: BLE001 -- reported, the parent fails
                    errors.append(f"{type(error).__module__}.{type(error).__name__}: {error}")
    except BaseException:  # noqa: BLE001
        errors.append(traceback.format_exc())
    out.put({"errors": errors, "saved": saved})


@pytest.mark.parametrize("inline_limit", [0, 1 << 20], ids=["external", "inline"])
def test_identical_content_saved_at_the_same_instant(
    catalog_url: str, tmp_path: Path, inline_limit: int
) -> None:
    """Issue 14's second report: four processes save the same new bytes at one moment."""
    processes, rounds = 4, 40
    config = {
        "url": catalog_url,
        "blob_store": f"file://{tmp_path}/blobs",
        "inline_limit": inline_limit,
        "rounds": rounds,
    }
    _open(config).close()
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["numpy", "sqlalchemy", "polystore.backends.sql", __name__])
    barrier, out = ctx.Barrier(processes), ctx.Queue()
    procs = [
        ctx.Process(target=_same_instant, args=(config, k, barrier, out)) for k in range(processes)
    ]
    for proc in procs:
        proc.start()
    try:
        reports = [out.get(timeout=300) for _ in procs]
    finally:
        join(procs)
    errors = [e for rep in reports for e in rep["errors"]]
    assert not errors, f"{len(errors)} of {processes * rounds} saves failed:\n" + "\n".join(
        errors[:5]
    )
    with _open(config) as backend:
        files = backend.list_files("same", recursive=True)
        assert len(files) == processes * (rounds + rounds // 2)
        check_whole(backend, [{"kept": {}, "made": []}])
        blobs, _ = refcounts(backend)
        assert len(blobs) == rounds + rounds // 2  # one blob per distinct content


@pytest.mark.skipif(not SOAK_SECONDS, reason="the soak runs when POLYSTORE_SOAK_SECONDS is set")
def test_soak(catalog_url: str, tmp_path: Path) -> None:
    """Eight processes, every operation, shared and unique content, for as long as asked."""
    roles = ["saver", "saver", "saver", "mover", "copier", "deleter", "gc", "rebalancer"]
    _contend("soak", catalog_url, tmp_path, roles, seconds=SOAK_SECONDS, inline_limit=64)


def test_moved_file_keeps_its_content_through_gc(catalog_url: str, tmp_path: Path) -> None:
    """A small, deterministic sibling of the cases above, for a quick bisect."""
    with SQLBackend(catalog_url, blob_store=f"file://{tmp_path}/b", inline_limit=0) as b:
        b.save(content("a"), "X/a.bin")
        b.move("X/a.bin", "Y/a.bin")
        b.delete("X", recursive=True)
        b.gc(grace=0)
        assert tag_of(b.load("Y/a.bin")) == "a"
        with pytest.raises(AlreadyExistsError):
            b.copy("Y/a.bin", "Y/a.bin")


def test_rebalance_skips_a_blob_collected_while_it_runs(catalog_url: str, tmp_path: Path) -> None:
    """rebalance() lists the blobs to move first: one collected since is skipped, not damage.

    The soak found it: a file deleted and its blob collected by another
    process between rebalance's list and its read of the object.
    """
    from polystore.blobs.local import LocalBlobStore

    class CollectedOnFirstRead(LocalBlobStore):
        """Another process deletes ``a.bin`` and collects its blob as rebalance first reads."""

        other: SQLBackend | None = None

        def open(self, content_hash: str) -> Any:
            if self.other is not None:
                other, self.other = self.other, None
                other.delete("a.bin")
                other.gc()
            return super().open(content_hash)

    store = CollectedOnFirstRead(tmp_path / "blobs")
    with SQLBackend(catalog_url, blob_store=store, inline_limit=0) as backend:
        backend.save_batch([content("a"), content("b")], ["a.bin", "b.bin"])
        with SQLBackend(catalog_url, blob_store=f"file://{tmp_path}/blobs") as other:
            store.other = other
            report = backend.rebalance(inline_limit=1 << 20)
        assert report.to_inline == 1  # b moved in; a was gone
        assert tag_of(backend.load("b.bin")) == "b"
        assert not backend.exists("a.bin")
        assert backend.fsck(verify=True).ok


class _BeforeEachRead(LocalBlobStore):
    """A local blob store that runs :meth:`before_read` as each object is opened or
    read by range: what another process does at that moment."""

    def before_read(self) -> None:
        """What happens just before each read (nothing, here)."""

    def open(self, content_hash: str) -> Any:
        self.before_read()
        return super().open(content_hash)

    def read_range(self, content_hash: str, start: int, end: int) -> bytes:
        self.before_read()
        return super().read_range(content_hash, start, end)


def test_a_load_racing_rebalance_reads_the_content_where_it_went(
    catalog_url: str, tmp_path: Path
) -> None:
    """A row read just before rebalance() brings its content into the catalog names an
    object that is gone by the time it is opened: the file is read again, not reported
    as damage (the contention test met it once: ``IntegrityError ... is missing``)."""
    from polystore.errors import IntegrityError

    class MovedInOnFirstOpen(_BeforeEachRead):
        """Another process rebalances everything inline as a load first opens an object."""

        other: SQLBackend | None = None

        def before_read(self) -> None:
            if self.other is not None:
                other, self.other = self.other, None
                assert other.rebalance(inline_limit=1 << 20).to_inline >= 2

    store = MovedInOnFirstOpen(tmp_path / "blobs")
    with SQLBackend(catalog_url, blob_store=store, inline_limit=0) as backend:
        backend.save_batch([content("a"), content("b")], ["a.bin", "b.bin"])
        with SQLBackend(catalog_url, blob_store=f"file://{tmp_path}/blobs") as other:
            store.other = other
            assert tag_of(backend.load("a.bin")) == "a"
        backend.save_batch([content("c"), content("d")], ["c.bin", "d.bin"])  # external
        backend.rebalance(inline_limit=0)
        with SQLBackend(catalog_url, blob_store=f"file://{tmp_path}/blobs") as other:
            store.other = other
            assert [tag_of(v) for v in backend.load_batch(["c.bin", "d.bin"])] == ["c", "d"]
        backend.rebalance(inline_limit=0)
        with SQLBackend(catalog_url, blob_store=f"file://{tmp_path}/blobs") as other:
            store.other = other
            assert backend.read_range("c.bin", 0, 4) == content("c")[:4]
        # A streamed read (``iter_content``, ``polystore get``) follows the content
        # too: into the catalog as the object is opened ...
        backend.rebalance(inline_limit=0)
        with SQLBackend(catalog_url, blob_store=f"file://{tmp_path}/blobs") as other:
            store.other = other
            assert b"".join(backend.iter_content("c.bin", chunk_size=16)) == content("c")
        # ... and out of it after its first pieces: the rest by ranged reads.
        streamed = backend.iter_content("c.bin", chunk_size=16)
        first = next(streamed)
        with SQLBackend(catalog_url, blob_store=f"file://{tmp_path}/blobs") as other:
            assert other.rebalance(inline_limit=0).to_external >= 1
        assert first + b"".join(streamed) == content("c")
        assert backend.fsck(verify=True).ok
        # An object the catalog still names, missing: damage, after one more read.
        backend.rebalance(inline_limit=0)
        store.delete([content_hash(backend, content("a"))])
        with pytest.raises(IntegrityError, match="is missing"):
            backend.load("a.bin")
        with pytest.raises(IntegrityError, match="is missing"):
            b"".join(backend.iter_content("a.bin"))


def test_a_read_follows_a_file_changed_and_collected_twice(
    catalog_url: str, tmp_path: Path
) -> None:
    """Each time a read opens the object its row named, another process has just
    overwritten the file and gc() taken that object -- twice in a row. Each missing
    object is another one: the file is read again until its content is there, not
    reported as damage (only the same object missing twice is)."""

    class ChangedOnOpen(_BeforeEachRead):
        """Before each of the next ``changes`` opens, another process overwrites
        the file and collects what it replaced."""

        other: SQLBackend | None = None
        changes: list[tuple[str, bytes]] = []

        def before_read(self) -> None:
            if self.other is not None and self.changes:
                path, value = self.changes.pop(0)
                self.other.save(value, path)
                assert self.other.gc(grace=0).blobs_deleted == 1

    store = ChangedOnOpen(tmp_path / "blobs")
    with (
        SQLBackend(catalog_url, blob_store=store, inline_limit=0) as backend,
        SQLBackend(catalog_url, blob_store=f"file://{tmp_path}/blobs", inline_limit=0) as other,
    ):
        store.other = other
        backend.save_batch([content("x0"), content("y0")], ["x.bin", "y.bin"])
        reads = {
            "load": lambda: backend.load("x.bin"),
            "load_batch": lambda: backend.load_batch(["x.bin", "y.bin"])[0],
            "read_range": lambda: backend.read_range("x.bin", 0, 4),
        }
        for n, (how, read) in enumerate(reads.items()):
            store.changes = [("x.bin", content(f"x{n}{k}")) for k in (1, 2)]
            got = read()
            assert not store.changes, how  # both changes happened under the read
            assert got == content(f"x{n}2")[: len(got)], how
        assert backend.fsck(verify=True).ok


def test_a_streamed_read_follows_content_out_through_one_reader(
    catalog_url: str, tmp_path: Path
) -> None:
    """Content moved out of the catalog mid-stream, into a store without ranged reads
    of its own: the rest comes through one reader, not one opened per piece."""
    from polystore.blobs.base import BlobStore
    from polystore.blobs.local import LocalBlobStore

    class NoRanges(LocalBlobStore):
        read_range = BlobStore.read_range  # reads from the start, each time
        opened = 0

        def open(self, content_hash: str) -> Any:
            self.opened += 1
            return super().open(content_hash)

    store = NoRanges(tmp_path / "blobs")
    with SQLBackend(catalog_url, blob_store=store, inline_limit=1 << 20) as backend:
        backend.save(content("e"), "e.bin")  # 66 bytes, inline
        streamed = backend.iter_content("e.bin", chunk_size=16)
        first = next(streamed)  # (the first two pieces are read)
        with SQLBackend(catalog_url, blob_store=f"file://{tmp_path}/blobs") as other:
            assert other.rebalance(inline_limit=0).to_external == 1
        assert first + b"".join(streamed) == content("e")
        assert store.opened == 1
