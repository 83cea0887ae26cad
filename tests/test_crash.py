"""Crash tests: a writer killed with SIGKILL at random moments, again and again.

A writer process runs random operations on one catalog -- ``save_batch`` of
numbered batches (new files in a batch directory plus overwrites of shared
files), directory and file ``move``, ``copy``, recursive and single-file
``delete`` -- and is killed with SIGKILL after a random delay. Then the test
checks the catalog against what the writer committed, and starts the next
writer on the surviving state. On SQLite and PostgreSQL, with content inline
and with content in an external blob store (``inline_limit=64``: most files
external, some inline).

What "committed" means: the writer appends ``begin <op>`` to a log before each
operation and ``end`` once it has returned; a SIGKILL loses nothing the
process already wrote to the kernel. Operations logged ``end`` are committed.
The one operation logged ``begin`` without ``end`` may have been killed before,
during or after its commit (after the database committed but before ``end`` was
written): it must be *entirely* present or *entirely* absent. So after every
kill the catalog must equal exactly one of two states -- without or with that
operation -- file for file and byte for byte. A half-applied batch, a lost
committed write or a file nobody wrote matches neither.

After each kill, also: every reference count equals the number of files
pointing at its blob, ``fsck()`` is clean, ``gc(grace=0)`` collects what the
dead writer left (abandoned uploads, unreferenced blobs), and ``fsck()`` is
then clean with nothing pending and no garbage.

On PostgreSQL a COMMIT the killed client had already sent may still be
running in its server process; the check waits until the server has ended that
session (found by its ``application_name``), so the outcome is decided before
it is looked at.

Writers are forked from one long-lived helper process that has already
imported polystore, so a round costs milliseconds, not an interpreter start.
Budget: ``POLYSTORE_CRASH_KILLS`` kills per database and placement (default
10); ``POLYSTORE_LONG=1`` makes it 100.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import sqlalchemy as sa
from catalog_checks import refcounts

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


LONG = os.environ.get("POLYSTORE_LONG", "").lower() in ("1", "true", "yes")
KILLS = _env_int("POLYSTORE_CRASH_KILLS", 100 if LONG else 10)
#: The longest a writer runs before it is killed (seconds after it is ready).
MAX_RUN = 0.4
#: External placement: content over this many bytes goes to the blob store.
EXTERNAL_LIMIT = 64
#: More live batch copies than this and the writer deletes some: bounded state.
MAX_INSTANCES = 10
SHARED = 3

# -- the world the writer builds, and its model ------------------------------------


def content(k: int, i: int) -> bytes:
    """The bytes of file ``i`` of batch ``k``: they name their batch, sizes straddle 64."""
    if i == 0:
        # The same few contents in every batch: deduplicated, refcounts > 1.
        return (b"common %d " % (k % 3)) * 12
    size = (k * 7919 + i * 104729) % 300
    seed = hashlib.sha256(f"{k}/{i}".encode()).digest()
    return (f"{k}:{i}:".encode() + seed * (size // 32 + 1))[: max(size, 6)]


def shared_content(k: int, j: int) -> bytes:
    """What batch ``k`` writes over ``shared/s{j}.bin``."""
    return f"shared {k} {j} ".encode() * (1 + j * 4)


def batch_size(k: int) -> int:
    return 2 + k % 9


class World:
    """Batch instances (a batch's files in one directory) and the shared files.

    An instance is ``{"k": batch id, "dir": path, "names": {i: file name}}``;
    copies of a batch are instances of their own. JSON in, JSON out, so the
    writer and the checker share it.
    """

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        data = data or {"instances": {}, "shared": None, "next_k": 0, "next_uid": 0}
        self.instances: dict[str, dict[str, Any]] = {
            uid: {"k": inst["k"], "dir": inst["dir"], "names": dict(inst["names"])}
            for uid, inst in data["instances"].items()
        }
        self.shared: int | None = data["shared"]
        self.next_k: int = data["next_k"]
        self.next_uid: int = data["next_uid"]

    def to_json(self) -> dict[str, Any]:
        return {
            "instances": self.instances,
            "shared": self.shared,
            "next_k": self.next_k,
            "next_uid": self.next_uid,
        }

    def copy(self) -> World:
        return World(json.loads(json.dumps(self.to_json())))

    def files(self) -> dict[str, bytes]:
        """Every file the world holds, with its content."""
        out: dict[str, bytes] = {}
        for inst in self.instances.values():
            for i, name in inst["names"].items():
                out[f"{inst['dir']}/{name}"] = content(inst["k"], int(i))
        if self.shared is not None:
            for j in range(SHARED):
                out[f"shared/s{j}.bin"] = shared_content(self.shared, j)
        return out

    def choose(self, rng: random.Random) -> dict[str, Any]:
        """A random operation that is valid in this world."""
        uids = sorted(self.instances)
        roll = rng.random()
        if len(uids) > MAX_INSTANCES or (uids and roll < 0.15):
            return {"op": "delete_dir", "uid": rng.choice(uids)}
        if not uids or roll < 0.5:
            return {"op": "save_batch", "k": self.next_k, "uid": f"u{self.next_uid}"}
        uid = rng.choice(uids)
        inst = self.instances[uid]
        new = f"u{self.next_uid}"
        if roll < 0.65:
            return {"op": "move_dir", "uid": uid, "dst": f"moved/x{self.next_uid % 3}/{new}"}
        if roll < 0.75:
            return {"op": "copy_dir", "uid": uid, "new": new, "dst": f"copies/{new}"}
        if not inst["names"]:
            return {"op": "delete_dir", "uid": uid}
        i = rng.choice(sorted(inst["names"]))
        if roll < 0.9:
            return {"op": "rename", "uid": uid, "i": i, "name": f"r{self.next_uid}.bin"}
        return {"op": "delete_file", "uid": uid, "i": i}

    def apply(self, op: dict[str, Any]) -> None:
        """The model: what ``op`` does to the world."""
        kind = op["op"]
        self.next_uid += 1
        if kind == "save_batch":
            k = op["k"]
            self.instances[op["uid"]] = {
                "k": k,
                "dir": f"live/b{k}",
                "names": {str(i): f"f{i}.bin" for i in range(batch_size(k))},
            }
            self.shared = k
            self.next_k = k + 1
            return
        inst = self.instances[op["uid"]]
        if kind == "delete_dir":
            del self.instances[op["uid"]]
        elif kind == "move_dir":
            inst["dir"] = op["dst"]
        elif kind == "copy_dir":
            self.instances[op["new"]] = {**inst, "dir": op["dst"], "names": dict(inst["names"])}
        elif kind == "rename":
            inst["names"][op["i"]] = op["name"]
        elif kind == "delete_file":
            del inst["names"][op["i"]]
        else:  # pragma: no cover
            raise AssertionError(kind)

    def perform(self, backend: Any, op: dict[str, Any]) -> None:
        """Do ``op`` on the backend (the world is still the one before it)."""
        kind = op["op"]
        if kind == "save_batch":
            k = op["k"]
            paths = [f"live/b{k}/f{i}.bin" for i in range(batch_size(k))]
            values = [content(k, i) for i in range(batch_size(k))]
            paths += [f"shared/s{j}.bin" for j in range(SHARED)]
            values += [shared_content(k, j) for j in range(SHARED)]
            backend.save_batch(values, paths)
            return
        inst = self.instances[op["uid"]]
        if kind == "delete_dir":
            backend.delete(inst["dir"], recursive=True)
        elif kind == "move_dir":
            backend.move(inst["dir"], op["dst"])
        elif kind == "copy_dir":
            backend.copy(inst["dir"], op["dst"])
        elif kind == "rename":
            old = inst["names"][op["i"]]
            backend.move(f"{inst['dir']}/{old}", f"{inst['dir']}/{op['name']}")
        elif kind == "delete_file":
            backend.delete(f"{inst['dir']}/{inst['names'][op['i']]}")


# -- the writer, forked from a helper process ------------------------------------------


def _open_backend(config: dict[str, Any]) -> Any:
    from polystore.backends.sql import SQLBackend

    return SQLBackend(
        config["url"], blob_store=config["blob_store"], inline_limit=config["inline_limit"]
    )


def _writer(config: dict[str, Any]) -> None:
    """Runs in a forked child until it is killed."""
    log = os.open(config["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        backend = _open_backend(config)
        world = World(config["world"])
        rng = random.Random(config["seed"])
        os.write(log, b"ready\n")
        while True:
            op = world.choose(rng)
            os.write(log, f"begin {json.dumps(op)}\n".encode())
            world.perform(backend, op)
            world.apply(op)
            os.write(log, b"end\n")
    except BaseException:
        os.write(log, ("error " + json.dumps(traceback.format_exc()) + "\n").encode())
        raise


def _helper_main() -> None:
    """The fork server: imports everything once, forks a writer per request."""
    import numpy  # noqa: F401 -- imported before forking, so writers start fast

    import polystore.backends.sql
    import polystore.blobs  # noqa: F401

    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "spawn":
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    _writer(request["config"])
                finally:
                    os._exit(code)
            reply: dict[str, Any] = {"pid": pid}
        else:
            _, status = os.waitpid(request["pid"], 0)
            reply = {"status": status}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


class Helper:
    """The parent's end of the fork server."""

    def __init__(self, stderr: IO[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "helper"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        reply: dict[str, Any] = json.loads(line)
        return reply

    def spawn(self, config: dict[str, Any]) -> int:
        return int(self._ask({"cmd": "spawn", "config": config})["pid"])

    def reap(self, pid: int) -> int:
        return int(self._ask({"cmd": "reap", "pid": pid})["status"])

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def helper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Helper]:
    log = tmp_path_factory.mktemp("crash") / "helper.stderr"
    with open(log, "w", encoding="utf-8") as stderr:
        h = Helper(stderr)
        try:
            yield h
        finally:
            h.close()


# -- checking -----------------------------------------------------------------------------


def _read_log(path: Path) -> tuple[bool, list[dict[str, Any]], dict[str, Any] | None]:
    """(ready, committed operations, the operation in flight or None)."""
    ready, done, pending = False, [], None
    if not path.exists():
        return ready, done, pending
    for line in path.read_text(encoding="utf-8").splitlines():
        word, _, rest = line.partition(" ")
        if word == "ready":
            ready = True
        elif word == "begin":
            pending = json.loads(rest)
        elif word == "end":
            assert pending is not None
            done.append(pending)
            pending = None
        elif word == "error":
            pytest.fail(f"the writer failed:\n{json.loads(rest)}")
    return ready, done, pending


def _wait_for_server_to_drop(backend: Any, app_name: str) -> None:
    """PostgreSQL: wait until the killed writer's sessions have ended on the server."""
    if backend.engine.dialect.name != "postgresql":
        return
    deadline = time.monotonic() + 60
    query = sa.text("SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = :name")
    while True:
        with backend.engine.connect() as conn:
            if conn.execute(query, {"name": app_name}).scalar_one() == 0:
                return
        assert time.monotonic() < deadline, f"server sessions of {app_name} never ended"
        time.sleep(0.01)


def _matching_world(backend: Any, candidates: list[World]) -> World:
    """The one candidate the catalog equals, file for file and byte for byte."""
    found = backend.list_files("", recursive=True)
    loaded = dict(zip(found, backend.load_batch(found), strict=True))
    for world in candidates:
        if loaded == world.files():
            return world
    # Say what differs from the state before the operation in flight.
    base = candidates[0].files()
    missing = sorted(set(base) - set(loaded))
    extra = sorted(set(loaded) - set(base))
    wrong = sorted(p for p in set(base) & set(loaded) if base[p] != loaded[p])
    pytest.fail(
        f"the catalog matches no committed state: missing {missing[:10]}, "
        f"unexpected {extra[:10]}, wrong content {wrong[:10]}"
    )


def _check_store(backend: Any, figures: dict[str, int]) -> None:
    stored, referenced = refcounts(backend)
    assert stored == referenced, "reference counts differ from the file rows"
    before = backend.fsck()
    assert before.ok, str(before)
    figures["uploads_abandoned"] += before.pending_uploads
    report = backend.gc(grace=0)
    figures["blobs_collected"] += report.blobs_deleted
    after = backend.fsck(verify=True)
    assert after.ok, str(after)
    # One gc() collects everything, blobs only a dead writer's intent held included.
    assert (after.pending_uploads, after.garbage) == (0, 0), str(after)


def _record(figures: dict[str, int]) -> None:
    log = os.environ.get("POLYSTORE_RELIABILITY_LOG")
    if log:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"test": test, **figures}) + "\n")


def test_one_gc_collects_a_dead_writers_garbage(sqlite_url: str, tmp_path: Path) -> None:
    """A writer killed after registering an upload of content whose blob is garbage."""
    from polystore.backends.sql import SQLBackend

    with SQLBackend(sqlite_url, blob_store=f"file://{tmp_path}/blobs", inline_limit=4) as b:
        b.save(b"x" * 100, "a.bin")
        garbage = b.stat("a.bin").hash
        b.save(b"y" * 100, "a.bin")  # the x blob is unreferenced now
        with b.engine.begin() as conn:  # what the dead writer's registration left
            conn.execute(
                sa.text(
                    "INSERT INTO polystore_upload_intents (hash, store, size, created_at, owner) "
                    "VALUES (:h, 'local', 100, CURRENT_TIMESTAMP, 'dead-host:1')"
                ),
                {"h": garbage},
            )
        b.gc(grace=0)
        report = b.fsck()
        assert report.ok and report.pending_uploads == 0
        assert report.garbage == 0, str(report)


def test_durability_settings(catalog_url: str) -> None:
    """The settings the crash guarantees rest on, as the database reports them.

    SQLite: WAL journal with ``synchronous=NORMAL`` (a commit survives the
    process; a power cut may lose the last commits, never corrupt the file),
    foreign keys on. PostgreSQL: the server's defaults, untouched: a commit
    returns once it is durable (``synchronous_commit=on``, ``fsync=on``),
    statements in READ COMMITTED.
    """
    from polystore.backends.sql import SQLBackend

    with SQLBackend(catalog_url) as backend, backend.engine.connect() as conn:
        if backend.engine.dialect.name == "sqlite":
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        else:
            settings = {
                name: conn.exec_driver_sql(f"SHOW {name}").scalar()
                for name in ("synchronous_commit", "fsync", "transaction_isolation")
            }
            assert settings == {
                "synchronous_commit": "on",
                "fsync": "on",
                "transaction_isolation": "read committed",
            }


def test_a_catalog_file_keeps_the_page_size_it_was_made_with(tmp_path: Path) -> None:
    """A new file has SQLite's 4 KiB pages; one made with 16 KiB pages (the
    tuning ``docs/performance.rst`` describes) keeps them, and works.

    Either way a commit checkpoints the WAL past 64 MiB, counted in the file's
    pages (the catalog's checkpoint thread does it past 16 MiB; see
    ``tests/test_checkpoints.py``).
    """
    import sqlite3

    import numpy as np

    from polystore.backends.sql import SQLBackend

    made = tmp_path / "made.db"
    db = sqlite3.connect(made)
    db.execute("PRAGMA page_size=16384")
    db.execute("VACUUM")  # an empty file, now with 16 KiB pages
    db.close()
    value = np.arange(1024, dtype=np.float32)  # a 4 KiB row: one page at 16 KiB, two at 4 KiB
    for path, page in ((tmp_path / "new.db", 4096), (made, 16384)):
        with SQLBackend(f"sqlite:///{path}") as backend:
            backend.save_batch([value + i for i in range(50)], [f"d/{i}.npy" for i in range(50)])
            with backend.engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA page_size").scalar() == page
                assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == (
                    (64 << 20) // page
                )
        with SQLBackend(f"sqlite:///{path}") as backend:  # opened again
            assert np.array_equal(backend.load("d/49.npy"), value + 49)
            assert backend.fsck().ok


def test_a_large_transaction_leaves_no_large_wal_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    from polystore.backends.sql import SQLBackend, engine

    limit = 1 << 20
    monkeypatch.setattr(engine, "WAL_SIZE_LIMIT", limit)
    wal = tmp_path / "catalog.db-wal"
    with SQLBackend(f"sqlite:///{tmp_path / 'catalog.db'}") as backend:
        arrays = [np.full(1 << 17, i, dtype=np.float64) for i in range(24)]  # 24 MiB inline
        backend.save_batch(arrays, [f"big/{i}.npy" for i in range(24)])
        grown = wal.stat().st_size
        # The catalog's checkpoint thread copies the WAL into the file behind
        # the commit; the first writer after it starts the WAL over.
        deadline = time.monotonic() + 60
        for n in range(10**6):
            backend.save(np.zeros(1), f"small/{n}.npy")
            if wal.stat().st_size <= limit or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert grown > 16 * limit and wal.stat().st_size <= limit
        assert float(backend.load("big/23.npy")[0]) == 23.0


@pytest.mark.parametrize("placement", ["inline", "external"])
def test_sigkill_writer_repeatedly(
    helper: Helper, catalog_url: str, placement: str, tmp_path: Path
) -> None:
    from polystore.backends.sql import SQLBackend

    config: dict[str, Any] = {"url": catalog_url, "blob_store": None, "inline_limit": 1 << 20}
    if placement == "external":
        config |= {"blob_store": f"file://{tmp_path}/blobs", "inline_limit": EXTERNAL_LIMIT}
    checker = SQLBackend(
        catalog_url, blob_store=config["blob_store"], inline_limit=config["inline_limit"]
    )
    pg = checker.engine.dialect.name == "postgresql"
    rng = random.Random(f"{placement}-{checker.engine.dialect.name}")
    world = World()
    figures = dict.fromkeys(
        [
            "kills",
            "killed_mid_operation",
            "in_flight_applied",
            "operations_committed",
            "files_checked",
            "uploads_abandoned",
            "blobs_collected",
        ],
        0,
    )
    try:
        for round_no in range(KILLS):
            app_name = f"polystore-crash-{os.getpid()}-{round_no}"
            url = catalog_url
            if pg:
                url += ("&" if "?" in url else "?") + f"application_name={app_name}"
            log = tmp_path / f"writer-{round_no}.log"
            pid = helper.spawn(
                {
                    **config,
                    "url": url,
                    "log": str(log),
                    "world": world.to_json(),
                    "seed": rng.randrange(1 << 30),
                }
            )
            deadline = time.monotonic() + 60
            while not _read_log(log)[0]:
                assert time.monotonic() < deadline, "the writer never got ready"
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, MAX_RUN))
            os.kill(pid, signal.SIGKILL)
            status = helper.reap(pid)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            _wait_for_server_to_drop(checker, app_name)

            _, done, pending = _read_log(log)
            for op in done:
                world.apply(op)
            candidates = [world]
            if pending is not None:
                after = world.copy()
                after.apply(pending)
                candidates.append(after)
            world = _matching_world(checker, candidates)
            if pending is not None and world is candidates[1]:
                figures["in_flight_applied"] += 1
            else:
                # Not applied: the next writer takes the world as it was, and must
                # not reuse the batch number or directory the dead one may have used.
                world.next_k += 1
                world.next_uid += 1
            _check_store(checker, figures)
            figures["kills"] += 1
            figures["killed_mid_operation"] += pending is not None
            figures["operations_committed"] += len(done)
            figures["files_checked"] += len(world.files())
    finally:
        checker.close()
    _record(figures)
    assert figures["kills"] == KILLS


if __name__ == "__main__" and sys.argv[1:] == ["helper"]:
    _helper_main()
