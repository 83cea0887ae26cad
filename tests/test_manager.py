"""FileManager: routing to backends, path checks, errors passed through unchanged."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from polystore import (
    BackendNotFoundError,
    BackendRegistry,
    FileManager,
    InvalidPathError,
    MemoryBackend,
    NotFoundError,
    StorageBackend,
)


class RecordingBackend(StorageBackend):
    """A user backend written with the seed's loose signatures; records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.files: dict[str, Any] = {}

    def save(self, data, file_path, **kwargs):
        self.calls.append(("save", (file_path,), kwargs))
        self.files[file_path] = data

    def load(self, file_path, **kwargs):
        self.calls.append(("load", (file_path,), kwargs))
        if file_path not in self.files:
            raise FileNotFoundError(file_path)
        return self.files[file_path]

    def list_files(self, directory, **kwargs):
        self.calls.append(("list_files", (directory,), kwargs))
        return ["/z.bin", "a.bin"]  # unsorted, with a stray leading slash

    def exists(self, path):
        self.calls.append(("exists", (path,), {}))
        return path in self.files

    def is_file(self, path):
        return path in self.files

    def is_dir(self, path):
        return False

    def list_dir(self, path):
        return ["b", "a", "C"]


class Boom(Exception):
    pass


class FailingBackend(RecordingBackend):
    def load(self, file_path, **kwargs):
        raise Boom(file_path)


def test_default_registry_and_backend_keyword() -> None:
    fm = FileManager()
    assert isinstance(fm.registry, BackendRegistry)
    fm.save(np.arange(3), "a/b.npy", backend="memory")
    np.testing.assert_array_equal(fm.load("a/b.npy", backend="memory"), np.arange(3))
    assert fm.list_files("a", backend="memory") == ["a/b.npy"]
    assert fm.get_backend("memory") is fm.registry["memory"]


def test_plain_dict_registry_and_default_backend() -> None:
    memory = MemoryBackend()
    fm = FileManager({"mem": memory}, default_backend="mem")
    fm.save(b"x", "f.bin")
    assert memory.load("f.bin") == b"x"
    assert fm.load("f.bin") == b"x"
    assert fm.exists("f.bin")
    assert fm.is_file("f.bin")
    assert fm.is_dir("")
    assert fm.list_dir() == ["f.bin"]
    assert fm.get_backend() is memory


def test_unknown_backend() -> None:
    fm = FileManager({"mem": MemoryBackend()})
    with pytest.raises(BackendNotFoundError, match=r"no backend named 'nope'; available: mem"):
        fm.load("x.bin", backend="nope")
    with pytest.raises(KeyError):
        fm.save(b"x", "x.bin", backend="nope")
    with pytest.raises(BackendNotFoundError, match="no default_backend"):
        fm.load("x.bin")
    with pytest.raises(BackendNotFoundError, match=r"available:.*memory"):
        FileManager().load("x.bin", backend="nope")
    with pytest.raises(BackendNotFoundError, match="database URL"):
        FileManager("not a url")


def test_errors_pass_through_unwrapped() -> None:
    fm = FileManager({"mem": MemoryBackend(), "boom": FailingBackend()}, default_backend="mem")
    with pytest.raises(NotFoundError) as info:
        fm.load("missing.npy")
    assert type(info.value) is NotFoundError
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(Boom) as boom:
        fm.load("x.bin", backend="boom")
    assert boom.value.args == ("x.bin",)


def test_keyword_calls_reach_a_loose_user_backend() -> None:
    user = RecordingBackend()
    fm = FileManager({"user": user}, default_backend="user")
    fm.save(b"x", "/dir//f.bin", compress=True)
    assert fm.load("dir/./f.bin") == b"x"
    listed = fm.list_files("/dir/", pattern="*.bin", extensions={".BIN"}, recursive=True, deep=1)
    assert listed == ["a.bin", "z.bin"], "sorted, leading slash stripped"
    assert fm.list_dir("dir") == ["C", "a", "b"]
    assert user.calls[:3] == [
        ("save", ("dir/f.bin",), {"compress": True}),
        ("load", ("dir/f.bin",), {}),
        (
            "list_files",
            ("dir",),
            {"pattern": "*.bin", "extensions": (".bin",), "recursive": True, "deep": 1},
        ),
    ]


@pytest.mark.parametrize("bad", ["../escape.bin", "a/../../b.bin", "nul\x00.bin", ""])
def test_invalid_paths_never_reach_the_backend(bad: str) -> None:
    user = RecordingBackend()
    fm = FileManager({"user": user}, default_backend="user")
    with pytest.raises(InvalidPathError):
        fm.save(b"x", bad)
    with pytest.raises(InvalidPathError):
        fm.load(bad)
    with pytest.raises(InvalidPathError):
        fm.delete(bad)
    assert user.calls == []


def test_batches() -> None:
    fm = FileManager({"mem": MemoryBackend()}, default_backend="mem")
    fm.save_batch([b"1", b"2"], ["/b/1.bin", "b/2.bin"])
    assert fm.load_batch(["b/1.bin", "/b/2.bin"]) == [b"1", b"2"]
    with pytest.raises(ValueError, match="2 values but 1 paths"):
        fm.save_batch([b"1", b"2"], ["x.bin"])
    assert not fm.exists("x.bin")


def test_tree_operations_and_stat() -> None:
    fm = FileManager({"mem": MemoryBackend()}, default_backend="mem")
    fm.ensure_directory("/plates/p1/")
    fm.save(b"abc", "plates/p1/a.bin")
    fm.copy("plates/p1", "plates/p2")
    fm.move("/plates/p2/a.bin", "plates/p2/b.bin")
    assert fm.list_files("plates", recursive=True) == ["plates/p1/a.bin", "plates/p2/b.bin"]
    st = fm.stat("plates/p2/b.bin")
    assert (st.path, st.kind, st.size) == ("plates/p2/b.bin", "file", 3)
    fm.delete("plates", recursive=True)
    assert fm.list_dir() == []


def test_transaction_through_the_manager() -> None:
    fm = FileManager({"mem": MemoryBackend()}, default_backend="mem")
    with fm.transaction() as backend:
        assert backend is fm.get_backend()
        fm.save(b"kept", "kept.bin")

    def fail() -> None:
        with fm.transaction(backend="mem"):
            fm.save(b"lost", "lost.bin")
            raise RuntimeError("undo")

    with pytest.raises(RuntimeError, match="undo"):
        fail()
    assert fm.list_files() == ["kept.bin"]


def test_unsupported_operation_on_a_user_backend() -> None:
    from polystore import UnsupportedOperationError

    fm = FileManager({"user": RecordingBackend()}, default_backend="user")
    with pytest.raises(UnsupportedOperationError, match=r"RecordingBackend does not support move"):
        fm.move("a.bin", "b.bin")
    with pytest.raises(NotImplementedError):
        fm.stat("a.bin")


def test_close_releases_only_what_the_registry_built() -> None:
    closed: list[str] = []

    class Closing(MemoryBackend):
        def close(self) -> None:
            closed.append("closed")

    registry = BackendRegistry()
    mine = Closing()
    registry["mine"] = mine
    with FileManager(registry) as fm:
        built = fm.get_backend("memory")
    assert closed == [], "instances registered by hand belong to the caller"
    assert registry["mine"] is mine
    assert registry["memory"] is not built, "the registry kept an instance it closed"
