"""The SQL catalog backend, on a SQLite file and on PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import pickle
import sqlite3
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, Self

import numpy as np
import pytest
import sqlalchemy as sa
from catalog_checks import assert_refcounts_consistent, content_hash

from polystore import (
    AlreadyExistsError,
    BackendConfigError,
    BackendRegistry,
    FileManager,
    InvalidPathError,
    IsADirectoryError,
    MemoryBackend,
    NotADirectoryError,
    NotFoundError,
    ReadOnlyError,
    SerializationError,
)
from polystore.backends.sql import SQLBackend, bulk
from polystore.backends.sql import save as save_module
from polystore.backends.sql.engine import driver_fetch, is_retryable


@pytest.fixture
def backend(catalog_url: str) -> Iterator[SQLBackend]:
    b = SQLBackend(catalog_url)
    yield b
    b.close()


def blob_rows(backend: SQLBackend) -> dict[str, int]:
    with backend.engine.connect() as conn:
        return dict(conn.execute(sa.text("SELECT hash, refcount FROM polystore_blobs")).all())


def catalog_snapshot(backend: SQLBackend) -> tuple[list[Any], list[Any]]:
    with backend.engine.connect() as conn:
        nodes = conn.execute(
            sa.text("SELECT id, parent_id, name, kind, blob_hash FROM polystore_nodes ORDER BY id")
        ).all()
        blobs = conn.execute(
            sa.text("SELECT hash, refcount FROM polystore_blobs ORDER BY hash")
        ).all()
    return nodes, blobs


class StatementCounter:
    """Counts statements and rows touched, through SQLAlchemy's engine events."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.statements: list[str] = []
        #: Rows each UPDATE or DELETE touched, in order (INSERT ... RETURNING
        #: reports no rowcount on every driver; count those statements instead).
        self.rows_changed: list[int] = []

    def _after(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.statements.append(statement)
        verb = statement.lstrip().split(None, 1)[0].upper()
        if verb in ("UPDATE", "DELETE"):
            self.rows_changed.append(cursor.rowcount)

    def __enter__(self) -> Self:
        sa.event.listen(self.engine, "after_cursor_execute", self._after)
        return self

    def __exit__(self, *exc: object) -> None:
        sa.event.remove(self.engine, "after_cursor_execute", self._after)

    def writes(self) -> list[str]:
        return [
            s
            for s in self.statements
            if s.lstrip().split(None, 1)[0].upper() in ("UPDATE", "DELETE", "INSERT")
        ]


# -- serialization ----------------------------------------------------------------

ARRAYS = {
    "bool": np.array([True, False, True]),
    "int8": np.arange(-5, 5, dtype=np.int8),
    "uint16": np.arange(12, dtype=np.uint16).reshape(3, 4),
    "int64": np.arange(6, dtype=np.int64),
    "float16": np.linspace(0, 1, 7, dtype=np.float16),
    "float32": np.random.default_rng(0).random((4, 5), dtype=np.float32),
    "big_endian": np.arange(5, dtype=">f8"),
    "complex128": np.array([1 + 2j, -3.5j]),
    "datetime64": np.array(["2024-01-01T12:00", "1970-01-01"], dtype="datetime64[ns]"),
    "timedelta64": np.array([1, 2, 3], dtype="timedelta64[s]"),
    "structured": np.array([(1, 2.5), (3, 4.5)], dtype=[("a", "<i4"), ("b", "<f8")]),
    "zero_d": np.array(3.25),
    "empty": np.zeros((0, 3), dtype=np.float32),
    "fortran": np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4)),
    "non_contiguous": np.arange(20, dtype=np.float64).reshape(4, 5)[::2, 1::2],
    "unicode": np.array(["ab", "ÿ€"]),
}


@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_array_round_trip_exact(backend: SQLBackend, name: str) -> None:
    arr = ARRAYS[name]
    backend.save(arr, f"arrays/{name}.npy")
    out = backend.load(f"arrays/{name}.npy")
    assert isinstance(out, np.ndarray)
    assert out.dtype == arr.dtype
    assert out.shape == arr.shape
    assert out.flags.writeable
    np.testing.assert_array_equal(out, arr)
    out[...] = out  # writeable for real, not just flagged
    info = backend.stat(f"arrays/{name}.npy")
    assert info.dtype == str(arr.dtype)
    assert info.shape == arr.shape
    assert info.size == arr.nbytes


@pytest.mark.parametrize("name", ["float32", "structured", "fortran", "datetime64"])
def test_each_load_returns_an_array_of_its_own(backend: SQLBackend, name: str) -> None:
    arr = ARRAYS[name]
    backend.save(arr, "own.npy")
    first, second = backend.load("own.npy"), backend.load("own.npy")
    assert not np.shares_memory(first, second)
    first[...] = np.zeros_like(first)
    np.testing.assert_array_equal(second, arr)
    np.testing.assert_array_equal(backend.load("own.npy"), arr)


def test_numpy_scalar_round_trips_as_scalar(backend: SQLBackend) -> None:
    backend.save(np.float32(2.5), "s.npy")
    out = backend.load("s.npy")
    assert isinstance(out, np.float32)
    assert out == np.float32(2.5)


def test_object_arrays_refused_and_nothing_written(backend: SQLBackend) -> None:
    with pytest.raises(SerializationError):
        backend.save(np.array([{"a": 1}], dtype=object), "obj.npy")
    assert not backend.exists("obj.npy")
    assert backend.count_nodes() == 0


@pytest.mark.parametrize(
    "value", [b"\x00\xffbytes", "text ✓", {"a": [1, 2.5, None, True]}, [1, "two"], 42, None]
)
def test_plain_values_round_trip(backend: SQLBackend, value: Any) -> None:
    backend.save(value, "v")
    assert backend.load("v") == value


def test_unsupported_value_raises_serialization_error(backend: SQLBackend) -> None:
    with pytest.raises(SerializationError, match="allow_pickle"):
        backend.save(object(), "x.bin")
    assert backend.count_nodes() == 0


def test_pickle_needs_opt_in_on_save_and_on_load(catalog_url: str) -> None:
    writer = SQLBackend(catalog_url, allow_pickle=True)
    writer.save({1, 2, 3}, "set.pkl")
    assert writer.load("set.pkl") == {1, 2, 3}
    reader = SQLBackend(catalog_url)
    with pytest.raises(SerializationError, match="allow_pickle=True"):
        reader.load("set.pkl")
    writer.close()
    reader.close()


def test_pickle_payload_never_unpickled_without_opt_in(catalog_url: str) -> None:
    class Boom:
        def __reduce__(self) -> Any:
            return (pytest.fail, ("unpickled without allow_pickle",))

    writer = SQLBackend(catalog_url, allow_pickle=True)
    writer.save(pickle.dumps(1), "plain.bin")  # bytes are just bytes
    # A payload saved by someone who allowed pickle. (Planting one by hand in
    # the blob table would fail the content's hash check before any decoding.)
    writer.save(Boom(), "raw.bin")
    reader = SQLBackend(catalog_url)
    assert reader.load("plain.bin") == pickle.dumps(1)
    with pytest.raises(SerializationError):
        reader.load("raw.bin")
    writer.close()
    reader.close()


# -- directories and semantics -----------------------------------------------------


def test_parents_created_and_real_directories(backend: SQLBackend) -> None:
    backend.save(b"x", "a/b/c/d.bin")
    assert backend.is_dir("a") and backend.is_dir("a/b/c")
    assert backend.list_dir("a/b") == ["c"]
    backend.ensure_directory("empty/dir")
    assert backend.is_dir("empty/dir")
    assert backend.list_dir("empty/dir") == []
    assert backend.list_files("empty") == []


def test_save_onto_directory_and_under_file(backend: SQLBackend) -> None:
    backend.save(b"x", "a/f.bin")
    with pytest.raises(IsADirectoryError):
        backend.save(b"y", "a")
    with pytest.raises(NotADirectoryError):
        backend.save(b"y", "a/f.bin/g.bin")
    with pytest.raises(NotADirectoryError):
        backend.list_dir("a/f.bin")
    assert backend.load("a/f.bin") == b"x"
    assert_refcounts_consistent(backend)


def test_overwrite_replaces_and_releases_old_blob(backend: SQLBackend) -> None:
    backend.save(b"old", "f.bin")
    backend.save(b"new", "f.bin")
    assert backend.load("f.bin") == b"new"
    assert len(blob_rows(backend)) == 1
    with pytest.raises(AlreadyExistsError):
        backend.save(b"newer", "f.bin", overwrite=False)
    assert backend.load("f.bin") == b"new"
    assert_refcounts_consistent(backend)


def test_list_dir_sorted_by_code_point(backend: SQLBackend) -> None:
    names = ["b", "B", "a", "_x", "Z", "é", "e", "😀", "%", "a b", "ab", "A"]
    backend.save_batch([b"."] * len(names), names)
    assert backend.list_dir("") == sorted(names)
    assert list(backend.iter_dir("", page_size=5)) == sorted(names)


def test_iter_dir_pages_with_keyset(backend: SQLBackend) -> None:
    names = [f"f{i:04d}" for i in range(57)]
    backend.save_batch([b"x"] * 57, [f"d/{n}" for n in names])
    with StatementCounter(backend.engine) as counter:
        got = list(backend.iter_dir("d", page_size=10))
    assert got == names
    pages = [s for s in counter.statements if "LIMIT" in s.upper()]
    assert len(pages) == 6
    # pages after the first start from the last name seen, not from an offset
    assert all("name >" in s for s in pages[1:])


def test_list_files_pattern_extensions_recursive(backend: SQLBackend) -> None:
    files = [
        "p/a.npy",
        "p/B.NPY",
        "p/img.ome.tiff",
        "p/img.tiff",
        "p/notes.txt",
        "p/sub/c.npy",
        "p/sub/deep/d.ome.tiff",
        "p/100%_[x]*.npy",
    ]
    backend.save_batch([b"."] * len(files), files)
    assert backend.list_files("p") == sorted(f for f in files if f.count("/") == 1)
    assert backend.list_files("p", extensions={".npy"}) == ["p/100%_[x]*.npy", "p/B.NPY", "p/a.npy"]
    assert backend.list_files("p", extensions={".ome.tiff"}, recursive=True) == [
        "p/img.ome.tiff",
        "p/sub/deep/d.ome.tiff",
    ]
    assert backend.list_files("p", pattern="*.npy", recursive=True) == [
        "p/100%_[x]*.npy",
        "p/a.npy",
        "p/sub/c.npy",
    ]
    # `%` and `_` are never SQL wildcards, `[` is a glob class only in patterns.
    assert backend.list_files("p", pattern="100%_[[]x]*.npy") == ["p/100%_[x]*.npy"]
    assert backend.list_files("p", pattern="1_0*") == []
    with pytest.raises(NotFoundError):
        backend.list_files("missing")


def test_recursive_listing_is_one_query(backend: SQLBackend) -> None:
    paths = [f"r/{a}/{b}/f{c}.bin" for a in range(3) for b in range(3) for c in range(3)]
    backend.save_batch([b"."] * len(paths), paths)
    with StatementCounter(backend.engine) as counter:
        found = backend.list_files("r", recursive=True)
    assert found == sorted(paths)
    selects = [s for s in counter.statements if s.lstrip().upper().startswith(("SELECT", "WITH"))]
    assert len(selects) == 2  # resolve the directory, then one recursive query


def test_awkward_names_are_literal(backend: SQLBackend) -> None:
    names = ["it's", 'say "hi"', "50%", "a_b", "*", "[ab]", "x; DROP TABLE polystore_nodes; --"]
    for i, name in enumerate(names):
        backend.save(i, f"w/{name}")
    assert backend.list_dir("w") == sorted(names)
    for i, name in enumerate(names):
        assert backend.load(f"w/{name}") == i
    assert not backend.exists("w/a%b")
    assert not backend.exists("w/axb")


def test_invalid_paths_rejected(backend: SQLBackend) -> None:
    for bad in ["../x", "a/../../b", "/..", "a\\..\\b", "a\x00b", "x" * 256, ""]:
        with pytest.raises(InvalidPathError):
            backend.save(b".", bad)
    assert backend.count_nodes() == 0


# -- move, copy, delete --------------------------------------------------------------


def test_directory_move_updates_one_row(backend: SQLBackend) -> None:
    paths = [f"big/{i // 50}/{i}.bin" for i in range(500)]
    backend.save_batch([str(i).encode() for i in range(500)], paths)
    with StatementCounter(backend.engine) as counter:
        backend.move("big", "moved/here")
    # the tree version raised (before any node is locked), one new parent
    # directory, then the move itself: a single-row UPDATE of the nodes
    writes = [" ".join(w.split()[:3]) for w in counter.writes()]
    assert writes == [
        "UPDATE polystore_tree_version SET",
        "INSERT INTO polystore_nodes",  # the "moved" directory
        "UPDATE polystore_nodes SET",
    ]
    assert counter.rows_changed == [1, 1]
    assert backend.load("moved/here/3/150.bin") == b"150"
    assert not backend.exists("big")
    assert_refcounts_consistent(backend)


def test_batch_into_new_directories_looks_up_no_names(backend: SQLBackend) -> None:
    """Directories this batch created cannot hold anything to replace: no lookups."""
    backend.save(b"old", "old/kept.bin")
    with StatementCounter(backend.engine) as counter:
        backend.save_batch([b"1", b"2", b"3"], ["new/a/1.bin", "new/a/2.bin", "new/b/3.bin"])
    lookups = [s for s in counter.statements if " name IN (" in s]
    assert lookups == []
    with StatementCounter(backend.engine) as counter:
        backend.save_batch([b"4", b"5"], ["old/4.bin", "old/kept.bin"])  # an existing one
    assert len([s for s in counter.statements if " name IN (" in s]) == 1
    assert backend.load_batch(["new/b/3.bin", "old/kept.bin"]) == [b"3", b"5"]


def test_batch_into_many_new_directories_creates_them_together(backend: SQLBackend) -> None:
    """Ten new directories in a new one: looked up at once, created a level at a time."""
    backend.save(b"old", "top/old.bin")
    names = [f"top/new/{i}/c.bin" for i in range(10)]
    with StatementCounter(backend.engine) as counter:
        backend.save_batch([b"%d" % i for i in range(10)], names)
    created = [s for s in counter.statements if "'dir'" in s and s.startswith("INSERT")]
    assert [s.count("'dir'") for s in created] == [1, 10]  # top/new, then its ten
    lookups = [s for s in counter.statements if s.startswith("SELECT") and "polystore_nodes" in s]
    # the ten at once, then their parent (top/new: absent), then its parent (top)
    assert [s.count("UNION ALL") for s in lookups[:3]] == [9, 0, 0]
    assert backend.list_dir("top/new") == [str(i) for i in range(10)]
    assert backend.load_batch(names) == [b"%d" % i for i in range(10)]
    assert backend.list_dir("top") == ["new", "old.bin"]


def test_batch_creating_directories_at_many_depths(backend: SQLBackend) -> None:
    backend.ensure_directory("a/b")
    names = ["a/b/c/d/e/1", "a/b/c/2", "a/x/3", "a/b/c/d/4", "z/5", "6", "a/b/7"]
    backend.save_batch([n.encode() for n in names], names)
    assert backend.load_batch(names) == [n.encode() for n in names]
    assert backend.list_dir("a") == ["b", "x"]
    assert backend.list_dir("a/b/c") == ["2", "d"]
    assert backend.list_dir("a/b/c/d") == ["4", "e"]
    assert backend.fsck().ok
    # A parent that is a file, among new directories: nothing is written.
    before = catalog_snapshot(backend)
    with pytest.raises(NotADirectoryError):
        backend.save_batch([b"1", b"2"], ["q/new/1", "a/x/3/under-a-file"])
    assert catalog_snapshot(backend) == before


def test_statement_listeners_get_an_execution_context(backend: SQLBackend) -> None:
    # Tracers keep their state on the context (OpenTelemetry: its span): the
    # lookups a save makes on the driver's cursor must then go through SQLAlchemy.
    seen: list[str] = []

    def before(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
    ) -> None:
        context.traced = True
        seen.append(statement)

    sa.event.listen(backend.engine, "before_cursor_execute", before)
    try:
        backend.save_batch([b"1", b"2"], ["d/a.bin", "d/b.bin"])
        backend.save(b"3", "d/a.bin")  # an overwrite: the names it replaces are looked up
    finally:
        sa.event.remove(backend.engine, "before_cursor_execute", before)
    assert backend.load_batch(["d/a.bin", "d/b.bin"]) == [b"3", b"2"]
    assert any(" name IN (" in statement for statement in seen)
    if backend.engine.dialect.name == "sqlite":  # (a statement of its own there)
        assert "BEGIN IMMEDIATE" in seen


def test_error_listeners_see_the_lookups_failures(backend: SQLBackend) -> None:
    # A handle_error listener (an error reporter) is one more reason to run
    # the lookups through SQLAlchemy, which calls it.
    seen: list[str] = []

    def record(context: Any) -> None:
        seen.append(context.statement)

    sa.event.listen(backend.engine, "handle_error", record)
    try:
        with backend.engine.connect() as conn, pytest.raises(sa.exc.DBAPIError):
            driver_fetch(conn, "SELECT no_such_column FROM polystore_nodes", ())
    finally:
        sa.event.remove(backend.engine, "handle_error", record)
    assert seen and "no_such_column" in seen[0]


def test_a_saves_lookups_skip_sqlalchemys_execution_when_no_one_listens(
    backend: SQLBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # polystore's engines listen to connect and begin themselves; only a
    # listener of the cursor-level statement events sends the lookups that
    # every save makes through SQLAlchemy's execution (~10x their cost).
    through_sqlalchemy: list[str] = []
    exec_driver_sql = sa.Connection.exec_driver_sql

    def recorded(conn: sa.Connection, statement: str, *args: Any, **kwargs: Any) -> Any:
        through_sqlalchemy.append(statement)
        return exec_driver_sql(conn, statement, *args, **kwargs)

    backend.save(b"1", "d/a.bin")
    monkeypatch.setattr(sa.Connection, "exec_driver_sql", recorded)
    backend.save(b"2", "d/a.bin")  # an overwrite: the names it replaces are looked up
    assert not [text for text in through_sqlalchemy if " name IN (" in text or "BEGIN" in text]
    assert backend.load("d/a.bin") == b"2"


def tree_version(backend: SQLBackend) -> int:
    with backend.engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT version FROM polystore_tree_version")).scalar_one())


def test_tree_version_counts_directory_moves_and_deletes_only(backend: SQLBackend) -> None:
    backend.save_batch([b"1", b"2"], ["d/one.bin", "d/sub/two.bin"])
    start = tree_version(backend)
    backend.move("d/one.bin", "d/uno.bin")  # files: directory ids stay where they are
    backend.copy("d", "copied")
    backend.delete("d/uno.bin")
    backend.ensure_directory("e/f")
    assert tree_version(backend) == start
    backend.move("d/sub", "d/moved")
    backend.delete("copied", recursive=True)
    assert tree_version(backend) == start + 2
    with pytest.raises(RuntimeError), backend.transaction():
        backend.move("d", "gone")
        raise RuntimeError("rolled back: so is the version")
    assert tree_version(backend) == start + 2


def test_cached_directories_follow_another_writer(catalog_url: str) -> None:
    """A reader caches directory ids by path; another backend moves and deletes them."""
    with SQLBackend(catalog_url) as reader, SQLBackend(catalog_url) as writer:
        writer.save(b"one", "a/b/x.bin")
        assert reader.load("a/b/x.bin") == b"one"  # resolves the path, caches a/b
        assert reader.load("a/b/x.bin") == b"one"  # through the cached id
        writer.move("a/b", "a/c")
        writer.save(b"two", "a/b/x.bin")  # a new directory at the old path
        assert reader.load("a/b/x.bin") == b"two"
        assert reader.load("a/c/x.bin") == b"one"
        writer.delete("a", recursive=True)
        writer.save(b"three", "a/b/x.bin")
        assert reader.load("a/b/x.bin") == b"three"
        writer.move("a", "z")  # an ancestor moves
        with pytest.raises(NotFoundError):
            reader.load("a/b/x.bin")
        assert reader.load("z/b/x.bin") == b"three"
        writer.move("z/b/x.bin", "z/b/y.bin")  # a file moves: the directory stays put
        with pytest.raises(NotFoundError):
            reader.load("z/b/x.bin")
        writer.save(b"four", "z/b/x.bin")
        assert reader.load_batch(["z/b/x.bin", "z/b/y.bin"]) == [b"four", b"three"]
        writer.delete("z/b", recursive=True)
        writer.save(b"file now", "z/b")  # the directory's path is a file's
        with pytest.raises(NotFoundError):
            reader.load("z/b/x.bin")
        assert reader.load("z/b") == b"file now"


def test_load_in_a_cached_directory_is_one_indexed_lookup(sqlite_url: str) -> None:
    """Counted on the reader's own SQLite connection: the path is not walked again."""
    with SQLBackend(sqlite_url) as b:
        b.save_batch([b"x", b"y"], ["d1/d2/d3/d4/d5/x.bin", "d1/d2/d3/d4/d5/y.bin"])
        assert b.load("d1/d2/d3/d4/d5/x.bin") == b"x"
        statements: list[str] = []
        conn = b._fast._connection()  # this thread's read connection (internal, for counting)
        conn.set_trace_callback(statements.append)
        try:
            assert b.load("d1/d2/d3/d4/d5/y.bin") == b"y"
        finally:
            conn.set_trace_callback(None)
        assert len(statements) == 1
        assert statements[0].count("polystore_nodes") == 1  # no join per level


def test_load_in_a_cached_directory_reads_what_is_not_small_inline_in_full(
    sqlite_url: str, tmp_path: Any
) -> None:
    """The lean row serves small inline content; the rest is read again, in full."""
    from polystore.errors import IntegrityError

    with SQLBackend(sqlite_url, blob_store=str(tmp_path / "blobs"), inline_limit=8) as b:
        small, big = b"tiny", b"bigger than eight bytes"
        b.save_batch([small, big, small + b"!"], ["d/s.bin", "d/big.bin", "d/damaged.bin"])
        b.ensure_directory("d/sub")
        assert b.load("d/s.bin") == small  # (the directory's id is cached now)
        statements: list[str] = []
        conn = b._fast._connection()  # this thread's read connection (internal, for counting)
        conn.set_trace_callback(statements.append)
        try:
            assert b.load("d/s.bin") == small
            assert len(statements) == 1
            assert b.load("d/big.bin") == big  # content in the blob store
            assert len(statements) == 3
            with pytest.raises(IsADirectoryError):
                b.load("d/sub")
        finally:
            conn.set_trace_callback(None)
        with b.engine.begin() as write:  # behind polystore's back: one byte short
            write.execute(
                sa.text("UPDATE polystore_blobs SET data = :d WHERE hash = :h"),
                {"d": small, "h": content_hash(b, small + b"!")},
            )
        with pytest.raises(IntegrityError):
            b.load("d/damaged.bin")
        assert b.load("d/s.bin") == small


def test_exists_in_a_cached_directory_follows_another_writer(catalog_url: str) -> None:
    """exists/is_file/is_dir use the reader's cache of directory ids, and see every change."""
    with SQLBackend(catalog_url) as reader, SQLBackend(catalog_url) as writer:
        writer.save(b"one", "a/b/x.bin")
        assert reader.exists("a/b/x.bin")  # resolves the path, caches a/b
        assert reader.is_file("a/b/x.bin") and not reader.exists("a/b/y.bin")
        writer.save(b"two", "a/b/y.bin")
        assert reader.exists("a/b/y.bin")  # a new file in a cached directory
        writer.move("a/b", "a/c")
        assert not reader.exists("a/b/x.bin") and reader.is_file("a/c/x.bin")
        writer.save(b"three", "a/b/x.bin")  # a new directory at the old path
        assert reader.is_file("a/b/x.bin") and not reader.exists("a/b/y.bin")
        writer.delete("a/b/x.bin")
        assert not reader.exists("a/b/x.bin")
        writer.ensure_directory("a/b/x.bin")
        assert reader.is_dir("a/b/x.bin")
        writer.delete("a", recursive=True)
        assert not reader.exists("a/b/x.bin") and not reader.exists("a/c/x.bin")


def test_exists_in_a_cached_directory_is_one_indexed_lookup(sqlite_url: str) -> None:
    """Counted on the reader's own SQLite connection: the path is not walked again."""
    with SQLBackend(sqlite_url) as b:
        b.save_batch([b"x", b"y"], ["d1/d2/d3/d4/d5/x.bin", "d1/d2/d3/d4/d5/y.bin"])
        assert b.exists("d1/d2/d3/d4/d5/x.bin")
        statements: list[str] = []
        conn = b._fast._connection()  # this thread's read connection (internal, for counting)
        conn.set_trace_callback(statements.append)
        try:
            assert b.is_file("d1/d2/d3/d4/d5/y.bin")
            assert not b.exists("d1/d2/d3/d4/d5/z.bin")
        finally:
            conn.set_trace_callback(None)
        assert len(statements) == 2
        assert all(s.count("polystore_nodes") == 1 for s in statements)  # no join per level


def test_move_rules(backend: SQLBackend) -> None:
    backend.save(b"1", "a/x.bin")
    backend.save(b"2", "b.bin")
    with pytest.raises(AlreadyExistsError):
        backend.move("b.bin", "a/x.bin")
    with pytest.raises(InvalidPathError):
        backend.move("a", "a/inner")
    with pytest.raises(NotFoundError):
        backend.move("nope", "z")
    backend.move("b.bin", "c/renamed.bin")
    assert backend.load("c/renamed.bin") == b"2"


def test_copy_shares_blobs(backend: SQLBackend) -> None:
    backend.save_batch([b"a", b"b", b"c"], ["t/1.bin", "t/s/2.bin", "t/s/t/3.bin"])
    before = blob_rows(backend)
    with StatementCounter(backend.engine) as counter:
        backend.copy("t", "u")
    assert not any("polystore_blobs" in s and "INSERT" in s.upper() for s in counter.statements)
    assert backend.list_files("u", recursive=True) == ["u/1.bin", "u/s/2.bin", "u/s/t/3.bin"]
    assert backend.load("u/s/t/3.bin") == b"c"
    assert set(blob_rows(backend)) == set(before)
    assert all(n == 2 for n in blob_rows(backend).values())
    backend.delete("t", recursive=True)
    assert all(n == 1 for n in blob_rows(backend).values())
    assert_refcounts_consistent(backend)


def test_delete_releases_content(backend: SQLBackend) -> None:
    backend.save(b"same", "a.bin")
    backend.save(b"same", "d/b.bin")
    assert blob_rows(backend) == {next(iter(blob_rows(backend))): 2}
    with pytest.raises(OSError, match="not empty"):
        backend.delete("d")
    backend.delete("d", recursive=True)
    assert list(blob_rows(backend).values()) == [1]
    backend.delete("a.bin")
    assert blob_rows(backend) == {}
    with pytest.raises(NotFoundError):
        backend.delete("a.bin")


# -- transactions ------------------------------------------------------------------


def test_save_batch_all_or_nothing(backend: SQLBackend) -> None:
    backend.save(b"keep", "keep.bin")
    before = catalog_snapshot(backend)
    values: list[Any] = [np.full(4, i, dtype=np.int32) for i in range(9_999)] + [object()]
    with pytest.raises(SerializationError):
        backend.save_batch(values, [f"batch/{i}.npy" for i in range(10_000)])
    assert catalog_snapshot(backend) == before


def test_save_batch_database_failure_rolls_back(backend: SQLBackend) -> None:
    backend.ensure_directory("x/dir")
    before = catalog_snapshot(backend)
    with pytest.raises(IsADirectoryError):
        backend.save_batch([b"1", b"2", b"3"], ["x/a.bin", "x/b.bin", "x/dir"])
    assert catalog_snapshot(backend) == before


@pytest.mark.parametrize("order", [1, -1])
def test_save_batch_file_and_directory_of_one_name(backend: SQLBackend, order: int) -> None:
    before = catalog_snapshot(backend)
    with pytest.raises(IsADirectoryError):
        backend.save_batch([b"1", b"2"][::order], ["f/a", "f/a/x"][::order])
    assert catalog_snapshot(backend) == before


def test_save_batch_path_twice(backend: SQLBackend) -> None:
    backend.save(b"old", "d/x.bin")
    before = catalog_snapshot(backend)
    with pytest.raises(AlreadyExistsError):
        backend.save_batch(
            [b"new", b"1", b"2"], ["d/new.bin", "d/y.bin", "d//y.bin"], overwrite=False
        )
    assert catalog_snapshot(backend) == before
    # overwrite=True: the last value wins, and only its content is referenced
    backend.save_batch([b"1", b"2", b"3"], ["d/x.bin", "d/y.bin", "/d/x.bin"])
    assert backend.load("d/x.bin") == b"3"
    assert backend.load("d/y.bin") == b"2"
    assert set(blob_rows(backend)) == {content_hash(backend, v) for v in (b"2", b"3")}
    assert_refcounts_consistent(backend)


def test_batch_with_repeated_content(backend: SQLBackend) -> None:
    # Across directories, with repeated content: hashes, counts and order hold.
    values = [np.full(1024, i % 1500, dtype=np.float32) for i in range(2000)]
    names = [f"big/{i // 700}/{i}.npy" for i in range(len(values))]
    backend.save_batch(values, names)
    counts = blob_rows(backend)
    assert len(counts) == 1500
    for v in values[:3] + values[-3:]:
        assert counts[content_hash(backend, v.tobytes())] == (2 if v[0] < 500 else 1)
    for got, want in zip(backend.load_batch(names), values, strict=True):
        assert np.array_equal(got, want)
    assert_refcounts_consistent(backend)


def test_streamed_bulk_insert_errors_are_sqlalchemy_errors(sqlite_url: str) -> None:
    """The SQLite bulk inserts bypass exec_driver_sql; errors must look the same."""
    with (
        SQLBackend(sqlite_url) as backend,
        backend.engine.begin() as conn,
        pytest.raises(sa.exc.IntegrityError, match="CHECK constraint"),
    ):
        save_module._INSERT_FILES.execute_processed(
            conn, iter([(0, "x", "bogus", 1, *[None] * 6, "h" * 64, "t", "t", None, 0)])
        )

    class LockedCursor:
        def executemany(self, sql: str, rows: Any) -> None:
            raise sqlite3.OperationalError("database is locked")

        def close(self) -> None:
            pass

    fake: Any = SimpleNamespace(
        connection=SimpleNamespace(driver_connection=SimpleNamespace(cursor=LockedCursor)),
        dialect=sa.create_engine("sqlite://").dialect,
    )
    with pytest.raises(sa.exc.OperationalError) as caught:
        bulk._sqlite_executemany(fake, "INSERT ...", iter([()]))
    assert is_retryable(caught.value)


def test_transaction_commit_and_rollback(backend: SQLBackend) -> None:
    with backend.transaction():
        backend.save(b"1", "t/a.bin")
        backend.move("t/a.bin", "t/b.bin")
        assert backend.load("t/b.bin") == b"1"
    assert backend.load("t/b.bin") == b"1"
    before = catalog_snapshot(backend)
    with pytest.raises(RuntimeError), backend.transaction():
        backend.save(b"2", "t/c.bin")
        backend.delete("t/b.bin")
        raise RuntimeError("boom")
    assert catalog_snapshot(backend) == before


def test_nested_transaction_uses_savepoint(backend: SQLBackend) -> None:
    with backend.transaction():
        backend.save(b"outer", "o.bin")
        with pytest.raises(ValueError, match="inner"), backend.transaction():
            backend.save(b"inner", "i.bin")
            raise ValueError("inner")
        # a failed operation inside the transaction does not poison it
        with pytest.raises(NotFoundError):
            backend.load("missing")
        with pytest.raises(IsADirectoryError):
            backend.save_batch([b"z", b"w"], ["zz/ok.bin", "zz"])
        backend.save(b"after", "a.bin")
    assert backend.list_files("") == ["a.bin", "o.bin"]
    assert not backend.exists("zz")
    assert_refcounts_consistent(backend)


def test_filemanager_transaction(catalog_url: str) -> None:
    fm = FileManager(catalog_url)
    with pytest.raises(KeyError), fm.transaction():
        fm.save(b"x", "a.bin")
        raise KeyError("abort")
    assert not fm.exists("a.bin")
    with fm.transaction(backend=catalog_url):
        fm.save(b"x", "a.bin")
    assert fm.load("a.bin") == b"x"
    fm.close()


# -- metadata, query and the view ------------------------------------------------------


def test_stat_and_attrs(backend: SQLBackend) -> None:
    before = dt.datetime.now(dt.UTC)
    backend.save(np.zeros((2, 3), np.uint8), "m/a.npy", attrs={"well": "A01", "n": 3})
    info = backend.stat("m/a.npy")
    assert info.kind == "file" and info.size == 6
    assert info.serializer == "ndarray" and info.dtype == "uint8" and info.shape == (2, 3)
    assert info.attrs == {"well": "A01", "n": 3}
    assert info.store == "inline" and info.hash is not None and len(info.hash) == 64
    assert info.created_at is not None and info.created_at >= before - dt.timedelta(seconds=5)
    assert info.created_at.tzinfo is not None
    assert backend.stat("m").kind == "dir"
    with pytest.raises(NotFoundError):
        backend.stat("nope")


@pytest.mark.parametrize(
    "attrs", [{"x": float("nan")}, {"x": object()}, {1: "a"}, ["list"], {"big": "x" * 70_000}]
)
def test_bad_attrs_rejected(backend: SQLBackend, attrs: Any) -> None:
    with pytest.raises(SerializationError):
        backend.save(b".", "f.bin", attrs=attrs)
    assert backend.count_nodes() == 0


def test_query_filters(backend: SQLBackend) -> None:
    backend.save(np.zeros(3, np.float32), "plate1/A01.npy", attrs={"well": "A01", "ok": True})
    backend.save(np.zeros(3, np.float64), "plate1/A02.npy", attrs={"well": "A02", "ok": 1})
    backend.save(np.zeros(3, np.float32), "plate2/A01.npy", attrs={"well": "A01"})
    backend.save({"meta": 1}, "plate1/meta.json")
    assert [r.path for r in backend.query(dtype="float32")] == ["plate1/A01.npy", "plate2/A01.npy"]
    assert [r.path for r in backend.query(under="plate1", dtype="float32")] == ["plate1/A01.npy"]
    assert [r.path for r in backend.query(attrs={"well": "A01"})] == [
        "plate1/A01.npy",
        "plate2/A01.npy",
    ]
    assert [r.path for r in backend.query(attrs={"ok": True})] == ["plate1/A01.npy"]
    assert [r.path for r in backend.query(attrs={"ok": 1})] == ["plate1/A02.npy"]
    assert [r.path for r in backend.query(kind="dir")] == ["plate1", "plate2"]
    assert [r.path for r in backend.query(serializer="json")] == ["plate1/meta.json"]
    assert len(backend.query(kind="file", limit=2)) == 2


def test_catalog_view(backend: SQLBackend) -> None:
    backend.save(np.ones((2, 2), ">f8"), "p/q/a.npy", attrs={"well": "B02"})
    with backend.engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT path, name, kind, size, serializer, dtype, shape, attrs, hash, store, "
                "created_at, modified_at FROM polystore_catalog ORDER BY path"
            )
        ).all()
    assert [(r.path, r.kind) for r in rows] == [("p", "dir"), ("p/q", "dir"), ("p/q/a.npy", "file")]
    file_row = rows[-1]
    assert file_row.name == "a.npy" and file_row.size == 32 and file_row.dtype == ">f8"
    assert file_row.serializer == "ndarray" and file_row.store == "inline"
    shape = file_row.shape if isinstance(file_row.shape, list) else json.loads(file_row.shape)
    assert shape == [2, 2]


# -- URLs everywhere a backend name goes ---------------------------------------------------


def test_database_url_as_backend_name(sqlite_url: str, tmp_path: Any) -> None:
    fm = FileManager(sqlite_url)
    fm.save(np.arange(3), "a/b.npy")
    np.testing.assert_array_equal(fm.load("a/b.npy", backend=sqlite_url), np.arange(3))
    registry = BackendRegistry()
    assert sqlite_url in registry
    assert isinstance(registry[sqlite_url], SQLBackend)
    assert registry[sqlite_url] is registry[sqlite_url]
    assert registry[sqlite_url].list_files("a") == ["a/b.npy"]
    fm2 = FileManager({"mem": MemoryBackend()})
    assert fm2.list_files("a", backend=sqlite_url) == ["a/b.npy"]
    registry.close()
    fm.close()
    fm2.close()


def test_default_url_from_environment(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    registry = BackendRegistry()
    backend = registry["sql"]
    assert isinstance(backend, SQLBackend)
    assert backend.url == "sqlite:///polystore.db"
    backend.save(b"x", "f.bin")
    assert (tmp_path / "polystore.db").exists()
    registry.close()
    monkeypatch.setenv("POLYSTORE_URL", f"sqlite:///{tmp_path}/other.db")
    with SQLBackend() as other:
        assert other.url.endswith("other.db")
        assert not other.exists("f.bin")


def test_not_a_database_is_a_config_error(tmp_path: Any) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"these are not the pages of a SQLite database " * 20)
    with pytest.raises(BackendConfigError, match="not point at a SQLite database"):
        SQLBackend(f"sqlite:///{path}")
    assert path.read_bytes().startswith(b"these are not")


def test_read_only_uri_filename(tmp_path: Any) -> None:
    with SQLBackend(f"sqlite:///{tmp_path}/c.db") as writer:
        writer.save(b"kept", "a.bin")
    with SQLBackend(f"sqlite:///file:{tmp_path}/c.db?mode=ro&uri=true") as reader:
        assert reader.load("a.bin") == b"kept"
        with pytest.raises(ReadOnlyError):
            reader.save(b"new", "b.bin")
        assert reader.list_files("") == ["a.bin"]


def test_a_serializer_registered_later_decodes_the_next_load(catalog_url: str) -> None:
    """Loads reuse decoders per dtype and shape, but never past a registry change."""
    from polystore.serializers import NDArraySerializer, SerializerRegistry

    class Tagged(NDArraySerializer):
        def decoder(self, meta: dict[str, Any]) -> Any:
            plain = super().decoder(meta)
            return lambda data: ("tagged", plain(data))

    registry = SerializerRegistry.default()
    with SQLBackend(catalog_url, serializers=registry) as b:
        b.save(np.arange(3), "a/x.npy")
        assert b.load("a/x.npy").tolist() == [0, 1, 2]
        registry.register(Tagged())  # replaces "ndarray"
        tag, value = b.load("a/x.npy")
        assert tag == "tagged" and value.tolist() == [0, 1, 2]
        assert b.load_batch(["a/x.npy"])[0][0] == "tagged"


def test_each_load_gets_metadata_of_its_own(catalog_url: str) -> None:
    """A serializer may change the metadata it is handed; the next load is unaffected."""
    from polystore.serializers import Encoded, Serializer, SerializerRegistry

    class Complex(Serializer):
        name = "complex"

        def accepts(self, value: Any) -> bool:
            return isinstance(value, complex)

        def encode(self, value: Any) -> Encoded:
            return Encoded(self.name, self.version, repr(value).encode(), {"parts": [2]})

        def decode(self, data: Any, meta: dict[str, Any]) -> Any:
            assert meta.pop("parts") == [2]  # mutating what it was given
            return complex(bytes(data).decode())

    registry = SerializerRegistry.default()
    registry.register(Complex(), first=True)
    with SQLBackend(catalog_url, serializers=registry) as b:
        b.save_batch([1 + 2j, 3 + 4j], ["d/a", "d/b"])
        assert [b.load("d/a"), b.load("d/b")] == [1 + 2j, 3 + 4j]
        assert b.load_batch(["d/a", "d/b", "d/a"]) == [1 + 2j, 3 + 4j, 1 + 2j]


def test_a_serializer_may_hand_over_a_buffer_of_any_item_format(catalog_url: str) -> None:
    """A memoryview of float64 is content like any other: hashed by its bytes, by either
    algorithm (BLAKE3 wants bytes), inline or in a batch; a buffer that is not contiguous
    is refused with SerializationError and saves nothing."""
    from polystore.serializers import Encoded, Serializer, SerializerRegistry

    class Floats(Serializer):
        name = "floats"

        def accepts(self, value: Any) -> bool:
            return isinstance(value, list)

        def encode(self, value: Any) -> Encoded:
            array = np.asarray(value, np.float64)
            strided = len(value) == 4  # (the serializer's bug: a view of every other item)
            return Encoded(self.name, self.version, memoryview(array[::2] if strided else array))

        def decode(self, data: Any, meta: dict[str, Any]) -> Any:
            return np.frombuffer(bytes(data), np.float64).tolist()

    registry = SerializerRegistry.default()
    registry.register(Floats(), first=True)
    with SQLBackend(catalog_url, serializers=registry) as b:
        b.save([1.0, 2.0], "f/one")
        b.save_batch([[3.0], [1.0, 2.0]], ["f/two", "f/three"])
        assert [b.load(p) for p in ("f/one", "f/two", "f/three")] == [[1.0, 2.0], [3.0], [1.0, 2.0]]
        as_bytes = np.asarray([1.0, 2.0], np.float64).tobytes()
        assert b.stat("f/one").hash == b.stat("f/three").hash == content_hash(b, as_bytes)
        before = b.list_files("f")
        with pytest.raises(SerializationError, match="contiguous"):
            b.save([1.0, 2.0, 3.0, 4.0], "f/strided")
        assert b.list_files("f") == before


def test_allow_pickle_turned_off_holds_for_cached_decoders(catalog_url: str) -> None:
    with SQLBackend(catalog_url, allow_pickle=True) as b:
        b.save({1, 2}, "p/set.pkl")
        assert b.load("p/set.pkl") == {1, 2}
        b.allow_pickle = False
        with pytest.raises(SerializationError, match="allow_pickle=True"):
            b.load("p/set.pkl")
        with pytest.raises(SerializationError, match="allow_pickle=True"):
            b.load_batch(["p/set.pkl"])


def test_in_memory_catalog_from_a_second_thread_during_a_transaction() -> None:
    """One shared connection: a clear error, never another thread's uncommitted rows."""
    import threading

    from polystore import UnsupportedOperationError

    with SQLBackend("sqlite://") as b:
        seen: list[BaseException | bytes] = []
        with pytest.raises(RuntimeError), b.transaction():
            b.save(b"uncommitted", "d/x")

            def read() -> None:
                try:
                    seen.append(b.load("d/x"))
                except BaseException as exc:  # noqa: BLE001 -- recorded for the assert
                    seen.append(exc)

            reader = threading.Thread(target=read)
            reader.start()
            reader.join(10)
            raise RuntimeError("roll back")
        assert len(seen) == 1 and isinstance(seen[0], UnsupportedOperationError)
        with pytest.raises(NotFoundError):
            b.load("d/x")
        b.save(b"other", "e/x")  # may reuse the rolled-back directory's id
        with pytest.raises(NotFoundError):
            b.load("d/x")


def test_bulk_json_documents_round_trip_exactly(catalog_url: str) -> None:
    """JSON columns of bulk inserts (COPY's jsonb input on PostgreSQL) keep every value."""
    attrs = {
        "é": "ü\u2603",
        "emoji and separators": "\U0001f9ea \u2028 \u2029 \\ \" '",
        "mixed": [1, True, None, 1.5, "1", 2**70, 1e-300, -0.5],
        "nested": {"deep": {"0": []}},
    }
    structured = np.zeros(3, dtype=[("a", "<i4"), ("b", ">f8", (2,))])
    values = [np.arange(4, dtype=np.int64), structured, np.ones((2, 3), order="F"), True, 1]
    names = [f"docs/{i}" for i in range(len(values))]
    with SQLBackend(catalog_url) as b:
        b.save_batch(values, names, attrs=attrs)
        for name, value in zip(names, values, strict=True):
            # (as text: == would take True for 1)
            assert json.dumps(b.stat(name).attrs, sort_keys=True) == json.dumps(
                attrs, sort_keys=True
            )
            loaded = b.load(name)
            assert type(loaded) is type(value)
            if isinstance(value, np.ndarray):
                assert loaded.dtype == value.dtype and loaded.shape == value.shape
                assert loaded.flags.f_contiguous == value.flags.f_contiguous
                np.testing.assert_array_equal(loaded, value)
            else:
                assert loaded == value
        assert [type(v) for v in b.load_batch(names[3:])] == [bool, int]
        shapes = {found.path: found.shape for found in b.query(under="docs")}
        assert shapes["docs/1"] == (3,) and shapes["docs/2"] == (2, 3)
        assert len(b.query(attrs={"é": "ü\u2603"}, kind="file")) == len(values)
