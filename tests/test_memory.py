"""MemoryBackend: the conformance suite plus memory-only behaviour."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from polystore import (
    FileManager,
    MemoryBackend,
    ReadOnlyBackend,
    SerializationError,
    StorageBackend,
)
from polystore.testing import BackendTests, ReadOnlyBackendTests


class TestMemoryBackend(BackendTests):
    supports_attrs = True

    @pytest.fixture
    def backend(self) -> MemoryBackend:
        return MemoryBackend()


class FrozenView(ReadOnlyBackend):
    """A read-only view of another backend, as a user might write one."""

    def __init__(self, inner: StorageBackend) -> None:
        self.inner = inner

    def load(self, file_path: str, **kwargs: Any) -> Any:
        return self.inner.load(file_path, **kwargs)

    def list_files(self, directory: str, **kwargs: Any) -> list[str]:
        return self.inner.list_files(directory, **kwargs)

    def exists(self, path: str) -> bool:
        return self.inner.exists(path)

    def is_file(self, path: str) -> bool:
        return self.inner.is_file(path)

    def is_dir(self, path: str) -> bool:
        return self.inner.is_dir(path)

    def list_dir(self, path: str) -> list[str]:
        return self.inner.list_dir(path)


class TestReadOnlyView(ReadOnlyBackendTests):
    existing_file = "data/existing.npy"

    @pytest.fixture
    def backend(self) -> FrozenView:
        inner = MemoryBackend()
        inner.save(np.arange(5), self.existing_file)
        return FrozenView(inner)


def test_any_copyable_value_at_any_path() -> None:
    backend = MemoryBackend()
    value = {"array": np.arange(3), "tuple": (1, 2), "set": {3}}
    backend.save(value, "anything.bin")
    loaded = backend.load("anything.bin")
    assert loaded["tuple"] == (1, 2)
    assert loaded["set"] == {3}
    np.testing.assert_array_equal(loaded["array"], np.arange(3))
    loaded["array"][0] = 9
    assert backend.load("anything.bin")["array"][0] == 0


def test_uncopyable_value() -> None:
    backend = MemoryBackend()
    with pytest.raises(SerializationError, match="lock"):
        backend.save(threading.Lock(), "lock.bin")
    assert backend.list_files("") == []


def test_read_only_array_comes_back_writeable() -> None:
    backend = MemoryBackend()
    frozen = np.arange(3)
    frozen.flags.writeable = False
    backend.save(frozen, "frozen.npy")
    assert backend.load("frozen.npy").flags.writeable


def test_unknown_keyword_is_an_error() -> None:
    backend = MemoryBackend()
    with pytest.raises(TypeError, match="overwite"):
        backend.save(b"x", "x.bin", overwite=False)
    with pytest.raises(TypeError, match="mmap_mode"):
        backend.load("x.bin", mmap_mode="r")
    # Bad attrs are a SerializationError (a TypeError), as on the SQL catalog.
    with pytest.raises(SerializationError, match="attrs must be a dict with str keys"):
        backend.save(b"x", "x.bin", attrs=["not", "a", "mapping"])
    assert not backend.exists("x.bin")


def test_stat_describes_values() -> None:
    backend = MemoryBackend()
    backend.save(np.zeros((2, 3), dtype=np.float32), "a.npy", attrs={"unit": "m"})
    backend.save("héllo", "s.txt")
    backend.save({"k": [1, 2]}, "d.json")
    array_stat = backend.stat("a.npy")
    assert (array_stat.serializer, array_stat.size) == ("ndarray", 24)
    assert (array_stat.dtype, array_stat.shape, array_stat.attrs) == (
        "float32",
        (2, 3),
        {"unit": "m"},
    )
    assert (backend.stat("s.txt").serializer, backend.stat("s.txt").size) == ("str", 6)
    assert backend.stat("d.json").serializer == "json"
    created = array_stat.created_at
    backend.save(np.ones(1), "a.npy")
    restat = backend.stat("a.npy")
    assert restat.created_at == created
    assert created is not None
    assert restat.modified_at is not None
    assert restat.modified_at >= created
    assert restat.attrs == {}


def test_save_batch_is_all_or_nothing_through_file_manager() -> None:
    fm = FileManager({"mem": MemoryBackend()}, default_backend="mem")
    with pytest.raises(SerializationError):
        fm.save_batch([b"a", threading.Lock()], ["a.bin", "b.bin"])
    assert fm.list_files("", recursive=True) == []


def test_threads_share_one_backend() -> None:
    backend = MemoryBackend()

    def writer(n: int) -> None:
        for i in range(50):
            backend.save(np.full(3, i), f"t{n}/{i}.npy")

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(backend.list_files("", recursive=True)) == 200
    assert backend.list_dir("") == ["t0", "t1", "t2", "t3"]


def test_move_then_copy_keeps_tree_consistent() -> None:
    backend = MemoryBackend()
    backend.save(b"1", "a/b/c.bin")
    backend.move("a/b", "x")
    backend.copy("x", "a/b")
    assert backend.list_files("", recursive=True) == ["a/b/c.bin", "x/c.bin"]
    backend.delete("x", recursive=True)
    assert backend.list_dir("") == ["a"]
    assert backend.list_dir("a/b") == ["c.bin"]
