"""The read-write conformance suite: :class:`BackendTests`.

Subclass it in a test module, named ``Test...`` so pytest collects it, and
override the ``backend`` fixture to return a fresh, empty backend::

    from polystore.testing import BackendTests

    class TestMyBackend(BackendTests):
        @pytest.fixture
        def backend(self, tmp_path):
            return MyBackend(tmp_path)

Class attributes tailor the suite to what a backend offers; the defaults
describe a full backend such as the built-in ones. Transactions are tested when
the backend's own ``supports_transactions`` flag says so. The suite uses only
the public :class:`~polystore.StorageBackend` API, calling the backend directly
(no :class:`~polystore.FileManager` in between), so it also checks that the
backend normalises paths itself.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import pytest

from polystore import errors
from polystore.backends.base import StatResult, StorageBackend
from polystore.testing.samples import (
    AWKWARD_NAMES,
    KIND_EXTENSIONS,
    assert_values_equal,
    long_names,
    samples,
)

__all__ = ["BackendTests"]

ALL_OPTIONAL_OPERATIONS = frozenset({"delete", "move", "copy", "ensure_directory", "stat"})


class BackendTests:
    """Conformance tests every read-write backend passes.

    One class, long because it holds every test, so that a backend's test is
    one subclass of about twenty lines (a ``backend`` fixture and the
    capability flags below); each test is short and stands alone.
    """

    #: Value kinds the backend round-trips (see :mod:`polystore.testing.samples`).
    value_kinds: ClassVar[frozenset[str]] = frozenset(KIND_EXTENSIONS)
    #: Real directories: empty ones exist, ``is_dir``/``list_dir`` see them.
    supports_directories: ClassVar[bool] = True
    #: Optional operations that work; the others must raise
    #: :class:`~polystore.errors.UnsupportedOperationError`.
    optional_operations: ClassVar[frozenset[str]] = ALL_OPTIONAL_OPERATIONS
    #: ``save(..., overwrite=False)`` refuses to replace a file.
    supports_overwrite_false: ClassVar[bool] = True
    #: Mutating a saved or a loaded object never changes what is stored.
    stores_copies: ClassVar[bool] = True
    #: ``stat`` of an ``.npy`` file reports the array's ``dtype`` and ``shape``.
    stat_reports_array_metadata: ClassVar[bool] = True
    #: ``save(..., attrs={...})`` keeps attributes that ``stat`` returns.
    supports_attrs: ClassVar[bool] = False
    #: ``"a"`` and ``"A"`` are two different names.
    case_sensitive_names: ClassVar[bool] = True

    @pytest.fixture
    def backend(self) -> StorageBackend:
        """A fresh, empty backend. Subclasses must override this fixture."""
        pytest.fail(f"{type(self).__name__} must override the `backend` fixture")

    # -- helpers a subclass may override ------------------------------------------

    def value_for(self, path: str) -> Any:
        """A small value the backend can store at ``path`` (by its extension)."""
        lower = path.lower()
        if lower.endswith(".npy"):
            return np.arange(3, dtype=np.int16)
        if lower.endswith(".json"):
            return {"path": path}
        if lower.endswith(".txt"):
            return f"text at {path}"
        return b"bytes at " + path.encode("utf-8")

    def unstorable_value(self) -> Any:
        """A value no backend can store (a lock: not copyable, not serializable)."""
        return threading.Lock()

    def populate(self, backend: StorageBackend, *file_paths: str) -> dict[str, Any]:
        """Save :meth:`value_for` each path; return ``{path: value}``."""
        saved = {}
        for path in file_paths:
            saved[path] = self.value_for(path)
            backend.save(saved[path], path)
        return saved

    def require(self, *, kind: str | None = None, operation: str | None = None) -> None:
        if kind is not None and kind not in self.value_kinds:
            pytest.skip(f"{type(self).__name__} does not store {kind} values")
        if operation is not None and operation not in self.optional_operations:
            pytest.skip(f"{type(self).__name__} does not support {operation}()")

    def require_directories(self) -> None:
        if not self.supports_directories:
            pytest.skip(f"{type(self).__name__} has no real directories")

    # -- capability flags -------------------------------------------------------------

    def test_is_a_writable_storage_backend(self, backend: StorageBackend) -> None:
        assert isinstance(backend, StorageBackend)
        assert backend.read_only is False
        assert isinstance(backend.supports_transactions, bool)

    # -- round trips --------------------------------------------------------------------

    def _round_trip(self, backend: StorageBackend, kind: str) -> None:
        self.require(kind=kind)
        originals = samples(kind)
        for name, value in originals.items():
            backend.save(value, f"{kind}/{name}{KIND_EXTENSIONS[kind]}")
        expected = samples(kind)  # fresh: proves nothing was changed in place
        for name in originals:
            path = f"{kind}/{name}{KIND_EXTENSIONS[kind]}"
            assert_values_equal(backend.load(path), expected[name], context=path)

    def test_round_trip_arrays(self, backend: StorageBackend) -> None:
        self._round_trip(backend, "array")

    def test_round_trip_bytes(self, backend: StorageBackend) -> None:
        self._round_trip(backend, "bytes")

    def test_round_trip_str(self, backend: StorageBackend) -> None:
        self._round_trip(backend, "str")

    def test_round_trip_json(self, backend: StorageBackend) -> None:
        self._round_trip(backend, "json")

    def test_unstorable_value_raises_and_writes_nothing(self, backend: StorageBackend) -> None:
        for kind in sorted(self.value_kinds):
            path = f"fresh/bad{KIND_EXTENSIONS[kind]}"
            with pytest.raises(errors.SerializationError):
                backend.save(self.unstorable_value(), path)
            assert not backend.exists(path), path
        if self.supports_directories:
            assert not backend.exists("fresh"), "a failed save left its directory behind"

    def test_stored_values_are_copies(self, backend: StorageBackend) -> None:
        if not self.stores_copies:
            pytest.skip(f"{type(self).__name__} does not promise copies")
        if "array" in self.value_kinds:
            array = np.arange(4.0)
            backend.save(array, "copy.npy")
            array[0] = 99.0
            assert backend.load("copy.npy")[0] == 0.0, "caller's mutation reached the store"
            loaded = backend.load("copy.npy")
            loaded[1] = 99.0
            assert backend.load("copy.npy")[1] == 1.0, "mutating a loaded array changed the store"
        if "json" in self.value_kinds:
            doc: dict[str, Any] = {"items": [1, 2]}
            backend.save(doc, "copy.json")
            doc["items"].append(3)
            assert backend.load("copy.json") == {"items": [1, 2]}
            backend.load("copy.json")["items"].append(4)
            assert backend.load("copy.json") == {"items": [1, 2]}

    # -- overwrite ------------------------------------------------------------------------

    def test_save_replaces_an_existing_file(self, backend: StorageBackend) -> None:
        backend.save(b"first", "f.bin")
        backend.save(b"second", "f.bin")
        assert backend.load("f.bin") == b"second"

    def test_overwrite_false(self, backend: StorageBackend) -> None:
        if not self.supports_overwrite_false:
            pytest.skip(f"{type(self).__name__} has no overwrite=False")
        backend.save(b"new", "new.bin", overwrite=False)
        assert backend.load("new.bin") == b"new"
        with pytest.raises(errors.AlreadyExistsError):
            backend.save(b"other", "new.bin", overwrite=False)
        assert backend.load("new.bin") == b"new"

    # -- batches ----------------------------------------------------------------------------

    def test_batch_round_trip(self, backend: StorageBackend) -> None:
        kinds = sorted(self.value_kinds)
        values = [next(iter(samples(kind).values())) for kind in kinds]
        batch_paths = [f"batch/{i}{KIND_EXTENSIONS[kind]}" for i, kind in enumerate(kinds)]
        backend.save_batch(values, batch_paths)
        loaded = backend.load_batch(batch_paths)
        assert len(loaded) == len(values)
        for got, want, path in zip(loaded, values, batch_paths, strict=True):
            assert_values_equal(got, want, context=path)

    def test_empty_batches(self, backend: StorageBackend) -> None:
        backend.save_batch([], [])
        assert backend.load_batch([]) == []

    def test_batch_length_mismatch(self, backend: StorageBackend) -> None:
        with pytest.raises(ValueError, match="2 values but 1 paths"):
            backend.save_batch([b"a", b"b"], ["a.bin"])
        assert not backend.exists("a.bin")

    def test_batch_naming_a_path_twice(self, backend: StorageBackend) -> None:
        """The last value wins, as in a loop of saves; overwrite=False refuses the batch."""
        backend.save_batch([b"one", b"two"], ["twice/x.bin", "/twice//x.bin"])
        assert backend.load("twice/x.bin") == b"two"
        if not self.supports_overwrite_false:
            return
        with pytest.raises(errors.AlreadyExistsError):
            backend.save_batch(
                [b"1", b"2", b"3"], ["again/1.bin", "again/2.bin", "again/1.bin"], overwrite=False
            )
        if backend.supports_transactions:
            assert not backend.exists("again/1.bin"), "save_batch is not all-or-nothing"
            assert not backend.exists("again/2.bin")
        elif backend.exists("again/1.bin"):
            assert backend.load("again/1.bin") == b"1"  # never the second value

    def test_load_batch_order_repeats_and_directories(self, backend: StorageBackend) -> None:
        """Values come back in the order asked, from any directories, repeats included."""
        names = [f"many/{i:04d}.bin" for i in range(1200)]  # past any chunk of IN lists
        backend.save_batch([str(i).encode() for i in range(1200)], names)
        backend.save(b"top", "top.bin")
        backend.save(b"deep", "a/b/c/deep.bin")
        asked = ["a/b/c/deep.bin", *names[::-7], "top.bin", names[3], "top.bin"]
        want = [b"deep", *[str(i).encode() for i in range(1200)][::-7], b"top", b"3", b"top"]
        assert backend.load_batch(asked) == want
        if "array" in self.value_kinds and self.stores_copies:
            backend.save(np.arange(4.0), "arr.npy")
            first, second = backend.load_batch(["arr.npy", "arr.npy"])
            first[0] = 99.0  # a repeated path is loaded twice, not shared
            assert second[0] == 0.0 and backend.load("arr.npy")[0] == 0.0
        if self.supports_directories:
            with pytest.raises(errors.IsADirectoryError):
                backend.load_batch(["top.bin", "a/b"])
        with pytest.raises(errors.NotFoundError):
            backend.load_batch(["top.bin", "top.bin/under-a-file.bin"])

    def test_load_batch_missing_file(self, backend: StorageBackend) -> None:
        backend.save(b"x", "here.bin")
        with pytest.raises(errors.NotFoundError):
            backend.load_batch(["here.bin", "missing.bin"])

    def test_failed_batch(self, backend: StorageBackend) -> None:
        """A batch with an unstorable value raises; transactional backends save none of it."""
        values = [b"one", self.unstorable_value(), b"three"]
        with pytest.raises(errors.SerializationError):
            backend.save_batch(values, ["b/1.bin", "b/2.bin", "b/3.bin"])
        assert not backend.exists("b/2.bin")
        if backend.supports_transactions:
            assert not backend.exists("b/1.bin"), "save_batch is not all-or-nothing"
            assert not backend.exists("b/3.bin")

    # -- paths ---------------------------------------------------------------------------------

    def test_paths_are_normalised(self, backend: StorageBackend) -> None:
        backend.save(b"x", "/lead//sub/./x.bin/")
        assert backend.load("lead/sub/x.bin") == b"x"
        assert backend.is_file("/lead/sub/x.bin")
        assert backend.list_files("lead/sub/") == ["lead/sub/x.bin"]

    @pytest.mark.parametrize(
        "bad", ["../x.bin", "a/../../x.bin", "a/..", "nul\x00.bin", "x" * 256 + ".bin", "", "/"]
    )
    def test_invalid_paths(self, backend: StorageBackend, bad: str) -> None:
        with pytest.raises(errors.InvalidPathError):
            backend.save(b"x", bad)
        with pytest.raises(errors.InvalidPathError):
            backend.load(bad)
        assert backend.list_files("", recursive=True) == []

    def test_awkward_names_round_trip_and_list(self, backend: StorageBackend) -> None:
        names = [name + ".bin" for name in AWKWARD_NAMES]
        saved = self.populate(backend, *(f"awk/{name}" for name in names))
        assert backend.list_files("awk") == sorted(saved)
        for path, value in saved.items():
            assert backend.is_file(path), path
            assert backend.load(path) == value, path
        if self.supports_directories:
            assert backend.list_dir("awk") == sorted(names)

    def test_awkward_directory_names(self, backend: StorageBackend) -> None:
        dirs = [f"{name} dir" for name in AWKWARD_NAMES[:8]]
        saved = self.populate(backend, *(f"{d}/f.bin" for d in dirs))
        for d in dirs:
            assert backend.list_files(d) == [f"{d}/f.bin"], d
        assert backend.list_files("", recursive=True) == sorted(saved)
        if self.supports_directories:
            assert backend.list_dir("") == sorted(dirs)

    def test_long_names(self, backend: StorageBackend) -> None:
        names = long_names(".bin")
        assert all(len(n.encode("utf-8")) == 255 for n in names)
        saved = self.populate(backend, *(f"long/{n}" for n in names))
        assert backend.list_files("long") == sorted(saved)
        for path, value in saved.items():
            assert backend.load(path) == value
        long_dir = "d" * 255
        backend.save(b"deep", f"{long_dir}/{names[0]}")
        assert backend.load(f"{long_dir}/{names[0]}") == b"deep"
        with pytest.raises(errors.InvalidPathError):
            backend.save(b"x", "long/" + "x" * 252 + ".bin")  # 256 bytes

    def test_names_are_case_sensitive(self, backend: StorageBackend) -> None:
        if not self.case_sensitive_names:
            pytest.skip(f"{type(self).__name__} folds case")
        backend.save(b"lower", "case/name.bin")
        backend.save(b"upper", "case/NAME.bin")
        assert backend.load("case/name.bin") == b"lower"
        assert backend.load("case/NAME.bin") == b"upper"
        assert backend.list_files("case") == ["case/NAME.bin", "case/name.bin"]
        assert not backend.exists("case/Name.bin")

    # -- listing ----------------------------------------------------------------------------------

    def test_list_files(self, backend: StorageBackend) -> None:
        self.populate(backend, "top.bin", "d/b.bin", "d/a.txt", "d/sub/c.bin", "d/sub/deep/e.bin")
        assert backend.list_files("d") == ["d/a.txt", "d/b.bin"]
        assert backend.list_files("d", recursive=True) == [
            "d/a.txt",
            "d/b.bin",
            "d/sub/c.bin",
            "d/sub/deep/e.bin",
        ]
        assert backend.list_files("") == ["top.bin"]
        assert backend.list_files("/") == ["top.bin"]
        assert backend.list_files("d/sub", recursive=True) == ["d/sub/c.bin", "d/sub/deep/e.bin"]

    def test_list_files_sorted_by_code_point(self, backend: StorageBackend) -> None:
        names = [
            "b.bin",
            "B.bin",
            "a.bin",
            "_.bin",
            "ä.bin",
            "Z10.bin",
            "z2.bin",
            "10.bin",
            "9.bin",
        ]
        self.populate(backend, *(f"s/{n}" for n in names))
        assert backend.list_files("s") == [f"s/{n}" for n in sorted(names)]

    def test_list_files_pattern(self, backend: StorageBackend) -> None:
        self.populate(backend, "p/img_01.bin", "p/img_02.bin", "p/mask_01.bin", "p/sub/img_03.bin")
        assert backend.list_files("p", pattern="img_*") == ["p/img_01.bin", "p/img_02.bin"]
        assert backend.list_files("p", pattern="img_*", recursive=True) == [
            "p/img_01.bin",
            "p/img_02.bin",
            "p/sub/img_03.bin",
        ]
        assert backend.list_files("p", pattern="*_0[2-9].bin") == ["p/img_02.bin"]
        assert backend.list_files("p", pattern="IMG_*") == [], "patterns are case-sensitive"
        assert backend.list_files("p", pattern="sub*", recursive=True) == [], "names only"

    def test_patterns_are_globs_not_sql(self, backend: StorageBackend) -> None:
        self.populate(
            backend, "g/a_c.bin", "g/abc.bin", "g/100%.bin", "g/100x.bin", "g/[x].bin", "g/x.bin"
        )
        assert backend.list_files("g", pattern="a_c.bin") == ["g/a_c.bin"]
        assert backend.list_files("g", pattern="100%.bin") == ["g/100%.bin"]
        assert backend.list_files("g", pattern="*%*") == ["g/100%.bin"]
        assert backend.list_files("g", pattern="[[]x].bin") == ["g/[x].bin"]
        assert backend.list_files("g", pattern="[x].bin") == ["g/x.bin"]
        assert backend.list_files("g", pattern="a?c.bin") == ["g/a_c.bin", "g/abc.bin"]

    def test_directory_names_are_literal(self, backend: StorageBackend) -> None:
        self.populate(backend, "d%/f.bin", "dx/g.bin", "d_/h.bin", "da/i.bin", "d%x/j.bin")
        assert backend.list_files("d%") == ["d%/f.bin"]
        assert backend.list_files("d_", recursive=True) == ["d_/h.bin"]
        assert backend.list_files("da", recursive=True) == ["da/i.bin"]

    def test_list_files_extensions(self, backend: StorageBackend) -> None:
        self.populate(
            backend, "e/a.bin", "e/B.BIN", "e/c.txt", "e/roi.roi.zip", "e/plain.zip", "e/bin"
        )
        assert backend.list_files("e", extensions={".bin"}) == ["e/B.BIN", "e/a.bin"]
        assert backend.list_files("e", extensions=[".BIN", ".txt"]) == [
            "e/B.BIN",
            "e/a.bin",
            "e/c.txt",
        ]
        assert backend.list_files("e", extensions={".roi.zip"}) == ["e/roi.roi.zip"]
        assert backend.list_files("e", extensions={".zip"}) == ["e/plain.zip", "e/roi.roi.zip"]
        assert backend.list_files("e", extensions=".txt") == ["e/c.txt"]
        assert backend.list_files("e", pattern="[aB]*", extensions={".bin"}) == [
            "e/B.BIN",
            "e/a.bin",
        ]

    def test_list_files_errors(self, backend: StorageBackend) -> None:
        backend.save(b"x", "file.bin")
        with pytest.raises(errors.NotFoundError):
            backend.list_files("missing")
        with pytest.raises(errors.NotADirectoryError):
            backend.list_files("file.bin")

    def test_list_dir(self, backend: StorageBackend) -> None:
        self.require_directories()
        self.populate(backend, "top.bin", "d/b.bin", "d/a.txt", "d/sub/c.bin")
        assert backend.list_dir("d") == ["a.txt", "b.bin", "sub"]
        assert backend.list_dir("") == ["d", "top.bin"]
        assert backend.list_dir("/d/sub/") == ["c.bin"]

    def test_list_dir_sorted_by_code_point(self, backend: StorageBackend) -> None:
        self.require_directories()
        names = ["b.bin", "B.bin", "a.bin", "_.bin", "ä.bin", "Z10.bin", "z2.bin", "10.bin"]
        self.populate(backend, *(f"s/{n}" for n in names), "s/dir/x.bin")
        assert backend.list_dir("s") == sorted([*names, "dir"])

    def test_list_dir_errors(self, backend: StorageBackend) -> None:
        self.require_directories()
        backend.save(b"x", "file.bin")
        with pytest.raises(errors.NotADirectoryError):
            backend.list_dir("file.bin")
        with pytest.raises(errors.NotFoundError):
            backend.list_dir("missing")
        with pytest.raises(errors.NotFoundError):
            backend.list_dir("file.bin/below")

    # -- existence ------------------------------------------------------------------------------

    def test_exists_is_file_is_dir(self, backend: StorageBackend) -> None:
        backend.save(b"x", "d/f.bin")
        cases = {
            # path: (exists, is_file, is_dir)
            "d/f.bin": (True, True, False),
            "missing.bin": (False, False, False),
            "d/missing": (False, False, False),
            "d/f.bin/below": (False, False, False),
        }
        if self.supports_directories:
            cases.update({"d": (True, False, True), "": (True, False, True)})
        for path, expected in cases.items():
            got = (backend.exists(path), backend.is_file(path), backend.is_dir(path))
            assert got == expected, path

    def test_empty_backend_root(self, backend: StorageBackend) -> None:
        assert backend.list_files("") == []
        assert backend.list_files("", recursive=True) == []
        if self.supports_directories:
            assert backend.list_dir("") == []
            assert backend.is_dir("")
            assert backend.exists("")

    # -- save and load errors -----------------------------------------------------------------

    def test_load_errors(self, backend: StorageBackend) -> None:
        backend.save(b"x", "d/f.bin")
        with pytest.raises(errors.NotFoundError):
            backend.load("missing.bin")
        with pytest.raises(FileNotFoundError):
            backend.load("d/missing.bin")
        with pytest.raises(errors.NotFoundError):
            backend.load("d/f.bin/below.bin")
        if self.supports_directories:
            with pytest.raises(errors.IsADirectoryError):
                backend.load("d")

    def test_save_creates_parents(self, backend: StorageBackend) -> None:
        backend.save(b"x", "p/q/r.bin")
        assert backend.list_files("p", recursive=True) == ["p/q/r.bin"]
        if self.supports_directories:
            assert backend.is_dir("p")
            assert backend.is_dir("p/q")
            assert backend.list_dir("p") == ["q"]

    def test_save_onto_a_directory(self, backend: StorageBackend) -> None:
        self.require_directories()
        backend.save(b"x", "d/f.bin")
        with pytest.raises(errors.IsADirectoryError):
            backend.save(b"y", "d")
        with pytest.raises(IsADirectoryError):
            backend.save(b"y", "d", overwrite=False)
        assert backend.is_dir("d")
        assert backend.load("d/f.bin") == b"x"

    def test_save_under_a_file(self, backend: StorageBackend) -> None:
        backend.save(b"x", "f.bin")
        with pytest.raises(errors.NotADirectoryError):
            backend.save(b"y", "f.bin/g.bin")
        with pytest.raises(NotADirectoryError):
            backend.save(b"y", "f.bin/deeper/g.bin")
        assert backend.load("f.bin") == b"x"
        assert backend.list_files("", recursive=True) == ["f.bin"]

    # -- optional operations ------------------------------------------------------------------

    def test_unsupported_operations_say_so(self, backend: StorageBackend) -> None:
        backend.save(b"x", "f.bin")
        calls: dict[str, Callable[[], object]] = {
            "delete": lambda: backend.delete("f.bin"),
            "move": lambda: backend.move("f.bin", "g.bin"),
            "copy": lambda: backend.copy("f.bin", "g.bin"),
            "ensure_directory": lambda: backend.ensure_directory("d"),
            "stat": lambda: backend.stat("f.bin"),
        }
        unsupported = sorted(ALL_OPTIONAL_OPERATIONS - self.optional_operations)
        if not unsupported:
            pytest.skip("every optional operation is supported")
        for operation in unsupported:
            with pytest.raises(errors.UnsupportedOperationError):
                calls[operation]()

    def test_delete_file(self, backend: StorageBackend) -> None:
        self.require(operation="delete")
        self.populate(backend, "d/f.bin", "d/g.bin")
        backend.delete("d/f.bin")
        assert not backend.exists("d/f.bin")
        assert backend.list_files("d") == ["d/g.bin"]
        backend.delete("/d/g.bin")
        assert backend.list_files("d") == []
        if self.supports_directories:
            assert backend.is_dir("d"), "deleting the last file removed its directory"

    def test_delete_directory(self, backend: StorageBackend) -> None:
        self.require(operation="delete")
        self.require_directories()
        saved = self.populate(backend, "d/f.bin", "d/sub/g.bin", "keep.bin")
        with pytest.raises(errors.IsADirectoryError) as info:
            backend.delete("d")
        assert info.value.errno == errno.ENOTEMPTY
        assert backend.list_files("d", recursive=True) == ["d/f.bin", "d/sub/g.bin"]
        backend.delete("d", recursive=True)
        assert not backend.exists("d")
        assert not backend.exists("d/sub/g.bin")
        assert backend.list_files("", recursive=True) == ["keep.bin"]
        assert backend.load("keep.bin") == saved["keep.bin"]

    def test_delete_empty_directory(self, backend: StorageBackend) -> None:
        self.require(operation="delete")
        self.require_directories()
        backend.save(b"x", "d/f.bin")
        backend.delete("d/f.bin")
        backend.delete("d")  # empty now: no recursive=True needed
        assert not backend.exists("d")
        assert backend.list_dir("") == []

    def test_delete_missing(self, backend: StorageBackend) -> None:
        self.require(operation="delete")
        with pytest.raises(errors.NotFoundError):
            backend.delete("missing.bin")

    def test_move_file(self, backend: StorageBackend) -> None:
        self.require(operation="move")
        saved = self.populate(backend, "a/f.bin")
        backend.move("a/f.bin", "b/c/g.bin")
        assert not backend.exists("a/f.bin")
        assert backend.load("b/c/g.bin") == saved["a/f.bin"]
        assert backend.list_files("", recursive=True) == ["b/c/g.bin"]

    def test_move_directory(self, backend: StorageBackend) -> None:
        self.require(operation="move")
        self.require_directories()
        saved = self.populate(backend, "src/f.bin", "src/sub/g.txt", "src/sub/deep/h.bin")
        backend.move("src", "dst/moved")
        assert not backend.exists("src")
        assert backend.list_files("dst/moved", recursive=True) == [
            "dst/moved/f.bin",
            "dst/moved/sub/deep/h.bin",
            "dst/moved/sub/g.txt",
        ]
        assert backend.load("dst/moved/sub/g.txt") == saved["src/sub/g.txt"]
        assert backend.list_dir("dst/moved/sub") == ["deep", "g.txt"]

    def test_move_errors(self, backend: StorageBackend) -> None:
        self.require(operation="move")
        saved = self.populate(backend, "a.bin", "b.bin", "d/f.bin")
        with pytest.raises(errors.AlreadyExistsError):
            backend.move("a.bin", "b.bin")
        assert backend.load("a.bin") == saved["a.bin"]
        assert backend.load("b.bin") == saved["b.bin"]
        with pytest.raises(errors.NotFoundError):
            backend.move("missing.bin", "c.bin")
        with pytest.raises(errors.NotADirectoryError):
            backend.move("b.bin", "a.bin/c.bin")
        if self.supports_directories:
            with pytest.raises(errors.AlreadyExistsError):
                backend.move("a.bin", "d")
            with pytest.raises(errors.InvalidPathError):
                backend.move("d", "d/inside")
            assert backend.list_files("d", recursive=True) == ["d/f.bin"]

    def test_copy_file(self, backend: StorageBackend) -> None:
        self.require(operation="copy")
        backend.save(b"original", "a/f.bin")
        backend.copy("a/f.bin", "b/g.bin")
        assert backend.load("a/f.bin") == b"original"
        assert backend.load("b/g.bin") == b"original"
        backend.save(b"changed", "b/g.bin")
        assert backend.load("a/f.bin") == b"original", "the copy shares storage with its source"

    def test_copy_directory(self, backend: StorageBackend) -> None:
        self.require(operation="copy")
        self.require_directories()
        saved = self.populate(backend, "src/f.bin", "src/sub/g.txt")
        backend.copy("src", "dst")
        assert backend.list_files("dst", recursive=True) == ["dst/f.bin", "dst/sub/g.txt"]
        assert backend.list_files("src", recursive=True) == ["src/f.bin", "src/sub/g.txt"]
        assert backend.load("dst/sub/g.txt") == saved["src/sub/g.txt"]
        backend.save(b"changed", "dst/f.bin")
        assert backend.load("src/f.bin") == saved["src/f.bin"]

    def test_copy_errors(self, backend: StorageBackend) -> None:
        self.require(operation="copy")
        saved = self.populate(backend, "a.bin", "b.bin", "d/f.bin")
        with pytest.raises(errors.AlreadyExistsError):
            backend.copy("a.bin", "b.bin")
        assert backend.load("b.bin") == saved["b.bin"]
        with pytest.raises(errors.NotFoundError):
            backend.copy("missing.bin", "c.bin")
        if self.supports_directories:
            with pytest.raises(errors.InvalidPathError):
                backend.copy("d", "d/inside")
            assert backend.list_files("d", recursive=True) == ["d/f.bin"]

    def test_ensure_directory(self, backend: StorageBackend) -> None:
        self.require(operation="ensure_directory")
        self.require_directories()
        backend.ensure_directory("a/b/c")
        assert backend.is_dir("a/b/c")
        assert backend.list_dir("a/b") == ["c"]
        assert backend.list_files("a", recursive=True) == []
        backend.ensure_directory("a/b/c")  # idempotent
        backend.ensure_directory("")
        backend.save(b"x", "a/b/c/f.bin")
        assert backend.list_dir("a/b/c") == ["f.bin"]

    def test_ensure_directory_on_a_file(self, backend: StorageBackend) -> None:
        self.require(operation="ensure_directory")
        self.require_directories()
        backend.save(b"x", "f.bin")
        with pytest.raises(errors.NotADirectoryError):
            backend.ensure_directory("f.bin")
        with pytest.raises(errors.NotADirectoryError):
            backend.ensure_directory("f.bin/sub")
        assert backend.load("f.bin") == b"x"

    def test_stat(self, backend: StorageBackend) -> None:
        self.require(operation="stat")
        backend.save(b"12345", "d/f.bin")
        st = backend.stat("/d/f.bin")
        assert isinstance(st, StatResult)
        assert (st.path, st.kind, st.is_file, st.is_dir) == ("d/f.bin", "file", True, False)
        assert st.size == 5
        assert st.modified_at is None or st.modified_at.tzinfo is not None
        if self.supports_directories:
            dir_stat = backend.stat("d")
            assert (dir_stat.path, dir_stat.kind, dir_stat.is_dir) == ("d", "dir", True)
            assert backend.stat("").kind == "dir"
        with pytest.raises(errors.NotFoundError):
            backend.stat("missing.bin")

    def test_stat_array_metadata(self, backend: StorageBackend) -> None:
        self.require(operation="stat", kind="array")
        if not self.stat_reports_array_metadata:
            pytest.skip(f"{type(self).__name__} does not report array metadata")
        backend.save(np.zeros((2, 3), dtype=">f8"), "a.npy")
        st = backend.stat("a.npy")
        assert (st.dtype, st.shape) == (">f8", (2, 3))

    def test_attrs(self, backend: StorageBackend) -> None:
        if not self.supports_attrs:
            pytest.skip(f"{type(self).__name__} does not store attrs")
        attrs = {"unit": "µm", "tags": ["a", "b"], "n": 3}
        backend.save(b"x", "with_attrs.bin", attrs=attrs)
        attrs["n"] = 4
        assert backend.stat("with_attrs.bin").attrs == {"unit": "µm", "tags": ["a", "b"], "n": 3}

    # -- transactions ------------------------------------------------------------------------

    def test_transaction_unsupported(self, backend: StorageBackend) -> None:
        if backend.supports_transactions:
            pytest.skip("transactions are supported")
        with pytest.raises(errors.UnsupportedOperationError), backend.transaction():
            pass

    def _require_transactions(self, backend: StorageBackend) -> None:
        if not backend.supports_transactions:
            pytest.skip(f"{type(backend).__name__} has no transactions")

    def test_transaction_commits(self, backend: StorageBackend) -> None:
        self._require_transactions(backend)
        with backend.transaction():
            backend.save(b"a", "t/a.bin")
            backend.save(b"b", "t/b.bin")
            assert backend.load("t/a.bin") == b"a", "a transaction sees its own writes"
        assert backend.list_files("t") == ["t/a.bin", "t/b.bin"]

    def test_transaction_rolls_back(self, backend: StorageBackend) -> None:
        self._require_transactions(backend)
        backend.save(b"v1", "keep.bin")
        backend.save(b"doomed", "gone.bin")
        failure = RuntimeError("boom")

        def fail_inside_a_transaction() -> None:
            with backend.transaction():
                backend.save(b"v2", "keep.bin")
                backend.save(b"new", "new/dir/new.bin")
                if "delete" in self.optional_operations:
                    backend.delete("gone.bin")
                raise failure

        with pytest.raises(RuntimeError) as info:
            fail_inside_a_transaction()
        assert info.value is failure, "the exception must pass through unchanged"
        assert backend.load("keep.bin") == b"v1"
        assert backend.load("gone.bin") == b"doomed"
        assert not backend.exists("new/dir/new.bin")
        if self.supports_directories:
            assert not backend.exists("new"), "directories made in the transaction survived"
        assert backend.list_files("", recursive=True) == ["gone.bin", "keep.bin"]

    def test_nested_transactions(self, backend: StorageBackend) -> None:
        self._require_transactions(backend)

        def failing_inner() -> None:
            with backend.transaction():
                backend.save(b"inner", "inner.bin")
                raise KeyError("inner failure")

        with backend.transaction():
            backend.save(b"outer", "outer.bin")
            with pytest.raises(KeyError):
                failing_inner()
            assert not backend.exists("inner.bin")
            with backend.transaction():
                backend.save(b"kept", "kept.bin")
        assert backend.list_files("") == ["kept.bin", "outer.bin"]

    def test_outer_rollback_undoes_committed_inner(self, backend: StorageBackend) -> None:
        self._require_transactions(backend)

        def failing_outer() -> None:
            with backend.transaction():
                with backend.transaction():
                    backend.save(b"inner", "inner.bin")
                raise ValueError("outer")

        with pytest.raises(ValueError, match="outer"):
            failing_outer()
        assert not backend.exists("inner.bin")
