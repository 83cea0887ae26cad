"""The read-only conformance suite: :class:`ReadOnlyBackendTests`.

Subclass it, override the ``backend`` fixture to return a read-only backend
that already holds :attr:`~ReadOnlyBackendTests.existing_file`, and set that
attribute::

    class TestMyArchive(ReadOnlyBackendTests):
        existing_file = "index.json"

        @pytest.fixture
        def backend(self):
            return MyArchive(...)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import pytest

from polystore import errors
from polystore.backends.base import StorageBackend
from polystore.testing.samples import assert_values_equal

__all__ = ["ReadOnlyBackendTests"]


class ReadOnlyBackendTests:
    """Conformance tests every read-only backend passes."""

    #: A file that exists in the fixture's backend.
    existing_file: ClassVar[str] = "existing.bin"

    @pytest.fixture
    def backend(self) -> StorageBackend:
        """A read-only backend holding ``existing_file``. Subclasses override this."""
        pytest.fail(f"{type(self).__name__} must override the `backend` fixture")

    def _writes(self, backend: StorageBackend) -> dict[str, Callable[[], Any]]:
        existing = self.existing_file
        return {
            "save a new file": lambda: backend.save(b"x", "new.bin"),
            "save over a file": lambda: backend.save(b"x", existing),
            "save_batch": lambda: backend.save_batch([b"x"], ["new.bin"]),
            "delete": lambda: backend.delete(existing),
            "move": lambda: backend.move(existing, "moved.bin"),
            "copy": lambda: backend.copy(existing, "copied.bin"),
            "ensure_directory": lambda: backend.ensure_directory("new_dir"),
        }

    def test_flags(self, backend: StorageBackend) -> None:
        assert isinstance(backend, StorageBackend)
        assert backend.read_only is True

    def test_every_write_is_refused(self, backend: StorageBackend) -> None:
        before = backend.load(self.existing_file)
        for what, write in self._writes(backend).items():
            with pytest.raises(errors.ReadOnlyError):
                write()
            assert backend.exists(self.existing_file), f"{what} removed the file"
        assert_values_equal(backend.load(self.existing_file), before)
        for created in ("new.bin", "moved.bin", "copied.bin", "new_dir"):
            assert not backend.exists(created), created

    def test_refusal_is_a_permission_error(self, backend: StorageBackend) -> None:
        with pytest.raises(PermissionError, match="read-only"):
            backend.save(b"x", "new.bin")

    def test_reads_work(self, backend: StorageBackend) -> None:
        assert backend.exists(self.existing_file)
        assert backend.is_file(self.existing_file)
        assert not backend.is_dir(self.existing_file)
        assert backend.load_batch([self.existing_file]) is not None

    def test_load_missing(self, backend: StorageBackend) -> None:
        with pytest.raises(FileNotFoundError):
            backend.load("surely/missing.bin")
