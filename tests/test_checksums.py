"""Piece checksums of external content: recorded on save, checked on every load.

The piece size is made 4 KiB here (the stored value says its piece size, so
any size reads back), so that content of many pieces stays small.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from polystore import SQLBackend
from polystore.backends.sql import checksums
from polystore.blobs.base import BlobStore
from polystore.blobs.local import LocalBlobStore
from polystore.errors import IntegrityError
from polystore.hashing import NEW_CATALOGS

PIECE = 4096


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checksums, "PIECE", PIECE)


def sha(data: bytes) -> str:
    """The name a catalog made now gives ``data`` (and a valid object name in any store)."""
    return NEW_CATALOGS.of(data)


def digests(data: bytes, piece: int = PIECE) -> list[int]:
    return [xxhash.xxh3_64_intdigest(data[i : i + piece]) for i in range(0, len(data), piece)]


def expected(data: bytes, piece: int = PIECE) -> bytes:
    found = digests(data, piece)
    return bytes([1, piece.bit_length() - 1]) + struct.pack(f">{len(found)}Q", *found)


def payload(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def recorded(backend: SQLBackend, content_hash: str) -> Any:
    with backend.engine.connect() as conn:
        value = conn.execute(
            sa.text("SELECT checksums FROM polystore_blobs WHERE hash = :h"), {"h": content_hash}
        ).scalar()
    return None if value is None else bytes(value)


def set_recorded(backend: SQLBackend, content_hash: str, value: bytes | None) -> None:
    with backend.engine.begin() as conn:  # behind polystore's back
        conn.execute(
            sa.text("UPDATE polystore_blobs SET checksums = :c WHERE hash = :h"),
            {"c": value, "h": content_hash},
        )


def damage(store: BlobStore, content_hash: str, at: int) -> None:
    """Flip one byte of the stored object, through the store's own interface."""
    with store.open(content_hash) as reader:
        data = bytearray(reader.readall())
    data[at] ^= 0xFF
    store.replace(content_hash, [data], len(data))


@pytest.fixture
def backend(catalog_url: str, tmp_path: Any, open_backend: Callable[..., SQLBackend]) -> SQLBackend:
    return open_backend(
        catalog_url, blob_store=LocalBlobStore(tmp_path / "blobs"), inline_limit=100
    )


# -- the value itself ----------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=3 * PIECE + 7), st.lists(st.integers(1, 2 * PIECE), max_size=12))
def test_chunked_checksums_match_whole_ones(data: bytes, cuts: list[int]) -> None:
    summer = checksums.Checksummer()
    at = 0
    for cut in cuts:
        summer.update(data[at : at + cut])
        at += cut
    summer.update(data[at:])
    assert summer.value() == expected(data)


def test_stored_values_decode_to_their_digests() -> None:
    data = payload(20 * PIECE + 5)
    whole = checksums.Checksummer()
    whole.update(data)
    assert whole.value() == expected(data)
    assert checksums.decode(expected(data), len(data)) == (PIECE, digests(data))
    # The piece size is read from the value, not assumed.
    assert checksums.decode(expected(data, 1 << 20), len(data)) == (1 << 20, digests(data, 1 << 20))


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"\x01",
        b"\x02\x0c" + bytes(8),  # an unknown format
        b"\x01\x05" + bytes(8),  # a piece size out of range
        b"\x01\x0c" + bytes(16),  # two pieces for content of one
        b"\x01\x0c" + bytes(7),  # a digest cut short
    ],
)
def test_values_this_version_cannot_check_are_not_used(value: bytes) -> None:
    assert checksums.decode(value, 100) is None
    assert checksums.decode(None, 100) is None


# -- saved, loaded, damaged --------------------------------------------------------


VALUES: dict[str, Callable[[], Any]] = {
    "bytes": lambda: payload(7 * PIECE + 3, 1),
    "array": lambda: np.arange(5 * PIECE, dtype=np.int32).reshape(-1, 64),
    "str": lambda: "polystore " * 3000,
}


def same(a: Any, b: Any) -> bool:
    return bool(np.array_equal(a, b)) if isinstance(a, np.ndarray) else a == b


@pytest.mark.parametrize("kind", sorted(VALUES))
def test_external_content_records_checksums_and_a_damaged_byte_is_refused(
    backend: SQLBackend, kind: str
) -> None:
    value = VALUES[kind]()
    backend.save(value, "x")
    backend.save(b"small", "inline")
    content_hash = backend.stat("x").hash
    assert content_hash is not None
    store = backend.blob_store
    assert store is not None
    with store.open(content_hash) as reader:
        stored = reader.readall()
    assert recorded(backend, content_hash) == expected(stored)
    assert recorded(backend, backend.stat("inline").hash) is None  # inline: nothing to record
    assert same(backend.load("x"), value)

    last_piece = (len(stored) - 1) // PIECE
    for at, piece in (
        (0, 0),
        (len(stored) // 2, len(stored) // 2 // PIECE),
        (len(stored) - 1, last_piece),
    ):
        damage(store, content_hash, at)
        for load in (lambda: backend.load("x"), lambda: backend.load_batch(["inline", "x"])):
            with pytest.raises(IntegrityError, match="checksum at bytes") as caught:
                load()
            assert f"bytes {piece * PIECE}-" in str(caught.value)
        damage(store, content_hash, at)  # and back
        assert same(backend.load("x"), value)
    report = backend.fsck(verify=True)
    assert report.ok, report


def test_loads_read_the_checksums_with_the_files_row(backend: SQLBackend) -> None:
    """No load looks a blob's checksums up on their own (one query per file)."""
    data = payload(3 * PIECE + 1)
    backend.save(data, "d/x.bin")
    backend.save(b"small", "d/inline.bin")
    lookups: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if " ".join(statement.split()).startswith("SELECT polystore_blobs.checksums"):
            lookups.append(statement)

    sa.event.listen(backend.engine, "before_cursor_execute", seen)
    try:
        assert backend.load("d/x.bin") == data
        assert backend.load("d/x.bin") == data  # (the directory's id cached)
        assert backend.load_batch(["d/inline.bin", "d/x.bin"]) == [b"small", data]
        with backend.transaction():  # the slow path, through SQLAlchemy
            assert backend.load("d/x.bin") == data
            assert backend.load_batch(["d/x.bin"]) == [data]
        snap = backend.snapshot()
        assert backend.at(snap).load("d/x.bin") == data
        assert backend.at(snap).load_batch(["d/x.bin"]) == [data]
    finally:
        sa.event.remove(backend.engine, "before_cursor_execute", seen)
    assert lookups == []


def test_rows_without_checksums_are_checked_by_their_hash(backend: SQLBackend) -> None:
    # As a row written before revision 0007, or by another program.
    data = payload(3 * PIECE)
    backend.save(data, "old")
    content_hash = sha(data)
    set_recorded(backend, content_hash, None)
    assert backend.load("old") == data
    assert backend.fsck(verify=True).ok
    store = backend.blob_store
    assert store is not None
    damage(store, content_hash, 5)
    with pytest.raises(IntegrityError, match="does not match its hash"):
        backend.load("old")
    assert backend.fsck(verify=True).hash_mismatch == [content_hash]


def test_unreadable_checksums_fall_back_to_the_hash_and_fsck_names_them(
    backend: SQLBackend,
) -> None:
    data = payload(3 * PIECE)
    backend.save(data, "f")
    content_hash = sha(data)
    set_recorded(backend, content_hash, b"\x07garbage")
    assert backend.load("f") == data  # checked by its hash instead
    report = backend.fsck(verify=True)
    assert report.checksum_mismatch == [content_hash]
    assert not report.ok
    assert f"wrong piece checksums recorded: {content_hash}" in report.problems()


def test_wrong_checksums_refuse_good_content_and_fsck_names_them(backend: SQLBackend) -> None:
    data = payload(3 * PIECE)
    backend.save(data, "f")
    content_hash = sha(data)
    set_recorded(backend, content_hash, expected(payload(3 * PIECE, seed=9)))
    with pytest.raises(IntegrityError, match="checksum"):
        backend.load("f")
    assert backend.fsck(verify=True).checksum_mismatch == [content_hash]
    assert backend.fsck().ok  # without verify, objects are not read


def test_an_object_already_in_the_store_gets_its_checksums_from_what_is_there(
    backend: SQLBackend,
) -> None:
    # A dead writer's upload (no blob row vouches for it): the save checks it
    # and records the checksums of the bytes it found.
    data = payload(2 * PIECE + 1)
    store = backend.blob_store
    assert store is not None
    store.put(sha(data), [data], len(data))
    backend.save(data, "f")
    assert recorded(backend, sha(data)) == expected(data)
    # A planted object with the wrong bytes is replaced, and the row records the right ones.
    other = payload(2 * PIECE + 1, seed=4)
    store.put(sha(other), [payload(2 * PIECE + 1, seed=5)], len(other))
    backend.save(other, "g")
    assert recorded(backend, sha(other)) == expected(other)
    assert backend.load("g") == other


def test_rebalance_records_checksums_going_out_and_drops_them_coming_in(
    backend: SQLBackend,
) -> None:
    data = payload(3 * PIECE)
    backend.save(data, "f")
    content_hash = sha(data)
    backend.inline_limit = 1 << 20
    backend.rebalance()
    assert recorded(backend, content_hash) is None
    backend.inline_limit = 100
    backend.rebalance()
    assert recorded(backend, content_hash) == expected(data)
    assert backend.load("f") == data


def test_a_load_checks_each_piece_once_as_it_is_read(
    backend: SQLBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = np.arange(40 * PIECE // 8, dtype=np.int64)
    backend.save(data, "big")
    checked: list[int] = []
    digest = checksums._digest

    def counting(piece: Any) -> int:
        checked.append(memoryview(piece).nbytes)
        return digest(piece)

    monkeypatch.setattr(checksums, "_digest", counting)
    assert np.array_equal(backend.load("big"), data)
    assert checked == [PIECE] * 40  # every byte once (arrays are stored as their bytes)


def test_s3_content_is_checked_by_its_checksums(
    catalog_url: str, s3_store: BlobStore, open_backend: Callable[..., SQLBackend]
) -> None:
    backend = open_backend(catalog_url, blob_store=s3_store, inline_limit=100)
    data = payload(5 * PIECE + 1)
    backend.save(data, "f")
    assert recorded(backend, sha(data)) == expected(data)
    assert backend.load("f") == data
    damage(s3_store, sha(data), 3 * PIECE)
    with pytest.raises(IntegrityError, match=f"checksum at bytes {3 * PIECE}-"):
        backend.load("f")
