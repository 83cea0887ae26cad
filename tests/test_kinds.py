"""The table of kinds (revision 0004): each file's kind id, and what reads it.

A batch load decodes by the kind id alone, so these check that every writer
records the right id, that a reader learns kinds it has not met (also while a
PostgreSQL result streams), and that a file without one still loads.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from catalog_checks import file_kinds

from polystore import SerializationError
from polystore.backends.sql import SQLBackend
from polystore.backends.sql.kinds import kind_key, same_json
from polystore.backends.sql.models import kinds_table
from polystore.serializers import SHARED_ARRAY_BYTES, Encoded, Serializer, SerializerRegistry

FLOATS = ("ndarray", 1, "float32", [1024], {"descr": "<f4", "order": "C"})


def test_a_kind_id_is_derived_from_the_kind_and_never_changes() -> None:
    # The key's format is part of the schema: ids written by one release must
    # mean the same kind to every later one.
    assert kind_key(FLOATS) == (
        8095589110924961688,
        '["ndarray",1,"float32",[1024],{"descr":"<f4","order":"C"}]',
    )
    assert kind_key(("str", 1, None, None, {})) == kind_key(("str", 1, None, None, None))
    assert (
        kind_key(("ndarray", 1, "float32", [1024], {"order": "C", "descr": "<f4"}))[0]
        == (kind_key(FLOATS)[0])
    )
    assert kind_key(("ndarray", 1, "float32", [1025], FLOATS[4]))[0] != kind_key(FLOATS)[0]
    assert 0 < kind_key(FLOATS)[0] < 2**63


def _kind_rows(url: str) -> tuple[list[Any], list[Any]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            files = file_kinds(conn)
            kinds = conn.execute(sa.select(kinds_table.c.id, kinds_table.c.key)).all()
    finally:
        engine.dispose()
    return files, kinds


def _execute(url: str, sql: str, **params: Any) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(sql), params)
    finally:
        engine.dispose()


def test_every_writer_records_the_kind_of_its_columns(catalog_url: str) -> None:
    with SQLBackend(catalog_url) as b:
        b.save_batch([np.zeros(3, np.int8), np.ones(3, np.int8), "text"], ["a/x", "a/y", "a/t"])
        b.save(np.arange(4.0), "a/y")  # an overwrite of another kind
        b.save({"json": [1, 2]}, "b/j")
        b.copy("a", "c")
        b.save_batch([np.zeros(3, np.int8)] * 3, ["d/1", "d/2", "d/3"])  # a kind seen before
        files, kinds = _kind_rows(catalog_url)
        assert len(files) == 10
        for kind_id, *columns in files:
            assert kind_id == kind_key(tuple(columns))[0]  # type: ignore[arg-type]
        # One row per distinct kind, whatever was saved again.
        assert sorted(kinds) == sorted({kind_key(tuple(c)) for _, *c in files})  # type: ignore[arg-type]
        assert len(kinds) == 4
        report = b.fsck()
        assert report.ok, str(report)
        assert report.without_kind == 0
        np.testing.assert_array_equal(b.load_batch(["c/y", "d/2"])[0], np.arange(4.0))


def test_a_file_without_a_kind_id_loads_from_its_own_columns(catalog_url: str) -> None:
    with SQLBackend(catalog_url) as b:
        b.save_batch([np.arange(5), np.arange(6), "s"], ["f/a", "f/b", "f/s"])
        _execute(catalog_url, "UPDATE polystore_nodes SET kind_id = NULL WHERE name = 'b'")
    with SQLBackend(catalog_url) as fresh:
        np.testing.assert_array_equal(fresh.load("f/b"), np.arange(6))
        a, b_, s = fresh.load_batch(["f/a", "f/b", "f/s"])
        np.testing.assert_array_equal(a, np.arange(5))
        np.testing.assert_array_equal(b_, np.arange(6))
        assert s == "s"
        report = fresh.fsck()
        assert report.ok and report.without_kind == 1, str(report)
        assert "1 files have no kind id" in str(report)


def test_fsck_reports_a_kind_id_that_does_not_match(catalog_url: str) -> None:
    with SQLBackend(catalog_url) as b:
        b.save_batch([np.arange(5), "s", "t"], ["f/a", "f/s", "f/t"])
        wrong = kind_key(("str", 1, None, None, None))[0]
        _execute(catalog_url, "UPDATE polystore_nodes SET kind_id = :k WHERE name = 'a'", k=wrong)
        _execute(catalog_url, "UPDATE polystore_nodes SET kind_id = 12345 WHERE name = 't'")
        report = b.fsck()
        assert not report.ok
        assert report.kind_mismatch == {12345: 1, wrong: 1}
        assert f"kind id {wrong} of 1 files does not match" in str(report)


def test_an_id_taken_by_another_kind_is_refused_and_nothing_is_written(catalog_url: str) -> None:
    kind_id, _ = kind_key(("str", 1, None, None, None))
    with SQLBackend(catalog_url) as b:
        b.save(np.arange(3), "kept")
        _execute(
            catalog_url,
            "INSERT INTO polystore_kinds (id, key, serializer, serializer_version) "
            "VALUES (:id, '[\"other\"]', 'other', 1)",
            id=kind_id,
        )
        before = _kind_rows(catalog_url)
        with pytest.raises(SerializationError, match="has the id"):
            b.save_batch([np.arange(2), "a string"], ["x/new", "x/s"])
        assert _kind_rows(catalog_url) == before
        assert not b.exists("x")
        np.testing.assert_array_equal(b.load("kept"), np.arange(3))


@pytest.mark.parametrize("size", [64, SHARED_ARRAY_BYTES * 2], ids=["small", "large"])
def test_a_reader_learns_kinds_written_after_it_started(catalog_url: str, size: int) -> None:
    # The reader knows the catalog's kinds from its first batch; another writer
    # then adds a kind, which the reader reads when it meets it (on SQLite)
    # or before it streams, having seen the kinds change (on PostgreSQL).
    count = 250  # several chunks of a streamed result
    old = [np.full(4, i, np.int16) for i in range(count)]
    new = [np.full(size // 8, i, np.float64) for i in range(count)]
    with SQLBackend(catalog_url) as writer, SQLBackend(catalog_url) as reader:
        writer.save_batch(old, [f"d/old{i:03}" for i in range(count)])
        reader.load_batch(["d/old000"])
        writer.save_batch(new, [f"d/new{i:03}" for i in range(count)])
        names = [f"d/{kind}{i:03}" for i in range(count) for kind in ("new", "old")]
        loaded = reader.load_batch(names)
        for i in range(count):
            np.testing.assert_array_equal(loaded[2 * i], new[i])
            np.testing.assert_array_equal(loaded[2 * i + 1], old[i])
        np.testing.assert_array_equal(reader.load(f"d/new{count - 1:03}"), new[-1])


def test_a_fresh_reader_learns_many_kinds_in_few_queries(
    catalog_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = [np.zeros(i + 1, np.uint8) for i in range(600)]  # 600 shapes: 600 kinds
    with SQLBackend(catalog_url) as b:
        b.save_batch(values, [f"k/{i}" for i in range(600)])
        assert len(_kind_rows(catalog_url)[1]) == 600
    issued = _count_queries(monkeypatch)
    with SQLBackend(catalog_url) as fresh:
        loaded = fresh.load_batch([f"k/{i}" for i in range(600)])
        for value, got in zip(values, loaded, strict=True):
            np.testing.assert_array_equal(got, value)
    # One query per chunk of names (500) on SQLite, all at once before a stream.
    assert 1 <= len([sql for sql in issued if "FROM polystore_kinds" in sql]) <= 2


def _count_queries(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The SQL of every fast-path fetch and stream, as issued."""
    from polystore.backends.sql import fast

    issued: list[str] = []
    fetch, stream = fast.FastReader.fetch_raw, fast.FastReader.stream_raw

    def counting_fetch(self: Any, sql: str, params: Any) -> Any:
        issued.append(sql)
        return fetch(self, sql, params)

    def counting_stream(self: Any, sql: str, params: Any, size: int) -> Any:
        issued.append(sql)
        return stream(self, sql, params, size)

    monkeypatch.setattr(fast.FastReader, "fetch_raw", counting_fetch)
    monkeypatch.setattr(fast.FastReader, "stream_raw", counting_stream)
    return issued


def test_a_batch_reads_lean_rows_and_only_the_odd_files_in_full(
    catalog_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from polystore.backends.sql.fast import LEAN_COLUMNS

    arrays = [np.full(8, i, np.int32) for i in range(1200)]
    names = [f"p/{i:04}" for i in range(1200)]
    with SQLBackend(catalog_url) as b:
        b.save_batch([*arrays, b"x" * (SHARED_ARRAY_BYTES + 1)], [*names, "p/large"])
        b.ensure_directory("p/sub")
        b.load_batch(names[:1])  # (warm: connections, kinds)
        issued = _count_queries(monkeypatch)
        for value, loaded in zip(arrays, b.load_batch(names), strict=True):
            np.testing.assert_array_equal(loaded, value)
        lean = [sql for sql in issued if LEAN_COLUMNS in sql]
        other = [sql for sql in issued if "polystore_kinds" not in sql]  # (a stream counts kinds)
        chunks = 1 if b.engine.dialect.name == "postgresql" and b._fast.streams else 3
        assert (len(other), len(lean)) == (1 + chunks, chunks)  # (and p's id)

        issued.clear()
        values = b.load_batch(["p/0001", "p/large", "p/0001"])
        assert values[2] is not values[0]  # a path asked for twice: two arrays
        np.testing.assert_array_equal(values[2], arrays[1])
        assert values[1] == b"x" * (SHARED_ARRAY_BYTES + 1)
        full = [sql for sql in issued if LEAN_COLUMNS not in sql and "n.name" in sql]
        assert len(full) == 1  # the repeated path, read once more in full

        issued.clear()
        with pytest.raises(IsADirectoryError):
            b.load_batch(["p/0002", "p/sub"])
        assert len([sql for sql in issued if LEAN_COLUMNS not in sql and "n.name" in sql]) == 1


def test_writers_adding_the_same_new_kind_at_once_both_succeed(catalog_url: str) -> None:
    # The first holds its new kind row uncommitted while the second adds the
    # same kind: the second waits (PostgreSQL's ON CONFLICT, SQLite's write
    # lock), then finds the row and goes on.
    import threading

    first_value, second_value = np.arange(7, dtype=np.uint16), np.arange(7, 14, dtype=np.uint16)
    with SQLBackend(catalog_url) as first, SQLBackend(catalog_url) as second:
        errors: list[BaseException] = []

        def save_second() -> None:
            try:
                second.save(second_value, "two/x")
            except BaseException as error:  # noqa: BLE001 -- reported below
                errors.append(error)

        with first.transaction():
            first.save(first_value, "one/x")
            writer = threading.Thread(target=save_second)
            writer.start()
            writer.join(0.5)
            blocked = writer.is_alive()
        writer.join(30)
        assert not writer.is_alive() and not errors, errors
        assert blocked  # it could not go on before the first committed
        np.testing.assert_array_equal(first.load_batch(["two/x"])[0], second_value)
        np.testing.assert_array_equal(second.load_batch(["one/x"])[0], first_value)
        assert len(_kind_rows(catalog_url)[1]) == 1
        assert first.fsck().ok


@pytest.mark.parametrize("kinds", [300, 4_100], ids=["read-whole", "too-many-to-read-whole"])
def test_kinds_added_meanwhile_are_read_in_few_queries(
    catalog_url: str, monkeypatch: pytest.MonkeyPatch, kinds: int
) -> None:
    # Up to 4,096 kinds, a reader about to stream reads them whole first;
    # past that, the kinds met while streaming are read after it, in chunks.
    values = [np.zeros(i + 1, np.uint8) for i in range(kinds)]
    names = [f"k/{i}" for i in range(kinds)]
    with SQLBackend(catalog_url) as writer, SQLBackend(catalog_url) as reader:
        writer.save(np.arange(3), "first")
        reader.load_batch(["first"])
        writer.save_batch(values, names)
        issued = _count_queries(monkeypatch)
        for value, got in zip(values, reader.load_batch(names), strict=True):
            np.testing.assert_array_equal(got, value)
    learned = [sql for sql in issued if "FROM polystore_kinds" in sql]
    assert 1 <= len(learned) <= 2 + kinds // 500, learned


class _MetaEcho(Serializer):
    """Bytes, with whatever metadata the value brings: ``("M", meta, data)``."""

    name = "metaecho"
    version = 1

    def accepts(self, value: Any) -> bool:
        return isinstance(value, tuple) and len(value) == 3 and value[0] == "M"

    def encode(self, value: Any) -> Encoded:
        return Encoded(self.name, self.version, value[2], meta=value[1])

    def decode(self, data: Any, meta: dict[str, Any]) -> Any:
        return ("M", dict(meta), bytes(data))


@pytest.mark.parametrize(
    "meta",
    [
        {"big": 1e16},
        {"huge": 1e23, "odd": 1.2345678901234567e20},
        {"neg": -0.0},
        {1: "a", "b": 2},
        {"flag": True, "one": 1, "t": (1, 2)},
        {"deep": json.loads("[" * 300 + "]" * 300), "é": "\u2603"},
    ],
    ids=["float-as-int", "inexact-float-as-int", "negative-zero", "int-key", "bool-tuple", "deep"],
)
def test_metadata_as_the_database_gives_it_back_is_one_kind(catalog_url: str, meta: Any) -> None:
    # PostgreSQL's jsonb gives 1e16 back as an integer and -0.0 as 0; JSON
    # turns int keys into strings and tuples into lists. Each is still one
    # kind that fsck finds consistent, and loads give what the column holds.
    registry = SerializerRegistry.default()
    registry.register(_MetaEcho(), first=True)
    stored = json.loads(json.dumps(meta))
    with SQLBackend(catalog_url, serializers=registry) as b:
        b.save_batch([("M", meta, b"abc"), ("M", meta, b"def")], ["x", "y"])
        report = b.fsck()
        assert report.ok and not report.kind_mismatch, str(report)
        assert len(_kind_rows(catalog_url)[1]) == 1
        for loaded in (b.load("x"), *b.load_batch(["x", "y"])):
            assert loaded[0] == "M"
            loose = b.engine.dialect.name == "postgresql"  # (jsonb: 1e16 comes back an int)
            assert same_json(loaded[1], stored, loose_numbers=loose)


def test_fsck_reports_kind_rows_that_do_not_match_their_keys(catalog_url: str) -> None:
    with SQLBackend(catalog_url) as b:
        b.save_batch([np.arange(4), np.arange(4) + 1], ["t/a", "t/b"])
        assert b.fsck().ok
        ints = kind_key(("ndarray", 1, "int64", [4], {"descr": "<i8", "order": "C"}))[0]
        # The files and their row changed alike: only the row's key tells.
        _execute(catalog_url, "UPDATE polystore_kinds SET dtype = 'float32'")
        _execute(catalog_url, "UPDATE polystore_nodes SET dtype = 'float32' WHERE kind = 'file'")
        # And a row no file uses, with a key that is not even ASCII.
        _execute(
            catalog_url,
            "INSERT INTO polystore_kinds (id, key, serializer, serializer_version) "
            "VALUES (5, '[\"\u00e9\"]', 'x', 1)",
        )
        report = b.fsck()
        assert not report.ok and not report.kind_mismatch
        assert report.bad_kinds == [5, ints]
        assert f"kind row {ints} does not match its key" in str(report)


def test_fsck_reports_files_whose_columns_changed_without_their_kind(catalog_url: str) -> None:
    # What a writer that does not keep kind ids leaves (docs/migrations.rst):
    # even 1.0 becoming 1 is another kind.
    registry = SerializerRegistry.default()
    registry.register(_MetaEcho(), first=True)
    with SQLBackend(catalog_url, serializers=registry) as b:
        b.save_batch([("M", {"n": 1.0}, b"a"), ("M", {"n": 1.0}, b"b")], ["x", "y"])
        assert b.fsck().ok
        _execute(catalog_url, """UPDATE polystore_nodes SET meta = '{"n": 1}' WHERE name = 'x'""")
        report = b.fsck()
        assert list(report.kind_mismatch.values()) == [1], str(report)


def test_same_json_tells_bools_from_numbers_and_ints_from_floats() -> None:
    assert same_json({"a": [1, 2.5, {"b": None}]}, {"a": [1, 2.5, {"b": None}]})
    assert not same_json([1], [1.0]) and same_json([1e23], [10**23], loose_numbers=True)
    assert not same_json([True], [1], loose_numbers=True)
    assert not same_json([0], [False], loose_numbers=True)
    assert not same_json([10**400], [1e308], loose_numbers=True)
    assert not same_json({"a": 1}, {"a": 1, "b": 2}) and not same_json([1], [1, 1])
    assert not same_json("1", 1) and same_json(-0.0, 0, loose_numbers=True)

    def deep(depth: int, last: Any) -> list[Any]:
        outer: list[Any] = []
        inner = outer
        for _ in range(depth):  # deeper than Python recurses
            inner.append([])
            inner = inner[0]
        inner.append(last)
        return outer

    assert same_json(deep(5000, 1), deep(5000, 1))
    assert not same_json(deep(5000, 1), deep(5000, 2))


def test_a_stream_reads_the_kinds_again_only_when_some_were_added(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def whole_reads(issued: list[str]) -> int:
        return len([sql for sql in issued if "FROM polystore_kinds" in sql and "LIMIT" in sql])

    names = [f"s/{i}" for i in range(300)]
    with SQLBackend(pg_url) as b:
        assert b._fast.streams  # (psycopg[binary] brings libpq 17 or later)
        b.save_batch([np.arange(5)] * len(names), names)
        b.load_batch(names[:1])
        issued = _count_queries(monkeypatch)
        b.load_batch(names)
        assert whole_reads(issued) == 1  # only the count, capped (no kind read again)
        b.save(np.arange(5.0), "s/new kind")
        issued.clear()
        assert b.load_batch(["s/new kind"])[0].dtype == np.float64
        assert whole_reads(issued) == 2  # the count, then every kind


def test_large_files_of_a_kind_met_during_a_stream_in_a_catalog_of_many_kinds(
    catalog_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Past 4,096 kinds a reader does not read them all before it streams: the
    # large files of a kind it meets then are read again in full and decoded
    # once the snapshot ends, their kind read in the same query as the rest.
    many = [np.zeros(i + 1, np.uint8) for i in range(4_100)]
    large = [np.full(SHARED_ARRAY_BYTES // 4, i, np.float64) for i in range(20)]
    with SQLBackend(catalog_url) as writer, SQLBackend(catalog_url) as reader:
        writer.save_batch(many, [f"many/{i}" for i in range(len(many))])
        reader.load_batch(["many/0"])
        writer.save_batch(large, [f"large/{i}" for i in range(len(large))])
        issued = _count_queries(monkeypatch)
        loaded = reader.load_batch([f"large/{i}" for i in range(len(large))])
        for value, got in zip(large, loaded, strict=True):
            np.testing.assert_array_equal(got, value)
    assert len([sql for sql in issued if "FROM polystore_kinds WHERE" in sql]) == 1
