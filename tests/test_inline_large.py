"""Inline content over ``inline.WHOLE`` bytes: read in pieces, never with its row.

Every load path (single, batch, inside a transaction, at a snapshot) must give
the same value as for small content; a file overwritten between the read of
its row and the read of its pieces is read again; damage is still caught; and
on PostgreSQL, revision 0008 stores inline content uncompressed while values
compressed before it still load. Separate processes overwrite, read and
collect garbage at once (``POLYSTORE_LONG=1``: 30 seconds instead of 3).
"""

from __future__ import annotations

import os
import struct
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from catalog_checks import assert_refcounts_consistent, made_before_0010
from processes import run_together

from polystore import SQLBackend, migrate
from polystore.backends.sql import gc, inline, verify
from polystore.errors import IntegrityError, NotFoundError

LARGE = inline.WHOLE + 12_345  # two pieces, the second short
SECONDS = 30.0 if os.environ.get("POLYSTORE_LONG", "").lower() in ("1", "true", "yes") else 3.0


def array(seed: int, size: int = LARGE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


@pytest.fixture
def backend(catalog_url: str, open_backend: Callable[..., SQLBackend]) -> SQLBackend:
    return open_backend(catalog_url, inline_limit=4 * inline.WHOLE)


def inline_blob(backend: SQLBackend, path: str, expression: str) -> Any:
    """``expression`` over the inline blob ``b`` of file ``path`` (fails if it is not inline)."""
    with backend.engine.connect() as conn:
        return conn.execute(
            sa.text(
                f"SELECT {expression} FROM polystore_catalog AS c "
                "JOIN polystore_blobs AS b ON b.hash = c.hash "
                "WHERE c.path = :p AND b.store = 'inline'"
            ),
            {"p": path},
        ).scalar_one()


@pytest.fixture
def pieces(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of every piece an InlineReader hands over, as loads run."""
    seen: list[int] = []
    readinto = inline.InlineReader.readinto

    def counting(self: inline.InlineReader, buffer: Any) -> int:
        n = readinto(self, buffer)
        seen.append(n)
        return n

    monkeypatch.setattr(inline.InlineReader, "readinto", counting)
    return seen


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(array(1), id="uint8"),
        pytest.param(np.random.default_rng(2).random((LARGE // 32 + 1, 4)), id="float64-2d"),
        pytest.param(array(3).tobytes(), id="bytes"),
        pytest.param("é" * (LARGE // 2), id="str"),
    ],
)
def test_every_load_path_reads_it_in_pieces(
    backend: SQLBackend, value: Any, pieces: list[int]
) -> None:
    backend.save(value, "big/value")
    size = backend.stat("big/value").size
    assert size > inline.WHOLE and inline_blob(backend, "big/value", "length(b.data)") == size

    loads: list[Callable[[], Any]] = [
        lambda: backend.load("big/value"),
        lambda: backend.load_batch(["big/value"])[0],
    ]
    for load in loads:
        pieces.clear()
        loaded = load()
        assert type(loaded) is type(value)
        if isinstance(value, np.ndarray):
            assert loaded.dtype == value.dtype and np.array_equal(loaded, value)
            assert loaded.flags.writeable
        else:
            assert loaded == value
        assert pieces and max(pieces) <= inline.WHOLE and sum(pieces) == size
    with backend.transaction():  # the slow path, through SQLAlchemy
        for load in loads:
            pieces.clear()
            assert load() is not None
            assert sum(pieces) == size
    view = backend.at(backend.snapshot())
    for load in (lambda: view.load("big/value"), lambda: view.load_batch(["big/value"])[0]):
        pieces.clear()
        assert load() is not None
        assert sum(pieces) == size


def test_in_a_transaction_it_reads_the_transactions_own_write(backend: SQLBackend) -> None:
    before, after = array(4), array(5)
    backend.save(before, "big.npy")
    with backend.transaction():
        backend.save(after, "big.npy")
        assert np.array_equal(backend.load("big.npy"), after)
        assert np.array_equal(backend.load_batch(["big.npy"])[0], after)
    assert np.array_equal(backend.load("big.npy"), after)


def test_snapshot_reads_the_old_content_after_an_overwrite(backend: SQLBackend) -> None:
    old, new = array(6), array(7)
    backend.save(old, "big.npy")
    snap = backend.snapshot("before")
    backend.save(new, "big.npy")
    view = backend.at(snap)
    assert np.array_equal(view.load("big.npy"), old)
    assert np.array_equal(view.load_batch(["big.npy"])[0], old)
    assert np.array_equal(backend.load("big.npy"), new)


def test_a_file_overwritten_before_its_pieces_are_read_is_read_again(
    backend: SQLBackend,
    catalog_url: str,
    open_backend: Callable[..., SQLBackend],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old, new = array(8), array(9)
    backend.save(old, "big.npy")
    other = open_backend(catalog_url, inline_limit=4 * inline.WHOLE)
    real = verify.InlineReader
    opened: list[str] = []

    def racing(conn: Any, content_hash: str) -> inline.InlineReader:
        if not opened:  # another process overwrites it, which frees the old content
            other.save(new, "big.npy")
        opened.append(content_hash)
        return real(conn, content_hash)

    monkeypatch.setattr(verify, "InlineReader", racing)
    assert np.array_equal(backend.load("big.npy"), new)
    assert len(opened) == 2 and opened[0] != opened[1]

    opened.clear()
    other.save(old, "big.npy")
    assert np.array_equal(backend.load_batch(["big.npy"])[0], new)  # (racing saved new)
    assert len(opened) == 2


@pytest.mark.postgres
def test_in_a_transaction_content_leaving_between_pieces_is_read_again(
    pg_url: str, open_backend: Callable[..., SQLBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller's transaction reads at READ COMMITTED: another writer's overwrite
    commits between two pieces of the old content, which is then gone."""
    backend = open_backend(pg_url, inline_limit=4 * inline.WHOLE)
    other = open_backend(pg_url, inline_limit=4 * inline.WHOLE)
    old, new = array(13), array(14)
    backend.save(old, "big.npy")
    readinto = inline.InlineReader.readinto
    calls: list[int] = []

    def racing(self: inline.InlineReader, buffer: Any) -> int:
        calls.append(len(calls))
        if len(calls) == 2:  # after the first piece
            other.save(new, "big.npy")
        return readinto(self, buffer)

    monkeypatch.setattr(inline.InlineReader, "readinto", racing)
    with backend.transaction():
        assert np.array_equal(backend.load("big.npy"), new)
    assert len(calls) > 3  # the old content's first piece, then the new content


def test_a_file_whose_content_keeps_leaving_raises_not_found(
    backend: SQLBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend.save(array(10), "big.npy")

    def gone(conn: Any, content_hash: str) -> inline.InlineReader:
        raise inline._gone(content_hash)

    monkeypatch.setattr(verify, "InlineReader", gone)
    with pytest.raises(NotFoundError):
        backend.load("big.npy")
    with pytest.raises(NotFoundError):
        backend.load_batch(["big.npy"])
    with pytest.raises(NotFoundError, match="left the catalog before it was read"):
        backend.load("big.npy")


def test_damage_is_caught(backend: SQLBackend, catalog_url: str) -> None:
    value = array(11)
    backend.save(value, "big.npy")
    content_hash = backend.stat("big.npy").hash
    # One byte changed behind polystore's back, and the recorded size with it.
    with backend.engine.begin() as conn:
        data = bytearray(value.tobytes())
        data[inline.WHOLE + 5] ^= 0xFF
        conn.execute(
            sa.text("UPDATE polystore_blobs SET data = :d WHERE hash = :h"),
            {"d": bytes(data), "h": content_hash},
        )
    # Unhashed by default, as all inline content is...
    assert not np.array_equal(backend.load("big.npy"), value)
    # ...and hashed with verify_inline.
    with SQLBackend(catalog_url, inline_limit=4 * inline.WHOLE, verify_inline=True) as checked:
        with pytest.raises(IntegrityError, match="does not match its hash"):
            checked.load("big.npy")
        with pytest.raises(IntegrityError, match="does not match its hash"):
            checked.load_batch(["big.npy"])
    with backend.engine.begin() as conn:  # a value shorter than the row says
        conn.execute(
            sa.text("UPDATE polystore_blobs SET data = :d WHERE hash = :h"),
            {"d": bytes(data[:-1]), "h": content_hash},
        )
    with pytest.raises(IntegrityError, match="bytes inline, the catalog records"):
        backend.load("big.npy")


def test_sqlite_reader_gives_the_connection_its_settings_back(
    sqlite_url: str, open_backend: Callable[..., SQLBackend]
) -> None:
    backend = open_backend(sqlite_url, inline_limit=4 * inline.WHOLE)
    backend.save(array(12), "big.npy")
    with backend.engine.connect() as conn:
        settings = [
            conn.exec_driver_sql(f"PRAGMA {p}").scalar() for p in ("mmap_size", "cache_size")
        ]
        content_hash = backend.stat("big.npy").hash
        with inline.InlineReader(conn, content_hash) as reader:
            assert conn.exec_driver_sql("PRAGMA mmap_size").scalar() == 0
            assert reader.readinto(bytearray(10)) == 10
        after = [conn.exec_driver_sql(f"PRAGMA {p}").scalar() for p in ("mmap_size", "cache_size")]
        assert after == settings and settings[0] > 0
        # Also when the reading stops half-way on an error.
        with pytest.raises(RuntimeError), inline.InlineReader(conn, content_hash) as reader:
            reader.readinto(bytearray(10))
            raise RuntimeError("the caller's buffer ran out")
        after = [conn.exec_driver_sql(f"PRAGMA {p}").scalar() for p in ("mmap_size", "cache_size")]
        assert after == settings


# -- saves ----------------------------------------------------------------------------


def test_saves_store_it_whole_with_its_references_counted(backend: SQLBackend) -> None:
    # On SQLite new content goes in through a BLOB handle, content stored
    # already only gains references: repeated in a batch, saved again, overwritten.
    a, b = array(30), array(31)
    backend.save_batch([a, a, array(32, 10)], ["x/a1.npy", "x/a2.npy", "x/small.npy"])
    backend.save(a, "x/a3.npy")
    backend.save_batch([b, a], ["x/b.npy", "x/a1.npy"])  # a1 stays a: nothing new
    backend.save(b, "x/a2.npy")  # a2 becomes b
    assert inline_blob(backend, "x/a1.npy", "b.refcount") == 2
    assert inline_blob(backend, "x/b.npy", "b.refcount") == 2
    assert inline_blob(backend, "x/a1.npy", "length(b.data)") == a.nbytes
    for path, value in (("x/a1.npy", a), ("x/a2.npy", b), ("x/a3.npy", a), ("x/b.npy", b)):
        assert np.array_equal(backend.load(path), value)
    assert_refcounts_consistent(backend)
    assert backend.fsck(verify=True).ok


def test_a_save_rolled_back_leaves_no_content(backend: SQLBackend) -> None:
    backend.save(array(33), "kept.npy")
    with pytest.raises(RuntimeError), backend.transaction():
        backend.save(array(34), "dropped.npy")
        assert np.array_equal(backend.load("dropped.npy"), array(34))
        raise RuntimeError("changed my mind")
    assert not backend.exists("dropped.npy")
    with backend.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM polystore_blobs")).scalar() == 1
    assert backend.fsck(verify=True).ok


def test_rebalance_moves_it_out_of_the_catalog_and_back_whole(
    catalog_url: str,
    open_backend: Callable[..., SQLBackend],
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Moved back in on SQLite, it is written through a BLOB handle, as saves write it.
    backend = open_backend(catalog_url, inline_limit=1000, blob_store=tmp_path / "blobs")
    value = array(39)
    backend.save(value, "big.npy")
    handles: list[int] = []
    write_in_pieces = inline.write_in_pieces

    def counted(conn: Any, sql: str, params: Any, data: Any) -> bool:
        handles.append(memoryview(data).nbytes)
        return write_in_pieces(conn, sql, params, data)

    monkeypatch.setattr(gc, "write_in_pieces", counted)
    assert backend.rebalance(inline_limit=4 * inline.WHOLE).to_inline == 1
    assert handles == ([value.nbytes] if catalog_url.startswith("sqlite") else [])
    assert inline_blob(backend, "big.npy", "length(b.data)") == value.nbytes
    assert inline_blob(backend, "big.npy", "b.checksums") is None
    assert np.array_equal(backend.load("big.npy"), value)
    assert backend.rebalance().to_external == 1  # this backend's own limit: out again
    assert np.array_equal(backend.load("big.npy"), value)
    assert_refcounts_consistent(backend)
    assert backend.fsck(verify=True).ok


def _one_connection(url: str, open_backend: Callable[..., SQLBackend]) -> SQLBackend:
    """A SQLite backend whose every statement runs on one connection (reads included)."""
    return open_backend(
        url, inline_limit=4 * inline.WHOLE, engine_options={"poolclass": sa.pool.StaticPool}
    )


def _settings(backend: SQLBackend) -> list[Any]:
    with backend.engine.connect() as conn:
        return [conn.exec_driver_sql(f"PRAGMA {p}").scalar() for p in ("mmap_size", "cache_size")]


def test_sqlite_saves_give_the_connection_its_settings_back(
    sqlite_url: str, open_backend: Callable[..., SQLBackend]
) -> None:
    backend = _one_connection(sqlite_url, open_backend)
    expected = _settings(backend)
    assert expected[0] > 0
    backend.save(array(35), "big.npy")  # new content
    assert _settings(backend) == expected
    backend.save(array(35), "again.npy")  # content stored already
    assert _settings(backend) == expected
    assert inline_blob(backend, "again.npy", "b.refcount") == 2


def test_a_sqlite_save_failing_half_way_leaves_nothing(
    sqlite_url: str, open_backend: Callable[..., SQLBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The row is in, its content not yet: the BLOB handle is opened on a row
    # that is not there. The whole save rolls back, settings given back.
    backend = _one_connection(sqlite_url, open_backend)
    backend.save(array(40), "kept.npy")
    expected = _settings(backend)
    driver_fetch = inline.driver_fetch

    def wrong_row(conn: Any, sql: str, params: Any) -> list[Any]:
        return [(rowid + 1000,) for (rowid,) in driver_fetch(conn, sql, params)]

    monkeypatch.setattr(inline, "driver_fetch", wrong_row)
    # (The driver's own error, as SQLAlchemy raises it: no user can cause it.)
    with pytest.raises(sa.exc.OperationalError, match="no such rowid"):
        backend.save(array(41), "lost.npy")
    with pytest.raises(sa.exc.OperationalError), backend.transaction():
        backend.save(array(41), "lost.npy")
    monkeypatch.undo()
    assert not backend.exists("lost.npy") and _settings(backend) == expected
    with backend.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM polystore_blobs")).scalar() == 1
    assert_refcounts_consistent(backend)
    assert backend.fsck(verify=True).ok


_SAVE_MEMORY = """
import resource, sys
import numpy as np
from polystore import SQLBackend
with SQLBackend(sys.argv[1], inline_limit=1 << 30) as backend:
    value = np.random.default_rng(0).integers(0, 256, 64 << 20, dtype=np.uint8)
    backend.save(np.zeros(1), "warm.npy")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    backend.save(value, "big.npy")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert np.array_equal(backend.load("big.npy"), value)
print((after - before) * 1024 / value.nbytes)
"""


def test_a_sqlite_save_adds_little_to_the_content_in_memory(sqlite_url: str) -> None:
    # A fresh process's peak resident set, before and after one save of 64 MiB
    # inline: the content was bound (a copy) and copied into the row (another)
    # before revision 0009 let it be written through a BLOB handle.
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _SAVE_MEMORY, sqlite_url],
        capture_output=True,
        text=True,
        check=True,
    )
    assert float(done.stdout) < 0.25, done.stdout


def _fetch(url: str, sql: str) -> list[Any]:
    """The rows of ``sql`` on a fresh engine of its own (no backend open)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.exec_driver_sql(sql))
    finally:
        engine.dispose()


def _blob_columns(url: str) -> list[str]:
    return [row[1] for row in _fetch(url, "PRAGMA table_info(polystore_blobs)")]


def _blob_rows(url: str) -> list[Any]:
    return _fetch(
        url,
        "SELECT hash, size, store, refcount, created_at, checksums, data "
        "FROM polystore_blobs ORDER BY hash",
    )


def test_revision_0009_puts_data_last_on_sqlite_and_keeps_every_row(
    sqlite_url: str, tmp_path: Any
) -> None:
    values = {"big.npy": array(36), "small.npy": array(37, 100), "out.npy": array(38, 5000)}
    made_before_0010(sqlite_url)
    with SQLBackend(sqlite_url, inline_limit=4 * inline.WHOLE, blob_store=tmp_path / "blobs") as b:
        b.save_batch([values["big.npy"], values["small.npy"]], ["big.npy", "small.npy"])
        b.inline_limit = 1000
        b.save(values["out.npy"], "out.npy")  # external, with piece checksums
    rows = _blob_rows(sqlite_url)
    assert len(rows) == 3 and _blob_columns(sqlite_url)[-1] == "data"
    migrate.downgrade(sqlite_url, "0008")
    assert _blob_columns(sqlite_url) == [
        "hash", "size", "store", "refcount", "data", "created_at", "checksums"
    ]  # fmt: skip
    assert _blob_rows(sqlite_url) == rows
    migrate.upgrade(sqlite_url)
    assert _blob_columns(sqlite_url)[-1] == "data" and _blob_rows(sqlite_url) == rows
    assert migrate.check(sqlite_url) == []
    with SQLBackend(sqlite_url, blob_store=tmp_path / "blobs") as b:
        for path, value in values.items():
            assert np.array_equal(b.load(path), value)
        assert b.fsck(verify=True).ok


def test_revision_0009_keeps_an_applications_view_over_the_catalog(sqlite_url: str) -> None:
    # SQLite checks every view when a table is renamed, and this one names
    # polystore_catalog, which the rebuild drops and makes again last.
    made_before_0010(sqlite_url)
    with SQLBackend(sqlite_url) as backend:
        backend.save(b"x", "a.bin")
    migrate.downgrade(sqlite_url, "0008")
    engine = sa.create_engine(sqlite_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE VIEW app_files AS SELECT path, size FROM polystore_catalog"
            )
        for step in (
            lambda: migrate.upgrade(sqlite_url),
            lambda: migrate.downgrade(sqlite_url, "0008"),
        ):
            step()
            with engine.connect() as conn:
                assert list(conn.exec_driver_sql("SELECT path, size FROM app_files")) == [
                    ("a.bin", 1)
                ]
    finally:
        engine.dispose()


def _storage(url: str) -> str:
    (row,) = _fetch(
        url,
        "SELECT attstorage FROM pg_attribute "
        "WHERE attrelid = 'polystore_blobs'::regclass AND attname = 'data'",
    )
    return str(row[0])


def _compressed(backend: SQLBackend, path: str) -> bool:
    return bool(inline_blob(backend, path, "pg_column_size(b.data) < octet_length(b.data)"))


@pytest.mark.postgres
def test_postgresql_stores_inline_content_uncompressed_since_0008(pg_url: str) -> None:
    migrate.upgrade(pg_url, "0007")
    assert _storage(pg_url) == "x"  # EXTENDED: compressed where it can be
    migrate.upgrade(pg_url)
    assert _storage(pg_url) == "e"  # EXTERNAL: never compressed
    made_before_0010(pg_url)
    with SQLBackend(pg_url, inline_limit=4 * inline.WHOLE) as backend:
        backend.save(np.zeros(LARGE, np.uint8), "zeros.npy")
        assert not _compressed(backend, "zeros.npy")
    migrate.downgrade(pg_url, "0007")
    assert _storage(pg_url) == "x"


@pytest.mark.postgres
def test_postgresql_loads_content_compressed_before_0008(
    pg_url: str, open_backend: Callable[..., SQLBackend], pieces: list[int]
) -> None:
    backend = open_backend(pg_url, inline_limit=4 * inline.WHOLE)
    with backend.engine.begin() as conn:  # as 0007 left it
        conn.execute(sa.text("ALTER TABLE polystore_blobs ALTER COLUMN data SET STORAGE EXTENDED"))
    value = np.arange(LARGE // 8, dtype=np.int64)
    backend.save(value, "old.npy")
    assert _compressed(backend, "old.npy")
    assert np.array_equal(backend.load("old.npy"), value)
    assert np.array_equal(backend.load_batch(["old.npy"])[0], value)
    assert max(pieces) <= inline.WHOLE and sum(pieces) == 2 * value.nbytes


# -- processes at once -------------------------------------------------------------


def stamped(writer: int, generation: int) -> bytes:
    """Content of ``LARGE`` bytes whose every 8 bytes name who wrote it, and when."""
    stamp = struct.pack(">II", writer, generation)
    return (stamp * (LARGE // 8 + 1))[:LARGE]


def check_stamped(value: bytes) -> tuple[int, int]:
    """``(writer, generation)`` of a :func:`stamped` value; fails if it is anything else."""
    writer, generation = struct.unpack(">II", value[:8])
    assert value == stamped(writer, generation), "a value mixed from several contents"
    return writer, generation


def _worker(config: dict[str, Any], role: str, number: int, ready: Any, go: Any, out: Any) -> None:
    report: dict[str, Any] = {"role": role, "written": [], "reads": 0, "errors": []}
    try:
        backend = SQLBackend(config["url"], inline_limit=4 * inline.WHOLE)
    except BaseException:  # noqa: BLE001 -- reported; the parent fails the test
        report["errors"].append(traceback.format_exc())
        ready.put(number)
        out.put(report)
        return
    ready.put(number)
    go.wait()
    stop = time.monotonic() + config["seconds"]
    try:
        generation = 0
        while time.monotonic() < stop:
            if role == "writer":
                generation += 1
                backend.save(stamped(number, generation), "big/hot.bin")
                report["written"].append((number, generation))
            elif role == "reader":
                check_stamped(backend.load("big/hot.bin"))
                check_stamped(backend.load_batch(["big/hot.bin"])[0])
                report["reads"] += 2
            else:
                backend.gc(grace=0)
    except BaseException:  # noqa: BLE001 -- reported; the parent fails the test
        report["errors"].append(traceback.format_exc())
    finally:
        backend.close()
    out.put(report)


def test_readers_get_whole_values_while_writers_overwrite_them(catalog_url: str) -> None:
    """Two writers overwrite one large inline file (each overwrite frees the old content),
    two readers load it whole in pieces, and gc runs; every read is one value some
    writer saved, and the catalog ends consistent."""
    with SQLBackend(catalog_url, inline_limit=4 * inline.WHOLE) as setup:
        setup.save(stamped(0, 0), "big/hot.bin")
    roles = ["writer", "writer", "reader", "reader", "gc"]
    reports = run_together(
        _worker, {"url": catalog_url, "seconds": SECONDS}, roles, seconds=SECONDS
    )
    errors = [error for report in reports for error in report["errors"]]
    assert not errors, "\n".join(errors)
    written = {(0, 0)} | {tuple(w) for report in reports for w in report["written"]}
    assert len(written) > 2 and sum(report["reads"] for report in reports) > 0
    with SQLBackend(catalog_url, inline_limit=4 * inline.WHOLE) as backend:
        assert check_stamped(backend.load("big/hot.bin")) in written
        assert_refcounts_consistent(backend)
        report = backend.fsck(verify=True)
        assert report.ok, str(report)
