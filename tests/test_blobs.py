"""Blob storage: the stores themselves, placement, dedup, gc, fsck, rebalance, streaming.

Catalog tests run on SQLite and PostgreSQL (``catalog_url``), most of them with
both external stores: a local directory and S3 (a moto server on 127.0.0.1 that
the tests start, reached through the same obstore client users run).
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from polystore import (
    FileManager,
    IntegrityError,
    NotFoundError,
    ReadOnlyError,
    SerializationError,
)
from polystore.backends.sql import SQLBackend
from polystore.blobs import (
    OWNER_KEY,
    BlobStore,
    LocalBlobStore,
    S3BlobStore,
    StoreOwner,
    from_url,
    hash_key,
)
from polystore.errors import BackendConfigError, UnsupportedOperationError
from polystore.hashing import NEW_CATALOGS

LIMIT = 64  # bytes: small enough that most test values go external


def sha(data: bytes) -> str:
    """The name a catalog made now gives ``data`` (and a valid object name in any store)."""
    return NEW_CATALOGS.of(data)


def payload(seed: int, size: int = 1000) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


@pytest.fixture(params=["local", "s3"])
def blob_store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    store = request.getfixturevalue("s3_store")
    assert isinstance(store, S3BlobStore)
    return store


@pytest.fixture
def backend(catalog_url: str, blob_store: BlobStore) -> Iterator[SQLBackend]:
    b = SQLBackend(catalog_url, blob_store=blob_store, inline_limit=LIMIT)
    yield b
    b.close()


@pytest.fixture
def local(catalog_url: str, tmp_path: Path) -> Iterator[SQLBackend]:
    """A backend with a local store, for tests that reach behind polystore's back."""
    b = SQLBackend(catalog_url, blob_store=LocalBlobStore(tmp_path / "blobs"), inline_limit=LIMIT)
    yield b
    b.close()


def blob_table(backend: SQLBackend) -> dict[str, tuple[str, int, bool]]:
    """hash -> (store, refcount, has inline data)."""
    with backend.engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT hash, store, refcount, data IS NOT NULL FROM polystore_blobs")
        ).all()
    return {h: (store, int(n), bool(inline)) for h, store, n, inline in rows}


def intent_count(backend: SQLBackend) -> int:
    with backend.engine.connect() as conn:
        return int(
            conn.execute(sa.text("SELECT COUNT(*) FROM polystore_upload_intents")).scalar_one()
        )


def objects(store: BlobStore) -> set[str]:
    return {o.key for o in store.scan()}


def assert_clean(backend: SQLBackend, *, verify: bool = True) -> None:
    report = backend.fsck(verify=verify)
    assert report.ok, str(report)
    assert report.pending_uploads == 0, str(report)


# -- the stores on their own ----------------------------------------------------------


def test_store_round_trip_idempotent_and_delete(blob_store: BlobStore) -> None:
    data = payload(1, 3000)
    h = sha(data)
    assert blob_store.size(h) is None and not blob_store.exists(h)
    views = [memoryview(data)[i : i + 1000] for i in range(0, 3000, 1000)]
    assert blob_store.put(h, views, len(data)) is True
    assert blob_store.put(h, [data], len(data)) is False  # already there: nothing written
    assert blob_store.size(h) == 3000 and blob_store.exists(h)
    assert blob_store.get(h) == data
    with blob_store.open(h) as reader:
        assert reader.size == 3000
        buffer = bytearray(3000)
        got = 0
        while n := reader.readinto(memoryview(buffer)[got:]):
            got += n
    assert bytes(buffer) == data
    assert [(o.key, o.size, o.hash) for o in blob_store.scan()] == [(hash_key(h), 3000, h)]
    blob_store.delete([h, sha(b"never stored")])
    assert blob_store.size(h) is None
    with pytest.raises(NotFoundError):
        blob_store.open(h)
    assert list(blob_store.scan()) == []


def test_store_replace_overwrites_an_object_of_the_same_size(blob_store: BlobStore) -> None:
    data = payload(3, 2000)
    h = sha(data)
    wrong = bytes(b ^ 0xFF for b in data)  # same size, wrong bytes
    assert blob_store.put(h, [wrong], len(wrong)) is True
    assert blob_store.put(h, [data], len(data)) is False  # put trusts the size
    assert blob_store.get(h) == wrong
    blob_store.replace(h, [data[:1000], data[1000:]], len(data), token=str(7))
    assert blob_store.get(h) == data
    assert [(o.key, o.size, o.hash) for o in blob_store.scan()] == [(hash_key(h), 2000, h)]


class _DeleteThenPut(LocalBlobStore):
    """A third-party store that implements only the abstract methods."""

    replace = BlobStore.replace


def test_default_replace_deletes_then_puts(tmp_path: Path) -> None:
    store = _DeleteThenPut(tmp_path / "store")
    data = payload(4, 500)
    h = sha(data)
    store.put(h, [bytes(500)], 500)
    store.replace(h, [data], 500)
    assert store.get(h) == data


def test_store_refuses_short_uploads_and_bad_hashes(blob_store: BlobStore) -> None:
    data = payload(2)
    with pytest.raises(ValueError, match="gave 999 bytes"):
        blob_store.put(sha(data), [data[:-1]], len(data))
    assert list(blob_store.scan()) == []
    for bad in ["../../etc/passwd", "ABC", sha(data).upper(), sha(data)[:-1]]:
        with pytest.raises(ValueError, match="not a content hash"):
            blob_store.put(bad, [data], len(data))


def test_s3_multipart_upload_and_streamed_read(s3_url: str, catalog_url: str) -> None:
    store = from_url(s3_url + f"&part_size={5 << 20}")
    assert isinstance(store, S3BlobStore) and store.part_size == 5 << 20
    data = payload(90, 11 << 20)  # three parts
    h = sha(data)
    view = memoryview(data)
    assert store.put(h, (view[i : i + (1 << 20)] for i in range(0, len(data), 1 << 20)), len(data))
    assert store.size(h) == len(data) and store.get(h) == data
    with SQLBackend(catalog_url, blob_store=store) as b:
        b.save(np.frombuffer(data, dtype=np.uint8), "big.npy")  # dedup: already uploaded
        assert b.load("big.npy").tobytes() == data
        assert_clean(b)
    with pytest.raises(BackendConfigError, match="at least 5 MiB"):
        from_url(s3_url + "&part_size=1024")


def test_local_store_layout_and_atomic_writes(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    assert not (tmp_path / "blobs").exists()  # created by the first write, not before
    data = payload(3)
    h = sha(data)

    def interrupted() -> Iterator[bytes]:
        yield data[:500]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.put(h, interrupted(), len(data), token="42")  # noqa: S106 -- not a secret
    assert store.path(h) == tmp_path / "blobs" / h[:2] / h
    assert not store.path(h).exists()
    assert list(store.scan()) == []  # the temporary file went with the failure

    # A killed writer's temporary file is named after its token, so it can be
    # found and removed without listing.
    temp = store.path(h).with_name(f"{h}.tmp-7")
    temp.write_bytes(data[:10])
    assert [(o.hash, o.token) for o in store.scan()] == [(h, "7")]
    store.abort(h, "7")
    assert not temp.exists()
    store.put(h, [data], len(data))
    assert store.path(h).read_bytes() == data
    (tmp_path / "blobs" / "notes.txt").write_text("stray")
    assert {(o.key, o.hash) for o in store.scan()} == {(hash_key(h), h), ("notes.txt", None)}


def test_local_delete_removes_emptied_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalBlobStore(tmp_path / "store")
    one, two = b"one", b"two"
    h1, h2 = sha(one), sha(two)
    store.put(h1, [one], 3)
    store.put(h2, [two], 3)
    twin = h1[:2] + "f" * 62  # another object in h1's shard
    store.put(twin, [b"x"], 1)
    store.delete([h1, h2])
    assert store.path(h1).parent.is_dir()  # twin is still there
    assert not store.path(h2).parent.exists()
    store.delete([twin])
    assert not store.path(h1).parent.exists()
    # A writer whose shard is removed between making it and writing makes it again.
    made = LocalBlobStore._make_shard
    calls: list[Path] = []

    def racing(self: LocalBlobStore, shard: Path) -> None:
        made(self, shard)
        calls.append(shard)
        if len(calls) == 1:
            shard.rmdir()  # a concurrent delete() emptied and removed it

    monkeypatch.setattr(LocalBlobStore, "_make_shard", racing)
    assert store.put(h1, [one], 3)
    assert len(calls) == 2 and store.get(h1) == one


def test_from_url(tmp_path: Path) -> None:
    store = from_url(f"file://{tmp_path}/a%20b?fsync=false&name=mine")
    assert isinstance(store, LocalBlobStore)
    assert store.root == tmp_path / "a b" and store.fsync is False and store.name == "mine"
    assert isinstance(from_url(tmp_path / "plain"), LocalBlobStore)
    assert from_url(str(tmp_path / "plain")).name == "local"
    s3 = from_url(
        "s3://bucket/some/prefix/?endpoint=http://127.0.0.1:1&region=eu-west-1&allow_http=true"
    )
    assert isinstance(s3, S3BlobStore)
    assert (s3.bucket, s3.prefix, s3.name) == ("bucket", "some/prefix", "s3://bucket/some/prefix")
    assert len(from_url("s3://b/" + "p" * 100).name) <= 64
    for bad in ["gs://bucket", "file://host/path", "s3:///prefix", ""]:
        with pytest.raises(BackendConfigError):
            from_url(bad)
    with pytest.raises(BackendConfigError, match="unknown S3 blob store options"):
        from_url("s3://bucket?colour=blue")


def test_store_keeps_its_first_owner(blob_store: BlobStore) -> None:
    assert blob_store.records_owner and blob_store.owner() is None
    first = blob_store.claim(StoreOwner("first", "the first catalog"))
    assert first is not None and (first.id, first.description) == ("first", "the first catalog")
    assert first.claimed_at  # stamped by the claim
    assert blob_store.claim(StoreOwner("second", "a latecomer")) == first
    assert blob_store.claim(StoreOwner("first", "described anew")) == first  # written once
    assert blob_store.owner() == first
    # The marker is not an object: never listed, never reached by a hash.
    assert list(blob_store.scan()) == []
    data = payload(5)
    blob_store.put(sha(data), [data], len(data))
    assert objects(blob_store) == {hash_key(sha(data))}
    blob_store.delete([sha(data)])
    assert list(blob_store.scan()) == [] and blob_store.owner() == first


def test_local_marker_without_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(source: Any, target: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")  # (FAT, some network mounts)

    monkeypatch.setattr(os, "link", no_links)
    store = LocalBlobStore(tmp_path / "blobs")
    first = store.claim(StoreOwner("first"))
    assert first is not None and first.id == "first"
    assert store.claim(StoreOwner("second")) == first
    assert [p.name for p in store.root.iterdir()] == [OWNER_KEY]  # no temporary file left


def test_a_damaged_marker_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("polystore.blobs.base._MARKER_PATIENCE", 0.1)
    store = LocalBlobStore(tmp_path / "blobs")
    store.root.mkdir()
    for junk in (b"", b"{not json", b'{"owner": "someone"}', json.dumps([1]).encode()):
        (store.root / OWNER_KEY).write_bytes(junk)
        with pytest.raises(BackendConfigError, match=r"owner marker .* is damaged"):
            store.claim(StoreOwner("me"))
    assert (store.root / OWNER_KEY).read_bytes() == b"[1]"  # not overwritten


class _ReadOnlyStore(LocalBlobStore):
    """A store this process may read but not write (a read-only mount, a bucket policy)."""

    def create_marker(self, data: bytes) -> bool:
        raise ReadOnlyError(errno.EROFS, "Read-only file system", str(self.root))


class _NoOwnerStore(LocalBlobStore):
    """A store that keeps no owner marker, as a custom store need not."""

    records_owner = False


def test_stores_that_cannot_record_an_owner(tmp_path: Path) -> None:
    read_only = _ReadOnlyStore(tmp_path / "ro")
    assert read_only.claim(StoreOwner("me")) is None  # unclaimed, and readable
    no_owner = _NoOwnerStore(tmp_path / "plain")
    assert no_owner.claim(StoreOwner("me")) is None and no_owner.owner() is None
    assert not (tmp_path / "plain").exists()
    with pytest.raises(UnsupportedOperationError):
        BlobStore.read_marker(no_owner)


def test_importing_polystore_does_not_import_obstore() -> None:
    code = (
        "import sys, polystore, polystore.blobs; polystore.SQLBackend; "
        "assert 'obstore' not in sys.modules, 'obstore imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- placement and dedup ------------------------------------------------------------


def test_small_inline_large_external(backend: SQLBackend) -> None:
    big = np.arange(100, dtype=np.float64)  # 800 bytes
    backend.save(big, "a/big.npy")
    backend.save(b"tiny", "a/tiny.bin")
    backend.save(b"x" * LIMIT, "a/at_limit.bin")
    assert backend.stat("a/big.npy").store == backend.blob_store.name  # type: ignore[union-attr]
    assert backend.stat("a/tiny.bin").store == "inline"
    assert backend.stat("a/at_limit.bin").store == "inline"
    out = backend.load("a/big.npy")
    np.testing.assert_array_equal(out, big)
    assert out.flags.writeable
    h = backend.stat("a/big.npy").hash
    assert h is not None
    assert blob_table(backend)[h] == (backend.blob_store.name, 1, False)  # type: ignore[union-attr]
    assert objects(backend.blob_store) == {hash_key(h)}  # type: ignore[arg-type]
    with backend.engine.connect() as conn:
        sql = "SELECT path, store FROM polystore_catalog WHERE kind = 'file'"
        stores = {row.path: row.store for row in conn.execute(sa.text(sql))}
    assert stores["a/big.npy"] == backend.blob_store.name  # type: ignore[union-attr]
    assert stores["a/tiny.bin"] == "inline"
    assert backend.load_batch(["a/tiny.bin", "a/big.npy"])[0] == b"tiny"
    assert intent_count(backend) == 0
    assert_clean(backend)


def test_dedup_external_with_refcounts(backend: SQLBackend) -> None:
    data = payload(4)
    backend.save_batch([data, data], ["x/1.bin", "x/2.bin"])
    backend.save(data, "y/3.bin")
    backend.copy("x", "z")
    h = sha(data)
    assert blob_table(backend)[h][1] == 5
    assert len(objects(backend.blob_store)) == 1  # type: ignore[arg-type]
    backend.delete("x", recursive=True)
    backend.save(b"other" * 100, "y/3.bin")  # overwrite releases one reference
    assert blob_table(backend)[h][1] == 2
    assert backend.load("z/2.bin") == data
    assert_clean(backend)


def test_dedup_across_placements_and_limit_changes(catalog_url: str, blob_store: BlobStore) -> None:
    inline_first, external_first = payload(5), payload(6)
    with SQLBackend(catalog_url, blob_store=blob_store, inline_limit=1 << 20) as roomy:
        roomy.save(inline_first, "a.bin")
    with SQLBackend(catalog_url, blob_store=blob_store, inline_limit=LIMIT) as tight:
        tight.save(external_first, "b.bin")
        # Same content again under the other limit: a reference, not a second copy.
        tight.save(inline_first, "a2.bin")
        assert blob_table(tight)[sha(inline_first)] == ("inline", 2, True)
        assert objects(blob_store) == {hash_key(sha(external_first))}
    with SQLBackend(catalog_url, blob_store=blob_store, inline_limit=1 << 20) as roomy:
        roomy.save(external_first, "b2.bin")
        assert blob_table(roomy)[sha(external_first)] == (blob_store.name, 2, False)
        # Old blobs stay readable where they are.
        assert roomy.load_batch(["a.bin", "a2.bin", "b.bin", "b2.bin"]) == [
            inline_first,
            inline_first,
            external_first,
            external_first,
        ]
        assert_clean(roomy)


def test_rebalance_moves_both_ways(catalog_url: str, blob_store: BlobStore) -> None:
    values = {f"f{i}.bin": payload(10 + i, 100 * (i + 1)) for i in range(6)}  # 100..600 bytes
    with SQLBackend(catalog_url, blob_store=blob_store, inline_limit=1 << 20) as b:
        b.save_batch(list(values.values()), list(values))
        assert objects(blob_store) == set()
        report = b.rebalance(inline_limit=350)  # 400, 500 and 600 bytes go out
        assert (report.to_external, report.to_inline, report.bytes_moved) == (3, 0, 1500)
        stores = {p: b.stat(p).store for p in values}
        assert [p for p, s in stores.items() if s != "inline"] == ["f3.bin", "f4.bin", "f5.bin"]
        assert len(objects(blob_store)) == 3
        assert b.load_batch(list(values)) == list(values.values())
        assert_clean(b)
        assert b.rebalance(inline_limit=350).to_external == 0  # already balanced
    with SQLBackend(catalog_url, blob_store=blob_store, inline_limit=450) as b:
        report = b.rebalance()  # this backend's own limit: 400 comes back in
        assert (report.to_external, report.to_inline) == (0, 1)
        assert len(objects(blob_store)) == 2
        assert b.load_batch(list(values)) == list(values.values())
        assert_clean(b)


def test_no_external_store_keeps_everything_inline(catalog_url: str) -> None:
    url = catalog_url
    if url.startswith("sqlite"):
        url = "sqlite://"  # in memory: no file, so no default store
    with SQLBackend(url, inline_limit=0) as b:
        assert b.blob_store is None
        b.save(payload(7, 5000), "big.bin")
        assert b.stat("big.bin").store == "inline"
        assert b.rebalance().to_external == 0
        assert b.gc().objects_deleted == 0
        assert b.fsck(verify=True).ok


def test_default_store_next_to_sqlite_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POLYSTORE_BLOB_STORE", raising=False)
    url = f"sqlite:///{tmp_path}/cat.db"
    with SQLBackend(url, inline_limit=LIMIT) as b:
        assert isinstance(b.blob_store, LocalBlobStore)
        assert b.blob_store.root == tmp_path / "cat.db.blobs"
        b.save(b"small", "s.bin")
        # Opening claimed it: the directory holds the owner marker, and no object.
        assert [p.name for p in (tmp_path / "cat.db.blobs").iterdir()] == [OWNER_KEY]
        b.save(payload(8), "big.bin")
        assert objects(b.blob_store) == {hash_key(sha(payload(8)))}
    # A FileManager given the URL opens the same catalog with the same default store.
    fm = FileManager(url)
    assert fm.load("big.bin") == payload(8)
    fm.close()
    monkeypatch.setenv("POLYSTORE_BLOB_STORE", f"file://{tmp_path}/elsewhere")
    with SQLBackend(url) as b:
        assert isinstance(b.blob_store, LocalBlobStore)
        assert b.blob_store.root == tmp_path / "elsewhere"


def test_blob_store_given_as_url_and_through_filemanager(catalog_url: str, tmp_path: Path) -> None:
    store_url = f"file://{tmp_path}/store?fsync=false"
    fm = FileManager({"cat": SQLBackend(catalog_url, blob_store=store_url, inline_limit=LIMIT)})
    fm.save(np.ones(50), "ones.npy", backend="cat")
    assert fm.stat("ones.npy", backend="cat").store == "local"
    assert (tmp_path / "store").is_dir()
    np.testing.assert_array_equal(fm.load("ones.npy", backend="cat"), np.ones(50))
    fm.close()
    fm.registry["cat"].close()


def test_another_store_name_is_reported_not_guessed(catalog_url: str, tmp_path: Path) -> None:
    with SQLBackend(catalog_url, blob_store=LocalBlobStore(tmp_path / "a", name="first"),
                    inline_limit=LIMIT) as b:  # fmt: skip
        b.save(payload(9), "f.bin")
    with SQLBackend(catalog_url, blob_store=LocalBlobStore(tmp_path / "b", name="second"),
                    inline_limit=LIMIT) as b:  # fmt: skip
        with pytest.raises(NotFoundError, match="blob store 'first'"):
            b.load("f.bin")
        report = b.fsck()
        assert report.ok and report.other_stores == {"first": 1}
        b.gc(grace=0)  # never touches another store's blobs
    assert (tmp_path / "a").is_dir() and len(objects(LocalBlobStore(tmp_path / "a"))) == 1


def test_large_batches_register_and_settle_in_chunks(catalog_url: str, tmp_path: Path) -> None:
    # More contents than one transaction locks (LOCK_BATCH): intents are
    # registered, and a transaction's uploads settled, a chunk at a time.
    store = LocalBlobStore(tmp_path / "blobs", fsync=False)
    with SQLBackend(catalog_url, blob_store=store, inline_limit=0) as b:
        names = [f"many/{i}.bin" for i in range(600)]
        b.save_batch([str(i).encode() for i in range(600)], names)
        with pytest.raises(RuntimeError), b.transaction():
            b.save_batch([f"t{i}".encode() for i in range(600)], [f"t/{i}" for i in range(600)])
            raise RuntimeError("roll back 600 uploads")
        assert len(objects(store)) == 600
        assert b.load_batch(names[::50]) == [str(i).encode() for i in range(0, 600, 50)]
        assert_clean(b)


# -- one store, one catalog ------------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a fresh blob store: a local directory, or an S3 prefix."""
    if request.param == "local":
        return f"file://{tmp_path}/shared-blobs"
    return str(request.getfixturevalue("s3_url"))


def identity(catalog: str | sa.Engine) -> str:
    """The catalog's identity, read with plain SQL."""
    engine = sa.create_engine(catalog) if isinstance(catalog, str) else catalog
    try:
        with engine.connect() as conn:
            return str(conn.execute(sa.text("SELECT catalog_id FROM polystore_identity")).scalar())
    finally:
        if isinstance(catalog, str):
            engine.dispose()


def test_a_second_catalog_on_a_store_is_refused_and_nothing_is_lost(
    catalog_url: str,
    more_catalogs: Callable[[], str],
    store_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The report: POLYSTORE_BLOB_STORE set for two catalogs; the same array
    # saved in both, deleted in one, gc(grace=0) there -- and the other had lost it.
    monkeypatch.setenv("POLYSTORE_BLOB_STORE", store_url)
    array = np.arange(1000.0)
    second = more_catalogs()
    with SQLBackend(catalog_url, inline_limit=LIMIT) as a:
        a.save(array, "x.npy")
        shared = a.blob_store
        assert shared is not None
        before = (objects(shared), shared.owner())
        with pytest.raises(BackendConfigError) as refused:
            SQLBackend(second, inline_limit=LIMIT)
        message = str(refused.value)
        assert identity(catalog_url) != identity(second)
        assert identity(catalog_url) in message and identity(second) in message
        assert shared.where() in message and "give this catalog a store of its own" in message
        assert (objects(shared), shared.owner()) == before  # the refused open wrote nothing

        # The second catalog with a store of its own (another directory, or
        # another prefix of the bucket): the same steps lose nothing.
        own = from_url(store_url.replace("shared-blobs", "own-blobs").replace("/t-", "/own-"))
        with SQLBackend(second, blob_store=own, inline_limit=LIMIT) as b:
            b.save(array, "x.npy")
            a.delete("x.npy")
            assert a.gc(grace=0).objects_deleted == 1
            np.testing.assert_array_equal(b.load("x.npy"), array)
            assert_clean(b)
        assert_clean(a)
        assert shared.owner() == before[1]  # gc() left the marker alone


def test_the_owner_reopens_its_store(catalog_url: str, blob_store: BlobStore) -> None:
    with SQLBackend(catalog_url, blob_store=blob_store, inline_limit=LIMIT) as b:
        b.save(payload(70), "f.bin")
    owner = blob_store.owner()
    assert owner is not None and owner.id == identity(catalog_url)
    assert catalog_url.partition("?")[0] in owner.description  # for people: where it is
    # Again, with the same store object and with one built anew from its URL.
    with SQLBackend(catalog_url, blob_store=blob_store, inline_limit=LIMIT) as b:
        assert b.load("f.bin") == payload(70)
    where = blob_store.where()
    again = from_url(where) if isinstance(blob_store, LocalBlobStore) else blob_store
    with SQLBackend(catalog_url, blob_store=again, inline_limit=LIMIT) as b:
        assert b.load("f.bin") == payload(70)
        assert_clean(b)
    assert blob_store.owner() == owner  # claimed once, never rewritten


def test_the_owner_marker_is_no_object_to_fsck_or_gc(backend: SQLBackend) -> None:
    store = backend.blob_store
    assert store is not None
    owner = store.owner()
    assert owner is not None and owner.id == identity(backend.engine)
    backend.save_batch([payload(71), payload(72)], ["a.bin", "b.bin"])
    backend.delete("a.bin")
    backend.delete("b.bin")
    assert backend.gc(grace=0).objects_deleted == 2
    assert objects(store) == set() and store.owner() == owner
    report = backend.fsck(verify=True)
    assert report.ok and report.unreferenced == [] and report.objects_checked == 0, str(report)


def _open_on_shared_store(url: str, store: str, barrier: Any, results: Any, index: int) -> None:
    try:
        barrier.wait(timeout=60)
        with SQLBackend(url, blob_store=store, inline_limit=LIMIT) as b:
            b.save(payload(100 + index), "mine.bin")
        results.put((index, None))
    except BackendConfigError:
        results.put((index, "refused"))
    except Exception as error:  # noqa: BLE001 -- any failure goes back to the parent
        results.put((index, repr(error)))


@pytest.mark.slow
def test_concurrent_first_claims_exactly_one_catalog_wins(
    more_catalogs: Callable[[], str], store_url: str
) -> None:
    workers = 4
    urls = [more_catalogs() for _ in range(workers)]
    for url in urls:  # migrated beforehand: the processes race for the store alone
        SQLBackend(url).close()
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(workers)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_open_on_shared_store, args=(url, store_url, barrier, results, i))
        for i, url in enumerate(urls)
    ]
    for proc in procs:
        proc.start()
    outcome = dict(results.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=30)
    winners = [i for i, error in outcome.items() if error is None]
    assert len(winners) == 1, outcome
    assert sorted(outcome.values(), key=str) == [None] + ["refused"] * (workers - 1), outcome
    (winner,) = winners
    owner = from_url(store_url).owner()
    assert owner is not None and owner.id == identity(urls[winner])
    with SQLBackend(urls[winner], blob_store=store_url, inline_limit=LIMIT) as b:
        assert b.load("mine.bin") == payload(100 + winner)
        assert_clean(b)


def test_a_read_only_catalog_checks_its_store_but_claims_nothing(
    sqlite_url: str, tmp_path: Path
) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    with SQLBackend(sqlite_url, blob_store=store, inline_limit=LIMIT) as rw:
        rw.save(payload(73), "f.bin")
    (store.root / OWNER_KEY).unlink()  # a store from before stores recorded owners
    read_only = sqlite_url.replace("sqlite:///", "sqlite:///file:") + "?mode=ro&uri=true"
    with SQLBackend(read_only, blob_store=store) as ro:
        assert ro.load("f.bin") == payload(73)
    assert store.owner() is None  # a read-only open writes nothing
    assert store.claim(StoreOwner("another catalog")) is not None
    with pytest.raises(BackendConfigError, match="belongs to another catalog"):
        SQLBackend(read_only, blob_store=store)


def test_an_in_memory_catalog_checks_its_store_but_claims_nothing(tmp_path: Path) -> None:
    # It ends with its process: a claim would outlive it, and lock the store.
    store = LocalBlobStore(tmp_path / "blobs")
    for _ in range(2):
        with SQLBackend("sqlite://", blob_store=store, inline_limit=LIMIT) as scratch:
            scratch.save(payload(74), "f.bin")
            assert scratch.load("f.bin") == payload(74)
    assert store.owner() is None
    with SQLBackend(f"sqlite:///{tmp_path}/kept.db", blob_store=store):
        pass  # a catalog on file claims it
    with pytest.raises(BackendConfigError, match=r"belongs to another catalog.*sqlite:// on"):
        SQLBackend("sqlite://", blob_store=store)


# -- failures, rollbacks and gc --------------------------------------------------------


def test_failed_batch_leaves_no_upload_behind(backend: SQLBackend) -> None:
    backend.save(b"kept", "d/taken.bin")
    with pytest.raises(FileExistsError):
        backend.save_batch([payload(20), b"new"], ["d/new.bin", "d/taken.bin"], overwrite=False)
    assert objects(backend.blob_store) == set()  # type: ignore[arg-type]
    assert intent_count(backend) == 0
    assert_clean(backend)


def test_transaction_rollbacks_leave_no_upload_behind(backend: SQLBackend) -> None:
    with pytest.raises(RuntimeError), backend.transaction():
        backend.save(payload(21), "t/a.bin")
        raise RuntimeError("abort")
    assert objects(backend.blob_store) == set()  # type: ignore[arg-type]
    with backend.transaction():
        backend.save(payload(22), "t/kept.bin")
        with pytest.raises(RuntimeError), backend.transaction():
            backend.save(payload(23), "t/inner.bin")
            raise RuntimeError("inner only")
        backend.save(payload(24), "t/after.bin")
    assert backend.list_files("t") == ["t/after.bin", "t/kept.bin"]
    assert objects(backend.blob_store) == {hash_key(sha(payload(n))) for n in (22, 24)}  # type: ignore[arg-type]
    assert backend.load("t/kept.bin") == payload(22)
    assert_clean(backend)


class FailingStore(LocalBlobStore):
    """A local store whose n-th upload fails (a full disk, a network error)."""

    def __init__(self, root: Path, fail_at: int) -> None:
        super().__init__(root, fsync=False)
        self.fail_at = fail_at
        self.calls = 0

    def put(self, content_hash: str, chunks: Any, size: int, *, token: str | None = None) -> bool:
        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError(28, "No space left on device")
        return super().put(content_hash, chunks, size, token=token)


def test_failed_upload_cleans_up_in_and_outside_transactions(
    catalog_url: str, tmp_path: Path
) -> None:
    store = FailingStore(tmp_path / "blobs", fail_at=2)
    with SQLBackend(catalog_url, blob_store=store, inline_limit=LIMIT) as b:
        with pytest.raises(OSError, match="No space"):
            b.save_batch([payload(80), payload(81)], ["a.bin", "b.bin"])
        assert objects(store) == set() and intent_count(b) == 0
        store.calls, store.fail_at = 0, 3
        with pytest.raises(OSError, match="No space"), b.transaction():
            b.save(payload(82), "kept-until-rollback.bin")
            b.save_batch([payload(83), payload(84)], ["c.bin", "d.bin"])
        # Everything uploaded in the transaction went with its rollback.
        assert objects(store) == set() and b.count_nodes() == 0
        assert_clean(b)


def test_gc_removes_unreferenced_external_blobs_only(backend: SQLBackend) -> None:
    keep, drop, shared = payload(30), payload(31), payload(32)
    backend.save_batch([keep, drop, shared, shared], ["keep", "drop", "s1", "s2"])
    backend.save(b"inline content", "small")
    backend.copy("keep", "keep-copy")
    backend.delete("keep")  # the copy still refers to it
    backend.delete("drop")
    backend.delete("s1")
    backend.delete("small")  # inline: gone at once
    assert sha(b"inline content") not in blob_table(backend)
    assert blob_table(backend)[sha(drop)][1] == 0  # external: kept for gc
    assert backend.fsck().garbage == 1
    report = backend.gc()
    assert (report.blobs_deleted, report.bytes_freed, report.objects_deleted) == (1, 1000, 1)
    assert objects(backend.blob_store) == {hash_key(sha(keep)), hash_key(sha(shared))}  # type: ignore[arg-type]
    assert backend.load("keep-copy") == keep and backend.load("s2") == shared
    assert backend.gc() == type(report)()  # nothing left to do
    assert_clean(backend)


def test_maintenance_refuses_to_run_inside_a_transaction(backend: SQLBackend) -> None:
    with backend.transaction():
        backend.save(payload(85), "f.bin")
        with pytest.raises(UnsupportedOperationError, match="gc"):
            backend.gc()
        with pytest.raises(UnsupportedOperationError, match="rebalance"):
            backend.rebalance()
    assert backend.load("f.bin") == payload(85)
    assert_clean(backend)


class PausingStore(LocalBlobStore):
    """A local store whose uploads can be held at a chosen point, to race gc against."""

    def __init__(self, root: Path, *, hold_after_write: bool) -> None:
        super().__init__(root)
        self.hold_after_write = hold_after_write
        self.reached = threading.Event()
        self.release = threading.Event()
        self.holds = 1

    def _hold(self) -> None:
        if self.holds:
            self.holds -= 1
            self.reached.set()
            assert self.release.wait(30)

    def put(self, content_hash: str, chunks: Any, size: int, *, token: str | None = None) -> bool:
        def held() -> Iterator[Any]:
            for i, chunk in enumerate(chunks):
                if i == 0 and not self.hold_after_write:
                    yield memoryview(chunk)[:10]
                    self._hold()
                    yield memoryview(chunk)[10:]
                else:
                    yield chunk

        written = super().put(content_hash, held(), size, token=token)
        if self.hold_after_write:
            self._hold()
        return written


def test_upload_in_flight_is_protected_until_its_intent_expires(
    catalog_url: str, tmp_path: Path
) -> None:
    store = PausingStore(tmp_path / "blobs", hold_after_write=False)
    with SQLBackend(catalog_url, blob_store=store, inline_limit=LIMIT) as b:
        errors: list[BaseException] = []

        def save() -> None:
            try:
                b.save(payload(40), "slow.bin")
            except BaseException as exc:  # noqa: BLE001 -- handed to the main thread
                errors.append(exc)

        writer = threading.Thread(target=save)
        writer.start()
        assert store.reached.wait(30)
        # Half-written: the temporary file and the intent are all there is.
        report = b.fsck()
        assert report.ok and report.pending_uploads == 1
        assert [o.token for o in store.scan()] == [str(_only_intent_id(b))]
        assert b.gc().intents_expired == 0  # young: left alone
        gone = b.gc(grace=0)  # "abandoned": its temporary file goes with it
        assert (gone.intents_expired, gone.objects_deleted) == (1, 0)
        assert list(store.scan()) == []
        store.release.set()
        writer.join(30)
        # The writer found its intent gone, so it registered and uploaded again.
        assert errors == []
        assert b.load("slow.bin") == payload(40)
        assert_clean(b)


def _only_intent_id(backend: SQLBackend) -> int:
    with backend.engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT id FROM polystore_upload_intents")).scalar_one())


def test_save_whose_upload_gc_took_starts_again(catalog_url: str, tmp_path: Path) -> None:
    store = PausingStore(tmp_path / "blobs", hold_after_write=True)
    with SQLBackend(catalog_url, blob_store=store, inline_limit=LIMIT) as b:
        writer = threading.Thread(target=b.save, args=(payload(41), "f.bin"))
        writer.start()
        assert store.reached.wait(30)
        assert objects(store) == {hash_key(sha(payload(41)))}
        assert b.gc(grace=0).objects_deleted == 1  # the upload looks abandoned
        store.release.set()
        writer.join(30)
        # Its commit found the intent gone, so the save registered and uploaded again.
        assert b.load("f.bin") == payload(41)
        assert_clean(b)


# -- integrity and fsck ---------------------------------------------------------------


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_fsck_reports_each_kind_of_damage_and_nothing_else(local: SQLBackend) -> None:
    store = local.blob_store
    assert isinstance(store, LocalBlobStore)
    names = ["corrupt", "truncated", "deleted", "fine"]
    local.save_batch([payload(50 + i) for i in range(4)], names)
    h = {name: sha(payload(50 + i)) for i, name in enumerate(names)}
    assert_clean(local)

    _corrupt(store.path(h["corrupt"]))
    assert local.fsck().ok  # same size: only verify=True reads the bytes
    report = local.fsck(verify=True)
    assert report.hash_mismatch == [h["corrupt"]] and report.problems() == [
        f"wrong hash: {h['corrupt']}"
    ]

    store.path(h["truncated"]).write_bytes(payload(51)[:-1])
    store.path(h["deleted"]).unlink()
    stray = sha(b"nobody's")
    store.put(stray, [b"nobody's"], 8)
    (store.root / "junk.txt").write_text("junk")
    report = local.fsck(verify=True)
    assert report.missing == [h["deleted"]]
    assert report.size_mismatch == [h["truncated"]]
    assert report.hash_mismatch == [h["corrupt"]]
    assert report.unreferenced == sorted([hash_key(stray), "junk.txt"])
    assert report.refcount_mismatch == {}
    assert not report.ok and len(report.problems()) == 5

    for name in ("corrupt", "truncated", "deleted"):
        with pytest.raises(IntegrityError):
            local.load(name)
        with pytest.raises(IntegrityError):
            local.load_batch(["fine", name])
    assert local.load("fine") == payload(53)


def test_fsck_and_load_check_inline_content_and_refcounts(local: SQLBackend) -> None:
    local.save_batch([b"one", b"two", b"three"], ["one", "two", "three"])
    with local.engine.begin() as conn:  # behind polystore's back
        conn.execute(
            sa.text("UPDATE polystore_blobs SET data = :d WHERE hash = :h"),
            {"d": b"ONE", "h": sha(b"one")},
        )
        conn.execute(
            sa.text("UPDATE polystore_blobs SET data = :d WHERE hash = :h"),
            {"d": b"tw", "h": sha(b"two")},
        )
        conn.execute(
            sa.text("UPDATE polystore_blobs SET refcount = 7 WHERE hash = :h"),
            {"h": sha(b"three")},
        )
    report = local.fsck()
    assert report.size_mismatch == [sha(b"two")]
    assert report.hash_mismatch == []
    assert report.refcount_mismatch == {sha(b"three"): (7, 1)}
    report = local.fsck(verify=True)
    assert report.hash_mismatch == [sha(b"one")]
    assert (report.missing, report.unreferenced) == ([], [])
    assert local.load("one") == b"ONE"  # inline and the same size: only fsck(verify=True) tells
    with pytest.raises(IntegrityError, match="records 3"):
        local.load("two")
    assert local.load("three") == b"three"


# -- streaming large arrays ------------------------------------------------------------

_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    from polystore import SQLBackend

    def peak():  # bytes (ru_maxrss is KiB on Linux)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    url, store, mode, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    backend = SQLBackend(url, blob_store=store, inline_limit=1 << 16)
    backend.save(np.zeros(1 << 15), "warm.npy")  # imports and caches, not content
    backend.load("warm.npy")
    if mode == "save":
        array = np.ones(n, dtype=np.uint8)
        array[::4096] = 7
        before = peak()
        backend.save(array, "big.npy")
    else:
        before = peak()
        array = backend.load("big.npy")
        assert array.nbytes == n and array[4096] == 7 and array[1] == 1
    print(json.dumps({"before": before, "after": peak()}))
    """
)


def test_large_array_streams_with_one_copy_in_memory(sqlite_url: str, tmp_path: Path) -> None:
    size = 96 << 20
    store = f"file://{tmp_path}/blobs"
    growth = {}
    for mode in ("save", "load"):
        result = subprocess.run(
            [sys.executable, "-c", _PEAK_SCRIPT, sqlite_url, store, mode, str(size)],
            check=True,
            capture_output=True,
            text=True,
        )
        peaks = json.loads(result.stdout)
        growth[mode] = (peaks["after"] - peaks["before"]) / size
    # Saving streams the caller's array (hashing and writing in chunks): no copy.
    # Loading reads straight into the array's own buffer: exactly one copy.
    assert growth["save"] < 0.25, growth
    assert growth["load"] < 1.25, growth


def test_size_limit_without_a_store_is_a_clear_error() -> None:
    def connect() -> sqlite3.Connection:
        # A lower value limit, as a SQLite built with a smaller SQLITE_MAX_LENGTH
        # has it from the start (the backend reads it when it opens).
        conn = sqlite3.connect(":memory:", check_same_thread=False)
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 3000)
        return conn

    with SQLBackend("sqlite://", inline_limit=0, engine_options={"creator": connect}) as b:
        with pytest.raises(SerializationError, match="blob_store="):
            b.save(payload(60, 1977), "too-big.bin")
        assert b.count_nodes() == 0
        b.save(payload(61, 1976), "fits.bin")
