"""The public namespace is pinned, and `import polystore` stays light."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import polystore

EXPECTED = [
    "AlreadyExistsError",
    "BackendConfigError",
    "BackendNotFoundError",
    "BackendRegistry",
    "BackendUnavailableError",
    "CatalogDamagedError",
    "Change",
    "ConflictError",
    "DiskBackend",
    "DuplicateBackendError",
    "FileManager",
    "FsckReport",
    "GCReport",
    "IntegrityError",
    "InvalidPathError",
    "IsADirectoryError",
    "MemoryBackend",
    "NotADirectoryError",
    "NotFoundError",
    "PolystoreError",
    "ReadOnlyBackend",
    "ReadOnlyError",
    "RebalanceReport",
    "SQLBackend",
    "SchemaVersionError",
    "SerializationError",
    "Snapshot",
    "StatResult",
    "StorageBackend",
    "StorageFullError",
    "UnsupportedOperationError",
    "__version__",
]


def test_all_is_pinned_and_sorted() -> None:
    assert polystore.__all__ == EXPECTED
    assert polystore.__all__ == sorted(polystore.__all__)


def test_every_exported_name_is_importable() -> None:
    for name in polystore.__all__:
        assert getattr(polystore, name) is not None, name
    namespace: dict[str, object] = {}
    exec("from polystore import *", namespace)  # noqa: S102 -- the star import users write
    assert set(EXPECTED) <= set(namespace)


def test_classes_come_from_their_modules() -> None:
    from polystore.backends.disk import DiskBackend
    from polystore.backends.memory import MemoryBackend
    from polystore.backends.sql import SQLBackend

    assert polystore.DiskBackend is DiskBackend
    assert polystore.MemoryBackend is MemoryBackend
    assert polystore.SQLBackend is SQLBackend


def test_import_stays_light() -> None:
    code = textwrap.dedent(
        """
        import sys
        from polystore import FileManager, BackendRegistry

        BackendRegistry()
        heavy = {"numpy", "sqlalchemy", "pytest", "alembic", "tifffile", "polystore.testing"}
        loaded = sorted(heavy & set(sys.modules))
        assert not loaded, f"import polystore loaded {loaded}"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)
