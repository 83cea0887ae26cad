"""Batch decoders: ``load_batch`` decodes each kind of file in a chunk with one call.

Small C-ordered arrays come back as views into buffers they share with their
neighbours (one copy for many); everything else is decoded one by one. Either
way the values must be exactly what single loads give.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from polystore import IntegrityError, SerializationError
from polystore.backends.sql import SQLBackend
from polystore.serializers import (
    SHARED_ARRAY_BYTES,
    SHARED_BUFFER_BYTES,
    Encoded,
    NDArraySerializer,
    Serializer,
    SerializerRegistry,
)
from polystore.testing.samples import assert_values_equal, samples


def _arrays() -> dict[str, Any]:
    values = samples("array")
    values.update(
        scalar=np.float32(2.5),
        datetime=np.array(["2026-12-01", "1970-01-01"], dtype="datetime64[D]"),
        timedelta=np.array([1, -2], dtype="timedelta64[ms]"),
        structured=np.array([(1, 2.0), (3, 4.0)], dtype=[("a", "<i4"), ("b", ">f8")]),
        subarray=np.zeros(3, dtype=np.dtype((np.int16, (2,)))),
        over_shared_limit=np.arange(SHARED_ARRAY_BYTES // 8 + 1, dtype=np.int64),
    )
    return values


def _decoder_meta(encoded: Encoded) -> dict[str, Any]:
    # What a backend hands a decoder: the recorded meta plus dtype and shape.
    meta = dict(encoded.meta)
    meta["shape"] = list(encoded.shape or ())
    meta["dtype"] = encoded.dtype
    return meta


def _encode_many(value: Any, count: int) -> tuple[dict[str, Any], list[bytes]]:
    registry = SerializerRegistry.default()
    encoded = [registry.encode(value) for _ in range(count)]
    return _decoder_meta(encoded[0]), [bytes(e.data) for e in encoded]


@pytest.mark.parametrize("name", sorted(_arrays()))
def test_batch_decoding_gives_what_single_decoding_gives(name: str) -> None:
    value = _arrays()[name]
    meta, datas = _encode_many(value, 3)
    registry = SerializerRegistry.default()
    many = registry.batch_decoder("ndarray", meta)(datas)
    one = registry.decoder("ndarray", meta)
    assert len(many) == 3
    for got, data in zip(many, datas, strict=True):
        expected = one(data)
        assert type(got) is type(expected)
        if isinstance(value, np.ndarray):
            assert_values_equal(got, value, name)
        else:
            assert got == expected


def test_small_arrays_share_bounded_buffers_and_stay_independent() -> None:
    per_buffer = SHARED_BUFFER_BYTES // 4096
    arrays = [np.full(1024, i, dtype=np.float32) for i in range(per_buffer + 3)]
    registry = SerializerRegistry.default()
    encoded = [registry.encode(a) for a in arrays]
    decode_many = registry.batch_decoder("ndarray", _decoder_meta(encoded[0]))
    loaded = decode_many([bytes(e.data) for e in encoded])

    bases = {id(a.base) for a in loaded}
    assert len(bases) == 2  # one full buffer and the rest: not one copy per array
    for a in loaded:
        assert a.base is not None and a.base.nbytes <= SHARED_BUFFER_BYTES
        assert a.flags.writeable and a.shape == (1024,)
    loaded[0][:] = -1  # a write reaches its own array only
    assert loaded[1][0] == 1 and loaded[0][0] == -1
    for i, a in enumerate(loaded[1:], start=1):
        assert (a == i).all()


@pytest.mark.parametrize(
    "contents",
    [
        pytest.param(lambda good: [good, good + b"\x00" * 4], id="one-longer"),
        # A view whose len() (items) is the byte size the array needs, but which
        # holds twice as many bytes: must not shift its neighbours' bytes.
        pytest.param(
            lambda good: [memoryview(np.frombuffer(good * 2, np.uint16)), good], id="wide-view"
        ),
        # len() of a view counts its first dimension: 1,024 here for 0 bytes
        # and for 8 KiB; together they make up two contents' bytes.
        pytest.param(
            lambda good: [
                memoryview(np.zeros((4096, 0), np.uint8)),
                memoryview(np.frombuffer(good * 2, np.uint8).reshape(4096, 2)),
            ],
            id="views-that-make-up-the-total",
        ),
    ],
)
def test_contents_of_unexpected_size_decode_one_by_one(contents: Any) -> None:
    meta, (good,) = _encode_many(np.arange(1024, dtype=np.float32), 1)
    datas = contents(good)
    registry = SerializerRegistry.default()
    one = registry.decoder("ndarray", meta)
    decode_many = registry.batch_decoder("ndarray", meta)
    try:
        expected = [one(data) for data in datas]
    except SerializationError:
        with pytest.raises(SerializationError):
            decode_many(datas)
        return
    for got, want in zip(decode_many(datas), expected, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("extra", [0, 4])
def test_a_short_content_still_raises_serialization_error(extra: int) -> None:
    """Also when a longer one makes up the total: bytes never shift between arrays."""
    meta, (good,) = _encode_many(np.arange(1024, dtype=np.float32), 1)
    decode_many = SerializerRegistry.default().batch_decoder("ndarray", meta)
    with pytest.raises(SerializationError, match="ndarray"):
        decode_many([good + b"\x00" * extra, good[:-4]])


def test_a_subclass_that_decodes_its_own_way_is_not_bypassed() -> None:
    class Tagged(NDArraySerializer):
        def decoder(self, meta: dict[str, Any]) -> Any:
            plain = super().decoder(meta)
            return lambda data: ("tagged", plain(data))

    registry = SerializerRegistry.default()
    registry.register(Tagged())
    meta, datas = _encode_many(np.arange(4, dtype=np.int32), 2)
    assert [tag for tag, _ in registry.batch_decoder("ndarray", meta)(datas)] == ["tagged"] * 2


class _Upper(Serializer):
    """A str serializer with a batch decoder of its own (to test the contract)."""

    name = "upper"

    def __init__(self, drop_one: bool = False) -> None:
        self.drop_one = drop_one

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str)

    def encode(self, value: Any) -> Encoded:
        return Encoded(self.name, self.version, value.encode())

    def decode(self, data: Any, meta: dict[str, Any]) -> Any:
        return bytes(data).decode().upper()

    def batch_decoder(self, meta: dict[str, Any]) -> Any:
        def decode_many(datas: Any) -> list[str]:
            out = [bytes(d).decode().upper() for d in datas]
            return out[1:] if self.drop_one else out

        return decode_many


def _upper_registry(drop_one: bool = False) -> SerializerRegistry:
    registry = SerializerRegistry.default()
    registry.register(_Upper(drop_one), first=True)
    return registry


class _Interrupting(_Upper):
    """``_Upper`` that runs ``interrupt`` once, at its first batch decode."""

    def __init__(self, interrupt: Callable[[], None]) -> None:
        super().__init__()
        self.interrupt: Callable[[], None] | None = interrupt

    def batch_decoder(self, meta: dict[str, Any]) -> Any:
        decode_many = super().batch_decoder(meta)

        def interrupted(datas: Any) -> list[str]:
            if self.interrupt is not None:
                interrupt, self.interrupt = self.interrupt, None
                interrupt()
            return decode_many(datas)  # type: ignore[no-any-return]

        return interrupted


def test_load_batch_uses_a_serializers_batch_decoder(catalog_url: str) -> None:
    with SQLBackend(catalog_url, serializers=_upper_registry()) as b:
        b.save_batch(["a", "b", "c"], ["t/a.txt", "t/b.txt", "t/c.txt"])
        assert b.load_batch(["t/c.txt", "t/a.txt", "t/b.txt"]) == ["C", "A", "B"]


def test_a_batch_decoder_that_loses_values_raises(catalog_url: str) -> None:
    with SQLBackend(catalog_url, serializers=_upper_registry(drop_one=True)) as b:
        b.save_batch(["a", "b"], ["t/a.txt", "t/b.txt"])
        with pytest.raises(SerializationError, match="decoded 1 values from 2"):
            b.load_batch(["t/a.txt", "t/b.txt"])


def test_load_batch_of_mixed_kinds_over_several_chunks(catalog_url: str) -> None:
    """Kinds interleave within chunks of 500; every value comes back in request order."""
    values: list[Any] = []
    for i in range(1200):
        values.append(
            [
                np.full(16, i, dtype=np.float32),
                np.full((2, 3), i, dtype=">i8"),
                {"i": i},
                f"text {i}",
                np.asfortranarray(np.full((2, 2), i, dtype=np.int16)),
            ][i % 5]
        )
    names = [f"mixed/{i:05d}.bin" for i in range(len(values))]
    order = names[::-1] + names[:7]  # reversed, with repeats
    expected = values[::-1] + values[:7]
    with SQLBackend(catalog_url) as b:
        b.save_batch(values, names)
        loaded = b.load_batch(order)
    with SQLBackend(catalog_url, verify_inline=True) as b:
        verified = b.load_batch(order)
    for got, check, want in zip(loaded, verified, expected, strict=True):
        assert_values_equal(got, want)
        assert_values_equal(check, want)


def _load_peak(backend: SQLBackend, names: list[str]) -> tuple[int, int]:
    """(bytes of the arrays load_batch returned, peak bytes traced while it ran)."""
    import tracemalloc

    tracemalloc.start()
    try:
        loaded = backend.load_batch(names)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return sum(a.nbytes for a in loaded), peak


@pytest.mark.parametrize(
    ("size", "verify"),
    [
        (256 * 1024, False),  # decoded one by one
        (16 * 1024, False),  # decoded in groups
        (16 * 1024, True),  # hashed, then decoded one by one
    ],
)
def test_load_batch_holds_one_copy_of_the_batch(catalog_url: str, size: int, verify: bool) -> None:
    """The driver's bytes of each row are freed as it is decoded: no second copy builds up."""
    count = (48 * 1024 * 1024) // size
    arrays = [np.full(size // 8, i, dtype=np.float64) for i in range(count)]
    names = [f"m/{i:05d}.npy" for i in range(count)]
    with SQLBackend(catalog_url) as b:
        b.save_batch(arrays, names)
    with SQLBackend(catalog_url, verify_inline=verify) as b:
        b.load_batch(names[:1])  # (warm: connections, decoders)
        total, peak = _load_peak(b, names)
    assert total == count * size
    assert peak < 1.25 * total, f"peak {peak / total:.2f}x the batch"


@pytest.mark.parametrize("size", [256 * 1024, 16 * 1024], ids=["large", "small"])
def test_a_kind_added_after_the_reader_started_holds_no_second_copy(
    catalog_url: str, size: int
) -> None:
    """The reader learns the new kind before it streams, so no file waits with its bytes."""
    count = (48 * 1024 * 1024) // size
    arrays = [np.full(size // 8, i, dtype=np.float64) for i in range(count)]
    names = [f"m/{i:05d}.npy" for i in range(count)]
    with SQLBackend(catalog_url) as writer, SQLBackend(catalog_url) as reader:
        writer.save(np.arange(3), "other/kind")
        reader.load_batch(["other/kind"])  # (warm: connections, the one kind there is)
        writer.save_batch(arrays, names)
        total, peak = _load_peak(reader, names)
    assert total == count * size
    assert peak < 1.25 * total, f"peak {peak / total:.2f}x the batch"


def _many_arrays(count: int) -> tuple[list[np.ndarray], list[str]]:
    return [np.full(64, i, dtype=np.int64) for i in range(count)], [
        f"s/{i // 700}/{i:05d}.npy" for i in range(count)
    ]


def test_load_batch_without_streamed_results(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a libpq older than 17 results cannot stream: one query per chunk of names."""
    from polystore.backends.sql import fast

    def no_stream(*_: Any) -> Any:
        raise AssertionError("stream_raw used without chunked streaming")

    monkeypatch.setattr(fast, "_streams_in_chunks", lambda: False)
    monkeypatch.setattr(fast.FastReader, "stream_raw", no_stream)
    arrays, names = _many_arrays(1500)
    with SQLBackend(pg_url) as b:
        b.save_batch(arrays, names)
        for got, want in zip(b.load_batch(names[::-1]), arrays[::-1], strict=True):
            np.testing.assert_array_equal(got, want)


def test_an_error_mid_batch_leaves_the_backend_usable(catalog_url: str) -> None:
    """A damaged file deep in a streamed batch raises; the next loads see the catalog."""
    arrays, names = _many_arrays(1500)
    with _own_backend(catalog_url) as b:
        b.save_batch(arrays, names)
        with b.engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE polystore_blobs SET data = :d WHERE hash = :h"),
                {"d": b"short", "h": b.stat(names[1234]).hash},
            )
        with pytest.raises(IntegrityError, match="records 512"):
            b.load_batch(names)
        sessions = _sessions(b)
        assert len(sessions) >= (b.engine.dialect.name == "postgresql")
        kept = names[:1234] + names[1235:]
        for _ in range(2):
            got = b.load_batch(kept)
            assert [int(a[0]) for a in got] == [int(a[0]) for a in arrays if a[0] != 1234]
        # The stream stopped early was cancelled, and its session is reused:
        # no session was dropped for a new one.
        assert _sessions(b) == sessions


def _own_backend(url: str, **options: Any) -> SQLBackend:
    """A backend whose PostgreSQL sessions carry a name of their own.

    :func:`_sessions` counts (and tests end) only those: other test runs may
    share the server.
    """
    if url.startswith("postgresql"):
        name = f"ps-decode-{uuid.uuid4().hex[:12]}"
        options["engine_options"] = {"connect_args": {"application_name": name}}
    return SQLBackend(url, **options)


def _sessions(b: SQLBackend, which: str = "") -> set[int]:
    """The backend's other PostgreSQL sessions, or those of them ``which`` picks (SQLite: none)."""
    if b.engine.dialect.name != "postgresql":
        return set()
    sql = (
        "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
        "AND application_name = current_setting('application_name')"
    )
    with b.engine.connect() as conn:
        return set(conn.execute(sa.text(f"{sql} {which}")).scalars())


def _streaming_sessions(b: SQLBackend) -> set[int]:
    """Sessions whose last query fetched children by name."""
    return _sessions(b, "AND query LIKE '%string_to_array(%'")


def _end_streaming_sessions(b: SQLBackend) -> None:
    if b.engine.dialect.name == "postgresql":
        with b.engine.begin() as conn:
            for pid in _streaming_sessions(b):
                conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})


def _load_in_a_thread(b: SQLBackend, names: list[str], hung: str) -> list[Any]:
    """``b.load_batch(names)`` in a thread of its own: a load that hangs fails the test."""
    import threading

    outcome: list[Any] = []
    worker = threading.Thread(target=lambda: outcome.append(b.load_batch(names)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    if worker.is_alive():
        # Not closed: closing would wait for the stuck connection too. The
        # server's sessions end, so the schema can be dropped.
        _end_streaming_sessions(b)
        pytest.fail(hung)
    return outcome


def test_a_connection_lost_mid_stream_falls_back(pg_url: str) -> None:
    """The server ends the fast path's session between chunks: the batch still loads."""
    values = [f"{i:05d}" + "x" * 16_000 for i in range(2000)]
    names = [f"t/{i:05d}.txt" for i in range(len(values))]
    killed: list[int] = []

    def kill_the_stream() -> None:
        with b.engine.begin() as conn:
            killed.extend(
                conn.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE pid <> pg_backend_pid() AND state = 'active' "
                        "AND application_name = current_setting('application_name') "
                        "AND query LIKE '%string_to_array%'"
                    )
                ).scalars()
            )

    registry = SerializerRegistry.default()
    interrupting = _Interrupting(kill_the_stream)
    registry.register(interrupting, first=True)
    with _own_backend(pg_url, serializers=registry) as b:
        b.save_batch(values, names)
        assert b.load_batch(names) == [v.upper() for v in values]
        assert killed == [True], "the streaming query was not running"


def test_a_serializer_may_read_the_catalog_while_a_batch_streams(catalog_url: str) -> None:
    """A batch decoder that loads from the same backend (same thread) gets its answer."""

    seen: list[Any] = []
    registry = SerializerRegistry.default()
    registry.register(
        _Interrupting(lambda: seen.extend([b.load("n/other.bin"), *b.load_batch(["n/x.bin"])])),
        first=True,
    )
    values = [f"{i:05d}" for i in range(1500)]
    names = [f"t/{i:05d}.txt" for i in range(len(values))]
    b = _own_backend(catalog_url, serializers=registry)
    b.save_batch([*values, b"other", b"x"], [*names, "n/other.bin", "n/x.bin"])
    # In a thread of its own, so that a read waiting for the stream fails the test.
    outcome = _load_in_a_thread(b, names, "load_batch hung on a read from its batch decoder")
    b.close()
    assert outcome == [[v.upper() for v in values]]
    assert seen == [b"other", b"x"]


@pytest.mark.parametrize("where", ["in the batch decoder", "from another thread"])
def test_closing_the_backend_while_a_batch_streams(catalog_url: str, where: str) -> None:
    """close() does not wait for the stream's connection (locked by its driver) to be free."""
    import threading

    values = [f"{i:05d}" + "x" * 16_000 for i in range(2000)]
    names = [f"t/{i:05d}.txt" for i in range(len(values))]
    closers: list[threading.Thread] = []

    def close() -> None:
        if where == "in the batch decoder":
            b.close()
        else:
            closers.append(threading.Thread(target=b.close, daemon=True))
            closers[0].start()
            closers[0].join(timeout=30)

    registry = SerializerRegistry.default()
    registry.register(_Interrupting(close), first=True)
    b = _own_backend(catalog_url, serializers=registry)
    b.save_batch(values, names)
    outcome = _load_in_a_thread(b, names, "close() during load_batch hung")
    assert not any(t.is_alive() for t in closers), "close() waited for the stream"
    assert outcome == [[v.upper() for v in values]]
    assert _streaming_sessions(b) == set(), "the stream's connection was not closed"
    b.close()


def test_no_stream_where_a_statement_timeout_applies(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A streamed query is active while the batch decodes: a timeout would cut it short."""
    from polystore.backends.sql import fast

    def no_stream(*_: Any) -> Any:
        raise AssertionError("streamed under a statement_timeout")

    monkeypatch.setattr(fast.FastReader, "stream_raw", no_stream)
    arrays, names = _many_arrays(1200)
    with SQLBackend(f"{pg_url}%20-cstatement_timeout%3D60000") as b:
        b.save_batch(arrays, names)
        for got, want in zip(b.load_batch(names), arrays, strict=True):
            np.testing.assert_array_equal(got, want)
