"""``polystore.fsspec.PolystoreFileSystem``: a catalog through fsspec (DESIGN §8).

Every test runs on SQLite and PostgreSQL (``catalog_url``). fsspec's own
conformance suite runs in ``test_fsspec_conformance.py``.
"""

from __future__ import annotations

import gc
import io
import json
import multiprocessing
import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
from click.testing import CliRunner
from fsspec.registry import known_implementations

import polystore.fsspec as polystore_fsspec
from polystore import (
    ConflictError,
    IsADirectoryError,
    NotADirectoryError,
    NotFoundError,
    SQLBackend,
    UnsupportedOperationError,
)
from polystore.cli import main
from polystore.fsspec import PolystoreFile, PolystoreFileSystem

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module", autouse=True)
def _registered() -> None:
    """The entry point registers the protocol; a stale editable install may predate it."""
    if "polystore" not in known_implementations and not IN_CI:
        fsspec.register_implementation("polystore", PolystoreFileSystem)


@pytest.fixture(autouse=True)
def _nothing_left_open() -> Iterator[None]:
    """Collect garbage after each test: a connection left open warns here, not later."""
    yield
    gc.collect()


@pytest.fixture
def fs(catalog_url: str) -> Iterator[PolystoreFileSystem]:
    with PolystoreFileSystem(catalog_url) as fs:
        yield fs


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """Every range ``_read_range`` is asked for: (path, start, end)."""
    calls: list[tuple[str, int, int]] = []
    real = polystore_fsspec._read_range

    def spy(backend: SQLBackend, path: str, start: int, end: int) -> bytes:
        calls.append((path, start, end))
        return real(backend, path, start, end)

    monkeypatch.setattr(polystore_fsspec, "_read_range", spy)
    return calls


# -- finding the filesystem -------------------------------------------------------------------


def test_the_entry_point_names_the_class() -> None:
    found = {ep.name: ep.value for ep in entry_points(group="fsspec.specs")}
    if "polystore" not in found and not IN_CI:
        pytest.skip("the installed metadata predates the entry point: pip install -e .")
    assert found["polystore"] == "polystore.fsspec:PolystoreFileSystem"
    assert fsspec.get_filesystem_class("polystore") is PolystoreFileSystem


def test_fsspec_filesystem_and_open_by_url(catalog_url: str) -> None:
    with fsspec.filesystem("polystore", url=catalog_url) as fs:
        assert isinstance(fs, PolystoreFileSystem)
        fs.pipe_file("plate1/a.csv", b"x,y\n1,2\n")
    with fsspec.open("polystore://plate1/a.csv", url=catalog_url) as f:
        assert f.read() == b"x,y\n1,2\n"
    with fsspec.open("polystore://plate1/b.txt", "w", url=catalog_url) as f:
        f.write("written through fsspec.open")
    with SQLBackend(catalog_url) as backend:
        assert backend.load("plate1/b.txt") == b"written through fsspec.open"


def test_url_defaults_to_polystore_url(catalog_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLYSTORE_URL", catalog_url)
    with PolystoreFileSystem() as fs:
        assert fs.url == catalog_url
        fs.pipe_file("a", b"1")
        assert fs.backend.url == catalog_url


def test_options_reach_the_backend_and_unknown_ones_are_refused(catalog_url: str) -> None:
    with PolystoreFileSystem(catalog_url, inline_limit=3, allow_pickle=True) as fs:
        assert fs.backend.inline_limit == 3 and fs.backend.allow_pickle is True
    with pytest.raises(TypeError, match="unknown PolystoreFileSystem options: inline_limt"):
        PolystoreFileSystem(catalog_url, inline_limt=3)


def test_a_shared_backend_stays_open(catalog_url: str) -> None:
    with SQLBackend(catalog_url) as backend:
        with PolystoreFileSystem(backend) as fs:
            fs.pipe_file("a", b"shared")
            assert fs.backend is backend
        assert backend.load("a") == b"shared"  # still open after fs.close()
        with pytest.raises(TypeError, match="takes options only with a URL"):
            PolystoreFileSystem(backend, inline_limit=3)


def test_instances_are_not_cached(catalog_url: str) -> None:
    first = fsspec.filesystem("polystore", url=catalog_url)
    second = fsspec.filesystem("polystore", url=catalog_url)
    try:
        assert first is not second
        assert not PolystoreFileSystem._cache
    finally:
        first.close()
        second.close()


def test_catalog_opens_on_first_use(tmp_path: Path) -> None:
    fs = PolystoreFileSystem(f"sqlite:///{tmp_path}/later.db")
    assert not (tmp_path / "later.db").exists()
    fs.pipe_file("a", b"1")
    assert (tmp_path / "later.db").exists()
    fs.close()


def test_paths_are_catalog_paths(fs: PolystoreFileSystem) -> None:
    fs.pipe_file("polystore://plate1/a.bin", b"1")
    assert fs.exists("/plate1/a.bin")
    assert fs.exists("plate1/a.bin/")
    assert fs.ls("polystore://plate1", detail=False) == ["plate1/a.bin"]
    assert fs._strip_protocol("polystore:///plate1/") == "plate1"
    assert fs.unstrip_protocol("plate1/a.bin") == "polystore://plate1/a.bin"


# -- listing and inspecting ------------------------------------------------------------------------


def test_ls_and_info_carry_polystore_fields(fs: PolystoreFileSystem) -> None:
    backend = fs.backend
    backend.save(np.zeros((2, 3), np.float32), "plate/img", attrs={"well": "A01"})
    backend.save(b"raw", "plate/raw.bin")
    backend.ensure_directory("plate/empty")
    listing = fs.ls("plate")
    assert [entry["name"] for entry in listing] == ["plate/empty", "plate/img", "plate/raw.bin"]
    empty, img, raw = listing
    assert empty["type"] == "directory" and empty["size"] == 0
    st = backend.stat("plate/img")
    assert img == {
        "name": "plate/img",
        "size": 24,
        "type": "file",
        "created": st.created_at.timestamp(),
        "mtime": st.modified_at.timestamp(),
        "serializer": "ndarray",
        "dtype": "float32",
        "shape": [2, 3],
        "attrs": {"well": "A01"},
        "hash": st.hash,
        "store": "inline",
    }
    assert fs.info("plate/img") == img
    assert raw["serializer"] == "bytes" and raw["size"] == 3
    assert fs.ls("plate", detail=False) == ["plate/empty", "plate/img", "plate/raw.bin"]
    assert fs.ls("plate/raw.bin") == [raw]  # a file lists as itself
    assert fs.ls("plate/raw.bin", detail=False) == ["plate/raw.bin"]
    assert fs.info("")["type"] == "directory"
    with pytest.raises(FileNotFoundError):
        fs.ls("nowhere")
    with pytest.raises(FileNotFoundError):
        fs.info("plate/nothing")


def test_scan_dir_is_one_listing_with_stats(fs: PolystoreFileSystem) -> None:
    backend = fs.backend
    backend.save_batch([b"b", b"a"], ["d/b", "d/a"])
    backend.ensure_directory("d/c")
    assert [st.path for st in backend.scan_dir("d")] == ["d/a", "d/b", "d/c"]
    assert backend.scan_dir("d") == [backend.stat(p) for p in ("d/a", "d/b", "d/c")]
    assert [st.path for st in backend.scan_dir("")] == ["d"]
    with pytest.raises(NotADirectoryError):
        backend.scan_dir("d/a")
    with pytest.raises(NotFoundError):
        backend.scan_dir("missing")


def test_exists_isdir_isfile(fs: PolystoreFileSystem) -> None:
    fs.pipe_file("d/f", b"")
    assert fs.exists("d") and fs.exists("d/f") and not fs.exists("d/g")
    assert fs.isdir("d") and not fs.isdir("d/f") and not fs.isdir("d/g")
    assert fs.isfile("d/f") and not fs.isfile("d") and not fs.isfile("d/g")
    assert fs.isdir("") and not fs.isfile("")
    assert not fs.exists("a/../b")  # not a valid catalog path: nothing is there


@pytest.fixture
def tree(fs: PolystoreFileSystem) -> PolystoreFileSystem:
    for path in ["t/a.npy", "t/b.csv", "t/sub/c.npy", "t/sub/deep/d.npy", "t/[x]*.bin"]:
        fs.pipe_file(path, path.encode())
    fs.makedirs("t/empty")
    return fs


def test_find_glob_du(tree: PolystoreFileSystem) -> None:
    fs = tree
    files = ["t/[x]*.bin", "t/a.npy", "t/b.csv", "t/sub/c.npy", "t/sub/deep/d.npy"]
    assert fs.find("t") == files
    assert fs.find("t", maxdepth=1) == ["t/[x]*.bin", "t/a.npy", "t/b.csv"]
    assert fs.find("t", maxdepth=2, withdirs=True) == [
        "t",
        "t/[x]*.bin",
        "t/a.npy",
        "t/b.csv",
        "t/empty",
        "t/sub",
        "t/sub/c.npy",
        "t/sub/deep",
    ]
    assert fs.find("t/a.npy") == ["t/a.npy"]
    assert fs.find("missing") == []
    detail = fs.find("t/sub", detail=True)
    assert detail["t/sub/c.npy"]["serializer"] == "bytes"
    assert fs.glob("t/*.npy") == ["t/a.npy"]
    assert fs.glob("t/**/*.npy") == ["t/a.npy", "t/sub/c.npy", "t/sub/deep/d.npy"]
    assert fs.glob("t/sub/*") == ["t/sub/c.npy", "t/sub/deep"]
    assert fs.du("t") == sum(len(p) for p in files)
    assert fs.du("t", total=False) == {p: len(p) for p in files}
    assert fs.du("t", maxdepth=1) == len("t/[x]*.bin") + len("t/a.npy") + len("t/b.csv")


def test_a_name_with_glob_characters_is_found_as_it_is(tree: PolystoreFileSystem) -> None:
    assert tree.exists("t/[x]*.bin")
    assert tree.cat_file("t/[x]*.bin") == b"t/[x]*.bin"
    tree.mv("t/[x]*.bin", "t/plain.bin")
    assert tree.cat_file("t/plain.bin") == b"t/[x]*.bin"


def test_times_hashes_and_sign(fs: PolystoreFileSystem) -> None:
    fs.pipe_file("a", b"one")
    st = fs.backend.stat("a")
    assert fs.created("a") == st.created_at and fs.modified("a") == st.modified_at
    assert fs.created("a").tzinfo is not None
    assert fs.ukey("a") == st.hash
    assert fs.checksum("a") == int(st.hash, 16)
    fs.pipe_file("a", b"two")
    assert fs.ukey("a") == fs.backend.stat("a").hash != st.hash
    assert fs.modified("a") >= st.modified_at
    fs.backend.save({"k": 1}, "j.json")
    key = fs.ukey("j.json")
    fs.backend.save({"k": 1}, "j.json", attrs={"polystore.json": {"indent": 2}})
    assert fs.ukey("j.json") != key  # the same content now reads as other bytes
    with pytest.raises(NotImplementedError, match="signed URLs"):
        fs.sign("a")


# -- reading ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (None, None),
        (0, 3),
        (3, None),
        (-4, None),
        (2, -2),
        (None, -1),
        (5, 100),
        (100, 200),
        (4, 2),
    ],
)
def test_cat_file_ranges_of_bytes(
    fs: PolystoreFileSystem, reads: list[Any], start: int | None, end: int | None
) -> None:
    data = bytes(range(10))
    fs.pipe_file("f.bin", data)
    assert fs.cat_file("f.bin", start, end) == data[start:end]
    assert all(path == "f.bin" for path, _, _ in reads)


def test_bytes_and_text_are_read_by_range(fs: PolystoreFileSystem, reads: list[Any]) -> None:
    fs.pipe_file("f.bin", bytes(100))
    fs.backend.save("héllo wörld", "note.txt")
    assert fs.cat_file("f.bin", 10, 20) == bytes(10)
    assert fs.cat_file("note.txt", 1, 3) == "héllo".encode()[1:3]
    assert fs.info("note.txt")["size"] == len("héllo wörld".encode())
    assert reads == [("f.bin", 10, 20), ("note.txt", 1, 3)]
    fs.backend.save(np.arange(3), "arr")
    fs.cat_file("arr", 0, 10)
    assert len(reads) == 2  # an array is rendered, not read by range


def test_cat_file_gives_what_polystore_get_writes(
    fs: PolystoreFileSystem, catalog_url: str, tmp_path: Path
) -> None:
    local = tmp_path / "local"
    local.mkdir()
    np.save(local / "image.npy", np.arange(12, dtype=">i4").reshape(3, 4))
    np.save(local / "fortran.npy", np.asfortranarray(np.arange(6.0).reshape(2, 3)))
    (local / "meta.json").write_text(json.dumps({"b": [1, 2], "a": "é"}, indent=2) + "\n")
    (local / "notes.txt").write_text("line 1\nline 2 — ü\n", encoding="utf-8")
    (local / "table.csv").write_bytes(b"x,y\r\n1,2\r\n")
    runner = CliRunner()
    put = runner.invoke(main, ["--url", catalog_url, "put", str(local), "data"])
    assert put.exit_code == 0, put.output
    fs.backend.save(np.ones((4, 4), np.uint8), "data/made.tif")
    fs.backend.save({"x": None}, "data/plain")
    got = tmp_path / "got"
    get = runner.invoke(main, ["--url", catalog_url, "get", "data", str(got)])
    assert get.exit_code == 0, get.output
    written = {p.relative_to(got).as_posix(): p.read_bytes() for p in got.rglob("*")}
    assert written.pop("plain") == fs.cat_file("data/plain") == b'{"x": null}'
    assert written.pop("made.tif") == fs.cat_file("data/made.tif")
    for name, content in written.items():
        assert fs.cat_file(f"data/{name}") == content == (local / name).read_bytes(), name
        assert fs.cat_file(f"data/{name}", 3, -3) == content[3:-3]
        with fs.open(f"data/{name}") as f:
            assert f.size == len(content)
            assert f.read() == content


def test_read_mode_files_seek_and_read_by_range(fs: PolystoreFileSystem, reads: list[Any]) -> None:
    data = bytes(range(256)) * 40  # 10 KiB
    fs.pipe_file("big.bin", data)
    with fs.open("big.bin", block_size=1024) as f:
        assert isinstance(f, PolystoreFile)
        assert f.seekable() and f.readable() and not f.writable()
        assert f.size == len(data)
        assert f.read(10) == data[:10]
        f.seek(5000)
        assert f.tell() == 5000
        assert f.read(100) == data[5000:5100]
        f.seek(-10, 2)
        assert f.read() == data[-10:]
    assert reads  # by range, never more than a block past what was asked
    assert all(end - start <= 2048 for _, start, end in reads)
    assert fs.head("big.bin", 5) == data[:5] and fs.tail("big.bin", 5) == data[-5:]
    fs.pipe_file("lines.txt", b"a\nb\nc")
    with fs.open("lines.txt") as f:
        assert list(f) == [b"a\n", b"b\n", b"c"]
    with fs.open("lines.txt", "r") as text:
        assert text.read() == "a\nb\nc"


def test_opening_what_is_not_a_file(fs: PolystoreFileSystem) -> None:
    fs.mkdir("d")
    with pytest.raises(IsADirectoryError):
        fs.open("d")
    with pytest.raises(IsADirectoryError):
        fs.cat_file("d")
    with pytest.raises(FileNotFoundError):
        fs.open("nothing")
    with pytest.raises(ValueError, match="unsupported file mode"):
        fs.open("x", "rb+")


def test_a_value_get_cannot_write_cannot_be_read(catalog_url: str) -> None:
    with PolystoreFileSystem(catalog_url, allow_pickle=True) as fs:
        fs.backend.save({1, 2}, "a-set")
        with pytest.raises(TypeError, match="not an array, bytes, text or JSON"):
            fs.cat_file("a-set")


def test_a_file_overwritten_with_an_array_meanwhile(
    fs: PolystoreFileSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs.pipe_file("f", b"bytes")
    real_stat = fs.backend.stat

    def stat_then_overwrite(path: str) -> Any:
        st = real_stat(path)
        fs.backend.save(np.zeros(2), "f")
        return st

    monkeypatch.setattr(fs.backend, "stat", stat_then_overwrite)
    with pytest.raises(ConflictError, match="changed while it was read"):
        fs.cat_file("f")


# -- writing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00\xff" * 1000, b'{"looks": "like json"}', b"\x93NUMPY not really", bytes(3 << 20)],
    ids=["empty", "binary", "json-like", "npy-like", "3MiB"],
)
def test_pipe_file_stores_bytes_verbatim(fs: PolystoreFileSystem, data: bytes) -> None:
    fs.pipe_file("p/data", data)
    assert fs.cat_file("p/data") == data
    assert fs.backend.load("p/data") == data
    assert fs.info("p/data")["serializer"] == "bytes"


def test_pipe_file_modes_and_refusals(fs: PolystoreFileSystem) -> None:
    fs.pipe_file("a", bytearray(b"first"), attrs={"k": 1})
    assert fs.info("a")["attrs"] == {"k": 1}
    with pytest.raises(FileExistsError):
        fs.pipe_file("a", b"second", mode="create")
    assert fs.cat_file("a") == b"first"
    fs.pipe({"a": b"third", "b": memoryview(b"mv")})
    assert fs.cat(["a", "b"]) == {"a": b"third", "b": b"mv"}
    with pytest.raises(TypeError, match="stores bytes"):
        fs.pipe_file("c", "text")
    fs.mkdir("dir")
    with pytest.raises(IsADirectoryError):
        fs.pipe_file("dir", b"x")
    with pytest.raises(NotADirectoryError):
        fs.pipe_file("a/under", b"x")


def test_a_written_file_appears_whole_at_close(fs: PolystoreFileSystem) -> None:
    chunk = bytes(range(256)) * 16
    with fs.open("w/out.bin", "wb", block_size=1024) as f:
        for _ in range(10):
            f.write(chunk)  # past the block size many times
            assert not fs.exists("w/out.bin")
        assert f.writable() and not f.readable()
    assert fs.cat_file("w/out.bin") == chunk * 10


def test_an_exception_inside_with_writes_nothing(fs: PolystoreFileSystem) -> None:
    fs.pipe_file("kept", b"old")
    for mode in ("wb", "w"):
        with pytest.raises(RuntimeError), fs.open("kept", mode) as f:
            f.write(b"new" if mode == "wb" else "new")
            raise RuntimeError("interrupted")
        with pytest.raises(RuntimeError), fs.open("fresh", mode) as f:
            f.write(b"new" if mode == "wb" else "new")
            raise RuntimeError("interrupted")
    assert fs.cat_file("kept") == b"old"
    assert not fs.exists("fresh")


def test_exclusive_and_append_modes(fs: PolystoreFileSystem) -> None:
    fs.pipe_file("x", b"1")
    with pytest.raises(FileExistsError):
        fs.open("x", "xb")
    f = fs.open("y", "xb")
    f.write(b"mine")
    fs.pipe_file("y", b"theirs")  # someone else got there first
    with pytest.raises(FileExistsError):
        f.close()
    assert fs.cat_file("y") == b"theirs"
    with fs.open("y", "ab") as f:
        f.write(b" and more")
    assert fs.cat_file("y") == b"theirs and more"
    with fs.open("new", "ab") as f:
        f.write(b"appended to nothing")
    assert fs.cat_file("new") == b"appended to nothing"
    fs.backend.save(np.arange(3), "arr")
    with pytest.raises(UnsupportedOperationError, match="cannot append"):
        fs.open("arr", "ab")


def test_fsspec_transactions_commit_together_or_not_at_all(fs: PolystoreFileSystem) -> None:
    with fs.transaction:
        with fs.open("tx/a", "wb") as f:
            f.write(b"a")
        with fs.open("tx/b", "wb") as f:
            f.write(b"b")
        assert not fs.exists("tx/a")
    assert fs.cat(["tx/a", "tx/b"]) == {"tx/a": b"a", "tx/b": b"b"}
    with pytest.raises(RuntimeError), fs.transaction:
        with fs.open("tx/c", "wb") as f:
            f.write(b"c")
        raise RuntimeError
    assert not fs.exists("tx/c")
    # One commit failing takes back the others.
    with pytest.raises(NotADirectoryError), fs.transaction:
        with fs.open("tx/d", "wb") as f:
            f.write(b"d")
        with fs.open("tx/a/under-a-file", "wb") as f:
            f.write(b"e")
    assert not fs.exists("tx/d")


# -- changing the tree -----------------------------------------------------------------------------


def test_mkdir_makedirs_rmdir(fs: PolystoreFileSystem) -> None:
    fs.mkdir("a/b/c")
    assert fs.isdir("a/b/c")
    with pytest.raises(FileExistsError):
        fs.mkdir("a/b")
    with pytest.raises(FileNotFoundError):
        fs.mkdir("x/y", create_parents=False)
    fs.mkdir("a/new", create_parents=False)
    fs.makedirs("a/b/c", exist_ok=True)
    with pytest.raises(FileExistsError):
        fs.makedirs("a/b/c")
    fs.pipe_file("a/file", b"")
    with pytest.raises(FileExistsError):
        fs.makedirs("a/file", exist_ok=True)
    with pytest.raises(NotADirectoryError):
        fs.mkdir("a/file/sub", create_parents=False)
    with pytest.raises(OSError, match="not empty"):
        fs.rmdir("a/b")
    fs.rmdir("a/b/c")
    assert not fs.exists("a/b/c")
    with pytest.raises(NotADirectoryError):
        fs.rmdir("a/file")
    fs.rmdir("")  # the root stays
    assert fs.isdir("")


def test_rm(tree: PolystoreFileSystem, monkeypatch: pytest.MonkeyPatch) -> None:
    fs = tree
    with pytest.raises(IsADirectoryError):
        fs.rm_file("t/sub")
    fs.rm_file("t/a.npy")
    with pytest.raises(OSError, match="not empty"):
        fs.rm("t/sub")
    with pytest.raises(FileNotFoundError):
        fs.rm(["t/b.csv", "t/missing"])
    assert fs.exists("t/b.csv")  # all or nothing
    deletes: list[tuple[str, bool]] = []
    real = fs.backend.delete
    monkeypatch.setattr(
        fs.backend,
        "delete",
        lambda p, recursive=False: (deletes.append((p, recursive)), real(p, recursive)),
    )
    fs.rm("t/sub", recursive=True)
    assert deletes == [("t/sub", True)]  # the tree in one catalog operation
    fs.rm("t/empty")
    fs.rm("t/*", recursive=True)
    assert fs.ls("t") == []


def test_cp_file_shares_content(fs: PolystoreFileSystem) -> None:
    fs.pipe_file("src/a", bytes(2 << 20))
    fs.pipe_file("dst/a", b"replaced")
    fs.cp_file("src/a", "dst/a")
    assert fs.info("dst/a")["hash"] == fs.info("src/a")["hash"]
    assert fs.cat_file("dst/a") == bytes(2 << 20)
    fs.cp_file("src", "made/dir")
    assert fs.isdir("made/dir") and fs.ls("made/dir") == []
    fs.copy("src", "whole", recursive=True)
    assert fs.find("whole") == ["whole/a"]
    with pytest.raises(IsADirectoryError):
        fs.cp_file("src/a", "made/dir")
    with pytest.raises(FileNotFoundError):
        fs.cp_file("src/missing", "x")


def test_mv_of_a_directory_is_one_catalog_move(
    tree: PolystoreFileSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = tree
    before = fs.info("t/sub/deep/d.npy")
    moves: list[tuple[str, str]] = []
    real = fs.backend.move
    monkeypatch.setattr(fs.backend, "move", lambda a, b: (moves.append((a, b)), real(a, b)))
    fs.mv("t/sub", "moved")
    assert moves == [("t/sub", "moved")]
    after = fs.info("moved/deep/d.npy")
    assert after["created"] == before["created"] and after["hash"] == before["hash"]
    assert not fs.exists("t/sub")
    fs.mv("moved", "t/")  # into an existing directory, under its own name
    assert fs.find("t/moved") == ["t/moved/c.npy", "t/moved/deep/d.npy"]
    fs.mv("t/a.npy", "t/b.csv")  # a file replaces a file
    assert fs.cat_file("t/b.csv") == b"t/a.npy" and not fs.exists("t/a.npy")
    fs.makedirs("t/other/moved")
    fs.pipe_file("t/other/moved/x", b"")
    with pytest.raises(FileExistsError):
        fs.mv("t/moved", "t/other")
    with pytest.raises(FileNotFoundError):
        fs.mv("t/nothing", "t/x")
    fs.mv("t/moved", "t/moved")  # onto itself: nothing to do
    fs.mv("t/*.csv", "csvs/", recursive=True)  # a glob: copy and delete
    assert fs.find("csvs") == ["csvs/b.csv"]


def test_touch(fs: PolystoreFileSystem) -> None:
    fs.touch("t/empty")
    assert fs.cat_file("t/empty") == b"" and fs.info("t/empty")["size"] == 0
    fs.pipe_file("t/full", b"content")
    fs.touch("t/full")
    assert fs.cat_file("t/full") == b""
    with pytest.raises(NotImplementedError, match="modification time"):
        fs.touch("t/full", truncate=False)
    fs.touch("t/new", truncate=False)
    assert fs.exists("t/new")


# -- pickling and other processes ----------------------------------------------------------------


def test_pickled_filesystem_reopens_the_catalog(catalog_url: str) -> None:
    with PolystoreFileSystem(catalog_url, inline_limit=5) as fs:
        unopened = pickle.loads(pickle.dumps(fs))  # nothing opened yet: URL and options
        fs.pipe_file("a", b"from the original")
        opened = pickle.loads(pickle.dumps(fs))  # the backend, by its configuration
        for copy in (unopened, opened):
            with copy:
                assert copy.cat_file("a") == b"from the original"
                assert copy.backend.inline_limit == 5
                assert copy.backend is not fs.backend
        with SQLBackend(catalog_url) as backend:
            shared = PolystoreFileSystem(backend)
            with pickle.loads(pickle.dumps(shared)) as copy:
                assert copy.backend is not backend
                assert copy.cat_file("a") == b"from the original"
            assert backend.exists("a")


def test_an_unopened_filesystem_pickles_an_absolute_sqlite_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    fs = PolystoreFileSystem("sqlite:///relative.db")
    copy = pickle.loads(pickle.dumps(fs))
    assert copy.url == f"sqlite:///{tmp_path}/relative.db"
    with pytest.raises(TypeError, match="in-memory SQLite"):
        pickle.dumps(PolystoreFileSystem("sqlite://"))


def _child_uses_filesystem(fs: PolystoreFileSystem, queue: Any) -> None:
    with fs:
        queue.put(fs.cat_file("parent.bin"))
        with fs.open("child.bin", "wb") as f:
            f.write(b"from the child")


@pytest.mark.slow
def test_a_spawned_process_uses_a_pickled_filesystem(fs: PolystoreFileSystem) -> None:
    fs.pipe_file("parent.bin", b"from the parent")
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_child_uses_filesystem, args=(fs, queue))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0
    assert queue.get(timeout=10) == b"from the parent"
    assert fs.cat_file("child.bin") == b"from the child"


def test_pandas_reads_and_writes_through_storage_options(catalog_url: str) -> None:
    import pandas as pd

    options = {"url": catalog_url}
    frame = pd.DataFrame({"well": ["A01", "B02"], "count": [3, 4]})
    frame.to_csv("polystore://plate1/counts.csv", index=False, storage_options=options)
    back = pd.read_csv("polystore://plate1/counts.csv", storage_options=options)
    pd.testing.assert_frame_equal(back, frame)
    with SQLBackend(catalog_url) as backend:
        assert backend.load("plate1/counts.csv") == b"well,count\nA01,3\nB02,4\n"


# -- staying light ---------------------------------------------------------------------------------


def test_import_polystore_does_not_import_fsspec() -> None:
    code = "import sys, polystore; print('fsspec' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_arrays_read_as_npy_bytes(fs: PolystoreFileSystem) -> None:
    values: dict[str, Any] = {
        "scalar": np.float32(2.5),
        "empty": np.zeros((0, 3)),
        "structured": np.array([(1, 2.0)], dtype=[("a", "<i2"), ("b", ">f8")]),
        "datetimes": np.array(["2024-01-01"], dtype="datetime64[D]"),
    }
    for name, value in values.items():
        fs.backend.save(value, f"arr/{name}")
        loaded = np.load(io.BytesIO(fs.cat_file(f"arr/{name}")))
        np.testing.assert_array_equal(loaded, np.asarray(value))
        assert loaded.dtype == np.asarray(value).dtype


def test_a_range_reads_only_its_bytes_from_the_blob_store(
    catalog_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cat_file of a range fetches that range from the store, never the whole object."""
    backend = SQLBackend(catalog_url, blob_store=f"file://{tmp_path}/blobs", inline_limit=0)
    store = backend.blob_store
    assert store is not None
    fetched: list[int] = []
    real_range = store.read_range

    def counting_range(content_hash: str, start: int, end: int) -> bytes:
        data = real_range(content_hash, start, end)
        fetched.append(len(data))
        return data

    def no_open(content_hash: str) -> Any:
        raise AssertionError("a ranged read opened the whole object")

    data = bytes(range(256)) * 4096  # 1 MiB
    backend.save(data, "big.bin")
    backend.save("héllo wörld", "note.txt")
    monkeypatch.setattr(store, "read_range", counting_range)
    monkeypatch.setattr(store, "open", no_open)
    with PolystoreFileSystem(backend) as fs:
        assert fs.cat_file("big.bin", 1000, 1010) == data[1000:1010]
        assert fs.cat_file("note.txt", 1, 3) == "héllo wörld".encode()[1:3]
    assert fetched == [10, 2]
    backend.close()
