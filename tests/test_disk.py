"""DiskBackend: the conformance suite plus atomic writes and formats by extension."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from polystore import (
    AlreadyExistsError,
    BackendRegistry,
    DiskBackend,
    InvalidPathError,
    NotFoundError,
    SerializationError,
    UnsupportedOperationError,
)
from polystore.backends.disk import TEMP_PREFIX, format_for
from polystore.errors import NotADirectoryError as PolystoreNotADirectoryError
from polystore.testing import BackendTests, assert_values_equal


class TestDiskBackend(BackendTests):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> DiskBackend:
        return DiskBackend(tmp_path / "root")


@pytest.fixture
def disk(tmp_path: Path) -> DiskBackend:
    return DiskBackend(tmp_path)


def all_files(root: Path) -> list[str]:
    """Every file under ``root``, temporary ones included."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# -- construction -----------------------------------------------------------------


def test_root_is_created_and_kept_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = DiskBackend(tmp_path / "new" / "root")
    assert backend.root == tmp_path / "new" / "root"
    assert backend.root.is_dir()
    monkeypatch.chdir(tmp_path)
    relative = DiskBackend("rel")
    monkeypatch.chdir("/")
    relative.save(b"x", "f.bin")
    assert (tmp_path / "rel" / "f.bin").read_bytes() == b"x"


def test_root_must_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(PolystoreNotADirectoryError):
        DiskBackend(tmp_path / "file")
    with pytest.raises(PolystoreNotADirectoryError):
        DiskBackend(tmp_path / "file" / "below")


def test_registry_builds_disk_at_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    backend = BackendRegistry()["disk"]
    assert isinstance(backend, DiskBackend)
    assert backend.root == tmp_path


# -- atomic writes -------------------------------------------------------------------


def test_failed_replace_leaves_nothing_behind(
    disk: DiskBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk.save(b"old", "keep.bin")

    def broken_replace(src: str, dst: str, **dir_fds: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        disk.save(b"new", "keep.bin")
    with pytest.raises(OSError, match="No space left"):
        disk.save(b"new", "fresh/sub/new.bin")
    assert all_files(tmp_path) == ["keep.bin"]
    assert not (tmp_path / "fresh").exists(), "directories made for a failed save remain"
    assert disk.load("keep.bin") == b"old"


def test_failure_mid_write_leaves_no_partial_file(
    disk: DiskBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from numpy.lib import format as npy_format

    disk.save(np.arange(3), "a.npy")

    def write_half_then_fail(fh: object, array: object, **kwargs: object) -> None:
        fh.write(b"\x93NUMPY partial")  # type: ignore[attr-defined]
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(npy_format, "write_array", write_half_then_fail)
    with pytest.raises(OSError, match="Input/output"):
        disk.save(np.arange(1000), "a.npy")
    with pytest.raises(OSError, match="Input/output"):
        disk.save(np.arange(1000), "b.npy")
    assert all_files(tmp_path) == ["a.npy"]
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.arange(3))


def test_overwrite_false_never_clobbers(disk: DiskBackend, tmp_path: Path) -> None:
    disk.save(b"first", "f.bin")
    with pytest.raises(AlreadyExistsError):
        disk.save(b"second", "f.bin", overwrite=False)
    assert (tmp_path / "f.bin").read_bytes() == b"first"
    assert all_files(tmp_path) == ["f.bin"]


def test_overwrite_false_without_hard_links(
    disk: DiskBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(src: str, dst: str, **dir_fds: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    disk.save(b"first", "f.bin", overwrite=False)
    with pytest.raises(AlreadyExistsError):
        disk.save(b"second", "f.bin", overwrite=False)
    assert all_files(tmp_path) == ["f.bin"]
    assert disk.load("f.bin") == b"first"


def test_temporary_files_are_hidden_and_reserved(disk: DiskBackend, tmp_path: Path) -> None:
    stray = tmp_path / "d" / f"{TEMP_PREFIX}0123456789abcdef"  # left by a crash
    stray.parent.mkdir()
    stray.write_bytes(b"half")
    disk.save(b"x", "d/real.bin")
    assert disk.list_dir("d") == ["real.bin"]
    assert disk.list_files("", recursive=True) == ["d/real.bin"]
    relative = f"d/{stray.name}"
    assert not disk.exists(relative)
    assert not disk.is_file(relative)
    with pytest.raises(FileNotFoundError):
        disk.load(relative)
    with pytest.raises(InvalidPathError, match="reserved"):
        disk.save(b"x", f"d/{TEMP_PREFIX}mine.bin")


def test_saved_files_follow_the_umask(disk: DiskBackend, tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        disk.save(b"x", "f.bin")
    finally:
        os.umask(umask)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o644


def test_attrs_are_not_supported(disk: DiskBackend) -> None:
    with pytest.raises(UnsupportedOperationError, match="attrs"):
        disk.save(b"x", "f.bin", attrs={"a": 1})
    with pytest.raises(TypeError, match="unexpected keyword arguments: colour"):
        disk.save(b"x", "f.bin", colour="red")
    assert not disk.exists("f.bin")


# -- formats by extension ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("a.npy", "npy"),
        ("a.NPY", "npy"),
        ("a.json", "json"),
        ("a.txt", "txt"),
        ("a.csv", "csv"),
        ("a.tif", "tiff"),
        ("a.ome.TIFF", "tiff"),
        ("a.bin", "bytes"),
        ("a.roi.zip", "bytes"),
        ("no_extension", "bytes"),
        ("npy", "bytes"),
    ],
)
def test_format_for(name: str, fmt: str) -> None:
    assert format_for(name) == fmt


def test_files_are_what_other_tools_expect(disk: DiskBackend, tmp_path: Path) -> None:
    disk.save(np.arange(4, dtype=np.int16), "a.npy")
    disk.save({"k": [1, None]}, "b.json")
    disk.save("line\r\nline", "c.txt")
    disk.save(bytearray(b"\x00\x01"), "d.raw")
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.arange(4, dtype=np.int16))
    assert json.loads((tmp_path / "b.json").read_text("utf-8")) == {"k": [1, None]}
    assert (tmp_path / "c.txt").read_bytes() == b"line\r\nline"
    assert (tmp_path / "d.raw").read_bytes() == b"\x00\x01"
    assert disk.load("d.raw") == b"\x00\x01"


def test_files_written_by_other_tools_load(disk: DiskBackend, tmp_path: Path) -> None:
    np.save(tmp_path / "ext.npy", np.eye(2))
    (tmp_path / "ext.json").write_text('{"x": 1}', "utf-8")
    assert_values_equal(disk.load("ext.npy"), np.eye(2))
    assert disk.load("ext.json") == {"x": 1}


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ({"a": 1}, "x.npy"),
        (np.array([object()]), "x.npy"),
        (np.arange(3), "x.json"),
        (b"bytes", "x.txt"),
        ("text", "x.bin"),
        (np.arange(3), "x.bin"),
        (np.arange(8).reshape(2, 2, 2), "x.csv"),
        (np.array([1 + 1j]), "x.csv"),
        (np.array(["a"]), "x.csv"),
        ([1, 2], "x.csv"),
        ("\udc80 lone surrogate", "x.txt"),
        ([1, 2], "x.tif"),
    ],
)
def test_value_the_extension_cannot_hold(
    disk: DiskBackend, tmp_path: Path, value: object, path: str
) -> None:
    with pytest.raises(SerializationError):
        disk.save(value, f"sub/{path}")
    assert all_files(tmp_path) == []
    assert not (tmp_path / "sub").exists()


@pytest.mark.parametrize(
    ("content", "path"),
    [
        (b"not an npy file", "bad.npy"),
        (b"{not json", "bad.json"),
        (b"\xff\xfe invalid utf-8", "bad.txt"),
        (b"1,2\n3,x\n", "bad.csv"),
        (b"not a tiff", "bad.tif"),
    ],
)
def test_corrupt_content(disk: DiskBackend, tmp_path: Path, content: bytes, path: str) -> None:
    (tmp_path / path).write_bytes(content)
    with pytest.raises(SerializationError, match="cannot read"):
        disk.load(path)


def test_pickled_npy_is_refused(disk: DiskBackend, tmp_path: Path) -> None:
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(SerializationError):
        disk.load("pickled.npy")


# -- CSV --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "array",
    [
        np.array([1.5, -2.25, np.nan, np.inf]),
        np.arange(6, dtype=np.int32).reshape(2, 3),
        np.array([[0.1, 1e-300], [1e300, -0.0]]),
        np.array([0.1, 1 / 3], dtype=np.float32),
        np.array([0.1, 65504], dtype=np.float16),
        np.array([[True, False]]),
        np.array([0, 2**64 - 1], dtype=np.uint64),
        np.array([-(2**63), 2**63 - 1], dtype=np.int64),
        np.arange(4, dtype=">i4").reshape(4, 1),
        np.array([[7.0]]),
        np.array([7]),
        np.empty((0, 3)),
        np.empty((2, 0), dtype=np.uint8),
    ],
)
def test_csv_round_trip(disk: DiskBackend, array: np.ndarray) -> None:
    disk.save(array, "t.csv")
    assert_values_equal(disk.load("t.csv"), array)


def test_csv_file_layout(disk: DiskBackend, tmp_path: Path) -> None:
    disk.save(np.array([[1, 2], [3, 4]], dtype=np.uint8), "t.csv")
    assert (tmp_path / "t.csv").read_text("utf-8") == (
        '# polystore: {"dtype": "|u1", "shape": [2, 2]}\n1,2\n3,4\n'
    )
    fortran = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    disk.save(fortran, "f.csv")
    loaded = disk.load("f.csv")
    np.testing.assert_array_equal(loaded, fortran)
    assert loaded.flags.c_contiguous, "CSV does not keep memory order (documented)"


def test_csv_without_header_loads_as_2d_float(disk: DiskBackend, tmp_path: Path) -> None:
    (tmp_path / "plain.csv").write_text("1,2,3\n4,5,6\n", "utf-8")
    (tmp_path / "column.csv").write_text("1\n2\n", "utf-8")
    (tmp_path / "empty.csv").write_text("", "utf-8")
    assert_values_equal(disk.load("plain.csv"), np.array([[1.0, 2, 3], [4, 5, 6]]))
    assert_values_equal(disk.load("column.csv"), np.array([[1.0], [2.0]]))
    assert disk.load("empty.csv").shape == (0, 0)


# -- TIFF -------------------------------------------------------------------------------


def test_tiff_round_trip(disk: DiskBackend, tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    image = np.arange(12, dtype=np.uint16).reshape(3, 4)
    for name in ("img.tif", "img.TIFF", "img.ome.tiff"):
        disk.save(image, f"plate/{name}")
        assert_values_equal(disk.load(f"plate/{name}"), image, context=name)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "plate" / "img.tif"), image)
    assert disk.list_files("plate", extensions={".ome.tiff"}) == ["plate/img.ome.tiff"]


def test_tiff_byte_order_becomes_native(disk: DiskBackend) -> None:
    pytest.importorskip("tifffile")
    disk.save(np.arange(3, dtype=">f8"), "be.tif")
    loaded = disk.load("be.tif")
    assert loaded.dtype == np.dtype("float64")
    np.testing.assert_array_equal(loaded, [0.0, 1.0, 2.0])


def test_tiff_without_tifffile(disk: DiskBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tifffile", None)  # makes `import tifffile` fail
    with pytest.raises(SerializationError, match=r"pip install 'polystore\[tiff\]'"):
        disk.save(np.zeros((2, 2)), "x.tif")
    assert not disk.exists("x.tif")


# -- stat and tree operations on real files ------------------------------------------------


def test_stat_reads_the_npy_header(disk: DiskBackend, tmp_path: Path) -> None:
    disk.save(np.zeros((4, 5), dtype="<i2"), "a.npy")
    st = disk.stat("a.npy")
    assert (st.serializer, st.dtype, st.shape) == ("npy", "int16", (4, 5))
    assert st.size == (tmp_path / "a.npy").stat().st_size
    assert st.modified_at is not None
    assert st.modified_at.tzinfo is not None
    (tmp_path / "broken.npy").write_bytes(b"junk")
    assert (disk.stat("broken.npy").dtype, disk.stat("broken.npy").shape) == (None, None)
    assert disk.stat("").kind == "dir"


def test_copy_of_a_tree_skips_temporary_files(disk: DiskBackend, tmp_path: Path) -> None:
    disk.save(b"x", "src/f.bin")
    (tmp_path / "src" / f"{TEMP_PREFIX}stray").write_bytes(b"half")
    disk.copy("src", "dst")
    assert sorted(os.listdir(tmp_path / "dst")) == ["f.bin"]


def test_delete_removes_a_symlink_not_its_target(disk: DiskBackend, tmp_path: Path) -> None:
    disk.save(b"x", "target/f.bin")
    (tmp_path / "link").symlink_to(tmp_path / "target", target_is_directory=True)
    assert disk.is_dir("link")
    assert disk.list_files("link") == ["link/f.bin"]
    assert disk.list_files("", recursive=True) == ["target/f.bin"], "symlinks not followed"
    disk.delete("link")
    assert not (tmp_path / "link").exists()
    assert disk.load("target/f.bin") == b"x"


# -- symbolic links: followed inside the root, never out of it -------------------------------

SECRET = b"outside the root"


@pytest.fixture
def linked(tmp_path: Path) -> tuple[DiskBackend, Path, Path]:
    """A root beside a directory ``outside``, with links from one into the other:

    ``link`` -> outside (absolute), ``rel`` -> ../outside (relative),
    ``evil.bin`` -> outside/secret.txt, ``keep/up`` -> ../../outside/secret.txt,
    ``dangling`` -> outside/missing (no such thing).
    """
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "secret.txt").write_bytes(SECRET)
    (outside / "sub" / "deep.bin").write_bytes(SECRET)
    root = tmp_path / "root"
    disk = DiskBackend(root)
    disk.save(b"mine", "keep/mine.bin")
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "rel").symlink_to("../outside", target_is_directory=True)
    (root / "evil.bin").symlink_to(outside / "secret.txt")
    (root / "keep" / "up").symlink_to("../../outside/secret.txt")
    (root / "dangling").symlink_to(outside / "missing")
    return disk, root, outside


def tree_of(top: Path) -> dict[str, bytes | str]:
    """Every entry under ``top``: file contents, ``"dir"``, or ``"-> target"`` for a link."""
    out: dict[str, bytes | str] = {}
    for p in top.rglob("*"):
        key = str(p.relative_to(top))
        if p.is_symlink():
            out[key] = f"-> {os.readlink(p)}"
        elif p.is_dir():
            out[key] = "dir"
        else:
            out[key] = p.read_bytes()
    return out


def test_save_through_a_link_out_of_the_root_is_refused(
    linked: tuple[DiskBackend, Path, Path],
) -> None:
    disk, _, outside = linked
    before = tree_of(outside)
    for path in ("link/x.bin", "rel/x.bin", "link/new/dir/x.bin", "dangling/x.bin"):
        with pytest.raises(InvalidPathError, match="out of the root"):
            disk.save(b"x", path)
        with pytest.raises(InvalidPathError, match="out of the root"):
            disk.save_batch([b"x"], [path])
    with pytest.raises(InvalidPathError, match="out of the root"):
        disk.ensure_directory("link/made")
    assert tree_of(outside) == before, "something was written outside the root"
    assert not (outside / "missing").exists()


def test_load_through_a_link_out_of_the_root_is_refused(
    linked: tuple[DiskBackend, Path, Path],
) -> None:
    disk, _, _ = linked
    for path in ("link/secret.txt", "rel/secret.txt", "link/sub/deep.bin", "evil.bin", "keep/up"):
        with pytest.raises(InvalidPathError, match="out of the root"):
            disk.load(path)
        with pytest.raises(InvalidPathError, match="out of the root"):
            disk.load_batch(["keep/mine.bin", path])
        with pytest.raises(InvalidPathError, match="out of the root"):
            disk.stat(path)
        for query in (disk.exists, disk.is_file, disk.is_dir):
            with pytest.raises(InvalidPathError, match="out of the root"):
                query(path)
    for path in ("link", "rel", "link/sub"):
        with pytest.raises(InvalidPathError, match="out of the root"):
            disk.list_dir(path)
        with pytest.raises(InvalidPathError, match="out of the root"):
            disk.list_files(path, recursive=True)


def test_listings_leave_out_links_out_of_the_root(
    linked: tuple[DiskBackend, Path, Path],
) -> None:
    disk, _, _ = linked
    assert disk.list_dir("") == ["keep"]
    assert disk.list_dir("keep") == ["mine.bin"]
    assert disk.list_files("", recursive=True) == ["keep/mine.bin"]
    assert disk.list_files("keep") == ["keep/mine.bin"]


def test_saving_over_a_link_out_of_the_root_is_refused(
    linked: tuple[DiskBackend, Path, Path],
) -> None:
    disk, root, outside = linked
    for overwrite in (True, False):
        for path in ("evil.bin", "keep/up", "dangling"):
            with pytest.raises(InvalidPathError, match="out of the root"):
                disk.save(b"replaced", path, overwrite=overwrite)
    assert (outside / "secret.txt").read_bytes() == SECRET
    assert not (outside / "missing").exists()
    assert (root / "evil.bin").is_symlink(), "the link was replaced"


def test_delete_and_move_act_on_the_link_itself(
    linked: tuple[DiskBackend, Path, Path],
) -> None:
    disk, root, outside = linked
    before = tree_of(outside)
    disk.delete("keep/up")
    disk.delete("link", recursive=True)
    assert not os.path.lexists(root / "keep" / "up")
    assert not os.path.lexists(root / "link")
    disk.move("evil.bin", "keep/moved.bin")
    assert (root / "keep" / "moved.bin").is_symlink(), "move carried the content, not the link"
    with pytest.raises(InvalidPathError, match="out of the root"):
        disk.load("keep/moved.bin")
    assert tree_of(outside) == before


def test_delete_through_a_link_out_of_the_root_is_refused(
    linked: tuple[DiskBackend, Path, Path],
) -> None:
    disk, _, outside = linked
    before = tree_of(outside)
    for path in ("link/secret.txt", "link/sub", "rel/sub/deep.bin"):
        for recursive in (False, True):
            with pytest.raises(InvalidPathError, match="out of the root"):
                disk.delete(path, recursive=recursive)
    assert tree_of(outside) == before


def test_recursive_delete_never_leaves_the_root(
    linked: tuple[DiskBackend, Path, Path],
) -> None:
    disk, root, outside = linked
    before = tree_of(outside)
    (root / "keep" / "inner").symlink_to(outside, target_is_directory=True)
    disk.delete("keep", recursive=True)
    assert not (root / "keep").exists()
    assert tree_of(outside) == before


def test_move_through_a_link_out_of_the_root_is_refused(
    linked: tuple[DiskBackend, Path, Path],
) -> None:
    disk, root, outside = linked
    before, inside = tree_of(outside), tree_of(root)
    for src, dst in [
        ("keep/mine.bin", "link/mine.bin"),  # out of the root
        ("keep", "rel/keep"),
        ("keep/mine.bin", "dangling/mine.bin"),
        ("link/secret.txt", "stolen.txt"),  # into the root
        ("link/sub", "stolen"),
    ]:
        with pytest.raises(InvalidPathError, match="out of the root"):
            disk.move(src, dst)
        with pytest.raises(InvalidPathError, match="out of the root"):
            disk.copy(src, dst)
    assert tree_of(outside) == before
    assert tree_of(root) == inside


def test_copy_never_reads_through_a_link_out_of_the_root(
    linked: tuple[DiskBackend, Path, Path],
) -> None:
    disk, root, outside = linked
    before = tree_of(outside)
    with pytest.raises(InvalidPathError, match="out of the root"):
        disk.copy("evil.bin", "copy.bin")
    disk.copy("keep", "copied")  # holds keep/up -> ../../outside/secret.txt
    assert (root / "copied" / "up").is_symlink(), "a link in a copied tree stays a link"
    assert disk.load("copied/mine.bin") == b"mine"
    with pytest.raises(InvalidPathError, match="out of the root"):
        disk.load("copied/up")
    assert SECRET not in tree_of(root).values(), "the secret was copied into the root"
    assert tree_of(outside) == before


def test_links_inside_the_root_are_followed(disk: DiskBackend, tmp_path: Path) -> None:
    disk.save(b"t", "target/f.bin")
    (tmp_path / "alias").symlink_to("target", target_is_directory=True)
    (tmp_path / "absolute").symlink_to(tmp_path / "target", target_is_directory=True)
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "up").symlink_to("../../target/f.bin")
    (tmp_path / "file").symlink_to("alias/f.bin")  # a link through a link
    for path in ("alias/f.bin", "absolute/f.bin", "a/b/up", "file"):
        assert disk.load(path) == b"t", path
        assert disk.is_file(path) and disk.exists(path), path
        assert disk.stat(path).size == 1, path
    disk.save(b"g", "alias/g.bin")
    disk.save(b"n", "absolute/new/n.bin")
    assert disk.load("target/g.bin") == b"g"
    assert disk.load("target/new/n.bin") == b"n"
    assert disk.list_dir("alias") == ["f.bin", "g.bin", "new"]
    assert disk.list_files("absolute", recursive=True) == [
        "absolute/f.bin",
        "absolute/g.bin",
        "absolute/new/n.bin",
    ]
    assert disk.list_dir("") == ["a", "absolute", "alias", "file", "target"]
    assert disk.list_files("") == ["file"]
    disk.ensure_directory("alias/made")
    assert (tmp_path / "target" / "made").is_dir()
    disk.copy("file", "copy.bin")  # a file link as the source: its content is copied
    assert not (tmp_path / "copy.bin").is_symlink()
    assert disk.load("copy.bin") == b"t"
    disk.move("copy.bin", "alias/copy.bin")
    assert (tmp_path / "target" / "copy.bin").read_bytes() == b"t"
    disk.delete("alias/copy.bin")
    assert not (tmp_path / "target" / "copy.bin").exists()


def test_a_link_may_not_climb_above_the_root_even_to_come_back(tmp_path: Path) -> None:
    root = tmp_path / "root"
    disk = DiskBackend(root)
    disk.save(b"t", "target/f.bin")
    (root / "sneaky").symlink_to("../root/target", target_is_directory=True)
    (root / "target" / "deep").symlink_to("../../root/target/f.bin")
    for path in ("sneaky/f.bin", "target/deep"):
        with pytest.raises(InvalidPathError, match="out of the root"):
            disk.load(path)
    assert disk.list_dir("") == ["target"]


def test_saving_over_a_link_inside_the_root(disk: DiskBackend, tmp_path: Path) -> None:
    """The atomic rename replaces a link to a file; a link to a directory is a directory."""
    disk.save(b"t", "target/f.bin")
    (tmp_path / "to_file").symlink_to("target/f.bin")
    (tmp_path / "to_dir").symlink_to("target", target_is_directory=True)
    (tmp_path / "nothing").symlink_to("missing.bin")
    (tmp_path / "nowhere").symlink_to("missing_dir/x.bin")
    for path in ("to_file", "nothing", "nowhere"):
        disk.save(b"new", path)
        assert not (tmp_path / path).is_symlink() and disk.load(path) == b"new", path
    assert disk.load("target/f.bin") == b"t"
    assert sorted(os.listdir(tmp_path)) == ["nothing", "nowhere", "target", "to_dir", "to_file"]
    with pytest.raises(IsADirectoryError):
        disk.save(b"x", "to_dir")
    with pytest.raises(AlreadyExistsError):
        disk.copy("target/f.bin", "to_dir")


def test_moving_or_copying_a_directory_into_itself_through_a_link(
    disk: DiskBackend, tmp_path: Path
) -> None:
    disk.save(b"t", "target/f.bin")
    (tmp_path / "alias").symlink_to("target", target_is_directory=True)
    for op in (disk.move, disk.copy):
        with pytest.raises(InvalidPathError, match="into itself"):
            op("target", "alias/inner")
    with pytest.raises(InvalidPathError, match="into itself"):
        disk.copy("alias", "target/inner")  # copies what the link leads to
    assert all_files(tmp_path) == ["target/f.bin"]
    disk.move("alias", "target/inner")  # moves the link itself
    assert (tmp_path / "target" / "inner").is_symlink()


def test_dangling_links_inside_the_root(disk: DiskBackend, tmp_path: Path) -> None:
    (tmp_path / "gone").symlink_to("missing")
    (tmp_path / "gone_dir").symlink_to("missing_dir", target_is_directory=True)
    disk.save(b"x", "f.bin")
    (tmp_path / "through").symlink_to("f.bin/x")  # runs through a file
    for path in ("through", "through/y"):
        with pytest.raises(NotFoundError):
            disk.load(path)
        assert not disk.exists(path)
    os.unlink(tmp_path / "through")
    os.unlink(tmp_path / "f.bin")
    (tmp_path / f"{TEMP_PREFIX}0123").write_bytes(b"half")  # a crashed save's
    (tmp_path / "to_temp").symlink_to(f"{TEMP_PREFIX}0123")
    with pytest.raises(NotFoundError):
        disk.load("to_temp")
    assert not disk.exists("to_temp")
    os.unlink(tmp_path / "to_temp")
    os.unlink(tmp_path / f"{TEMP_PREFIX}0123")
    assert not disk.exists("gone") and not disk.is_file("gone") and not disk.is_dir("gone")
    with pytest.raises(NotFoundError):
        disk.load("gone")
    with pytest.raises(NotFoundError):
        disk.stat("gone")
    with pytest.raises(NotFoundError):
        disk.list_dir("gone_dir")
    with pytest.raises(PolystoreNotADirectoryError):
        disk.save(b"x", "gone_dir/x.bin")  # a link is not a directory to create
    assert disk.list_dir("") == []
    disk.delete("gone")
    assert not os.path.lexists(tmp_path / "gone")
    assert sorted(os.listdir(tmp_path)) == ["gone_dir"]


def test_symbolic_link_loops(disk: DiskBackend, tmp_path: Path) -> None:
    (tmp_path / "l1").symlink_to("l2")
    (tmp_path / "l2").symlink_to("l1")
    (tmp_path / "self").symlink_to(".", target_is_directory=True)
    disk.save(b"x", "f.bin")
    for path in ("l1", "l2/x.bin"):
        with pytest.raises(InvalidPathError, match="symbolic links"):
            disk.load(path)
        with pytest.raises(InvalidPathError, match="symbolic links"):
            disk.exists(path)
    assert disk.list_dir("self/self/self") == ["f.bin", "self"]
    assert disk.load("self/self/f.bin") == b"x"
    with pytest.raises(InvalidPathError, match="into itself"):
        disk.copy("self", "copy")  # the root, into itself
    assert disk.list_files("", recursive=True) == ["f.bin"], "a link to a directory is not entered"


def test_the_root_may_itself_be_a_link(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "root").symlink_to(real, target_is_directory=True)
    disk = DiskBackend(tmp_path / "root")
    disk.save(b"x", "d/f.bin")
    assert (real / "d" / "f.bin").read_bytes() == b"x"
    # An absolute link naming the root either way stays inside it.
    (real / "by_real").symlink_to(real / "d" / "f.bin")
    (real / "by_link").symlink_to(tmp_path / "root" / "d" / "f.bin")
    assert disk.load("by_real") == b"x"
    assert disk.load("by_link") == b"x"
    assert disk.list_files("", recursive=True) == ["by_link", "by_real", "d/f.bin"]
    disk.delete("d", recursive=True)
    assert sorted(os.listdir(real)) == ["by_link", "by_real"]


def test_a_directory_swapped_for_a_link_never_leads_out(tmp_path: Path) -> None:
    """Another process keeps swapping ``d`` between a directory and a link out of the
    root while this one saves, loads and deletes under ``d``: whatever each call
    sees, nothing outside is read, written or deleted."""
    import threading

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.bin").write_bytes(SECRET)
    root = tmp_path / "root"
    disk = DiskBackend(root)
    disk.ensure_directory("d")
    stop = threading.Event()

    def swap() -> None:
        d, parked = root / "d", root / "parked"
        while not stop.is_set():
            with contextlib.suppress(OSError):
                d.rename(parked)
                d.symlink_to(outside, target_is_directory=True)
                d.unlink()
                parked.rename(d)

    swapper = threading.Thread(target=swap)
    swapper.start()
    loaded = []
    try:
        for i in range(300):
            for call in (
                lambda: disk.save(b"mine", "d/x.bin"),
                lambda: loaded.append(disk.load("d/x.bin")),
                lambda: disk.delete("d/x.bin"),
                lambda i=i: disk.ensure_directory(f"d/sub{i}"),
            ):
                with contextlib.suppress(OSError, InvalidPathError):
                    call()
    finally:
        stop.set()
        swapper.join()
    assert SECRET not in loaded
    assert tree_of(outside) == {"x.bin": SECRET}
