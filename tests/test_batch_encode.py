"""``save_batch`` encodes repeated C-ordered arrays itself; it must store what the serializer would."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from polystore import SerializationError
from polystore.backends.sql import SQLBackend
from polystore.backends.sql.bulk import LITERALS_FROM
from polystore.serializers import Encoded, NDArraySerializer, Serializer, SerializerRegistry
from polystore.testing.samples import assert_values_equal, samples


def _variants() -> list[Any]:
    """Arrays that share a dtype and shape with a plain one but are laid out otherwise."""
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    wide = np.arange(24, dtype=np.float32).reshape(3, 8)
    return [
        base,
        base + 1,  # the common case: the same kind again
        np.asfortranarray(base + 2),  # same dtype and shape, Fortran order
        wide[:, ::2],  # same dtype and shape, not contiguous
        base.astype(">f4"),  # same shape, other byte order
        base.reshape(4, 3),  # same dtype, other shape
        np.array(["2026-12-01"] * 2, dtype="datetime64[D]"),
        np.array(["2026-12-02"] * 2, dtype="datetime64[D]"),  # refuses the buffer protocol
        np.array(1.5, dtype=np.float32),
        np.array(2.5, dtype=np.float32),  # 0-d twice
        np.empty((0, 4), dtype=np.float32),
        np.empty((0, 4), dtype=np.float32),  # empty twice
        np.float32(3.5),  # a scalar
        np.ma.masked_array([1.0, 2.0]),  # a subclass: the serializers decide
        *samples("array").values(),
        *samples("array").values(),
    ]


def _one_by_one(catalog_url: str, values: list[Any], names: list[str]) -> list[tuple[Any, ...]]:
    with SQLBackend(catalog_url) as b:
        for value, name in zip(values, names, strict=True):
            b.save(value, "single/" + name)
        return [_recorded(b, "single/" + n) for n in names]


def _recorded(b: SQLBackend, path: str) -> tuple[Any, ...]:
    st = b.stat(path)
    return (st.serializer, st.dtype, st.shape, st.size, st.hash)


def test_batch_stores_what_single_saves_store(catalog_url: str) -> None:
    values = _variants()
    names = [f"{i:03d}.npy" for i in range(len(values))]
    expected = _one_by_one(catalog_url, values, names)
    with SQLBackend(catalog_url) as b:
        b.save_batch(values, ["batch/" + n for n in names])
        assert [_recorded(b, "batch/" + n) for n in names] == expected
        loaded = b.load_batch(["batch/" + n for n in names])
        singles = [b.load("batch/" + n) for n in names]
    for value, got, single in zip(values, loaded, singles, strict=True):
        if isinstance(value, np.ma.MaskedArray):
            continue  # stored by whatever accepts it; compared through the catalog above
        assert_values_equal(got, single)
        if isinstance(value, np.ndarray):
            assert_values_equal(got, np.asarray(value))


class _Tagging(NDArraySerializer):
    """Registered first, under its own name: every array must reach it."""

    name = "tagging"

    def encode(self, value: Any) -> Encoded:
        encoded = super().encode(value)
        return Encoded(self.name, 1, encoded.data, encoded.meta, encoded.dtype, encoded.shape)


@pytest.mark.parametrize("first", [True, False])
def test_a_serializer_registered_first_sees_every_array(catalog_url: str, first: bool) -> None:
    registry = SerializerRegistry.default()
    registry.register(_Tagging(), first=first)
    arrays = [np.full(8, i, dtype=np.int32) for i in range(5)]
    with SQLBackend(catalog_url, serializers=registry) as b:
        b.save_batch(arrays, [f"t/{i}.npy" for i in range(5)])
        got = {b.stat(f"t/{i}.npy").serializer for i in range(5)}
    assert got == ({"tagging"} if first else {"ndarray"})


class _Named(Serializer):
    """Bytes under a serializer name chosen by the test (quotes, NUL...)."""

    def __init__(self, name: str) -> None:
        self.name = name  # type: ignore[misc]

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bytes)

    def encode(self, value: Any) -> Encoded:
        return Encoded(self.name, 1, value, {"note": 'it\'s \\ "quoted"; --'}, "x'y", None)

    def decode(self, data: Any, meta: dict[str, Any]) -> Any:
        return bytes(data)


HOSTILE_ATTRS = {
    "quote": "it's",
    "sql": "'); DROP TABLE polystore_nodes; --",
    "backslash": "a\\'b",
    "escaped NUL": "\\u0000 is six characters",
    "unicode": "ünï 🚀",
}


@pytest.mark.parametrize("copies", [1, LITERALS_FROM])
@pytest.mark.parametrize("name", ["o'brien", "plain"])
def test_batch_values_written_into_sql_come_back_exactly(
    catalog_url: str, name: str, copies: int
) -> None:
    """File rows of a batch share their kind's values, which SQLite gets as literals
    when a kind has many rows (bound when few)."""
    registry = SerializerRegistry.default()
    registry.register(_Named(name), first=True)
    structured = np.zeros(2, dtype=[("it's", "<i4"), ('say "hi"', "<f8")])
    other = structured.copy()
    other["it's"] = 5
    values: list[Any] = [b"one", b"two", structured, other] * copies
    paths = [f"q/{i}.bin" for i in range(len(values))]
    with SQLBackend(catalog_url, serializers=registry) as b:
        b.save_batch(values, paths, attrs=HOSTILE_ATTRS)
        for path, value in zip(paths, values, strict=True):
            st = b.stat(path)
            assert st.attrs == HOSTILE_ATTRS
            if isinstance(value, bytes):
                assert (st.serializer, st.dtype) == (name, "x'y")
                assert b.load(path) == value
            else:
                assert st.dtype == str(structured.dtype)
                assert_values_equal(b.load(path), value)
        assert b.count_nodes() == len(values) + 1


def _circular() -> dict[str, Any]:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    return loop


def _deep(leaf: Any, depth: int) -> Any:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


@pytest.mark.parametrize(
    ("name", "version", "dtype", "meta"),
    [
        ("nul\x00name", 1, None, {}),
        ("named", 1, "x\x00y", {}),
        ("named", 1, None, {"k": ["\x00"]}),
        ("named", 1, None, {"k": _deep("\x00", 600)}),
        ("named", 1, None, {"k": float("nan")}),
        ("named", 1, None, {"k": object()}),
        ("named", 1, None, _circular()),
        ("named", 2**63, None, {}),
        ("named", 2**31, None, {}),
        ("named", -1, None, {}),
        ("named", True, None, {}),
    ],
)
def test_what_the_catalog_cannot_hold_is_refused(
    catalog_url: str, name: str, version: Any, dtype: str | None, meta: dict[str, Any]
) -> None:
    """What PostgreSQL cannot hold (NUL, NaN) is a SerializationError on both, nothing written."""

    class Recording(_Named):
        def encode(self, value: Any) -> Encoded:
            return Encoded(self.name, version, value, meta, dtype, None)

    registry = SerializerRegistry.default()
    registry.register(Recording(name), first=True)
    with SQLBackend(catalog_url, serializers=registry) as b:
        b.save("kept", "keep.txt")  # (a str: not this serializer's)
        before = b.count_nodes()
        with pytest.raises(SerializationError, match=r"NUL|not plain JSON|version"):
            b.save_batch([b"new", b"x"], ["new/a.bin", "new/b.bin"])
        assert b.count_nodes() == before and not b.exists("new")


def test_deep_attrs_are_checked_without_recursion(catalog_url: str) -> None:
    """JSON nests deeper than Python recurses: the NUL check must walk, not recurse."""
    with SQLBackend(catalog_url) as b:
        kept = {"x": _deep("\\u0000 is six characters, not a NUL", 400)}
        b.save(b"1", "deep.bin", attrs=kept)
        assert b.stat("deep.bin").attrs == kept
        with pytest.raises(SerializationError, match="NUL"):
            b.save(b"2", "nul.bin", attrs={"x": _deep("\x00", 900)})
        assert not b.exists("nul.bin")


@pytest.mark.parametrize(
    ("value", "literal"),
    [
        (None, "NULL"),
        (0, "0"),
        (-(2**63), str(-(2**63))),
        (2**63 - 1, str(2**63 - 1)),
        (2**63, None),  # SQLite would read it as REAL
        (True, None),  # an int subclass: bound, as the driver sends it
        ("it's", "'it''s'"),
        ("a\\'b", "'a\\''b'"),
        ("'); DROP TABLE polystore_nodes; --", "'''); DROP TABLE polystore_nodes; --'"),
        ("nul\x00", None),
        ("lone \ud800", None),
        (1.5, None),
        (b"bytes", None),
    ],
)
def test_sql_literals(value: Any, literal: str | None) -> None:
    """The quoting of SQLite batch inserts' shared columns; None means "bind it"."""
    from polystore.backends.sql.bulk import _sql_literal

    assert _sql_literal(value) == literal
    if literal is not None:
        import sqlite3

        assert sqlite3.connect(":memory:").execute(f"SELECT {literal}").fetchone()[0] == value


def test_a_shared_value_with_no_literal_is_bound(sqlite_url: str) -> None:
    """execute_groups falls back to binding; the rows are the same either way."""
    import sqlalchemy as sa

    from polystore.backends.sql.bulk import BulkStatement, params_for

    table = sa.Table("t", sa.MetaData(), sa.Column("a", sa.Text), sa.Column("b", sa.Integer))
    statement = BulkStatement(lambda _: table.insert().values(params_for(list(table.c))), table.c)
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        table.create(conn)
        many = [(i,) for i in range(LITERALS_FROM)]  # (enough rows to take literals)
        statement.execute_groups(conn, [({"a": "nul\x00"}, many), ({"a": "quote'"}, [(-1,)])])
        got = conn.execute(sa.select(table.c.a, table.c.b).order_by(table.c.b)).all()
    engine.dispose()
    assert [tuple(r) for r in got] == [("quote'", -1)] + [("nul\x00", i) for (i,) in many]
