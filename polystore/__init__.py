"""polystore: store numpy arrays and other objects under paths, in named backends.

``FileManager`` routes calls to backends held in a ``BackendRegistry``; the SQL
catalog backend (``SQLBackend``) keeps paths, directories and metadata in SQLite
or PostgreSQL. Importing polystore stays light: SQLAlchemy and the SQL backend
load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from polystore.backends.base import ReadOnlyBackend, StatResult, StorageBackend
from polystore.backends.disk import DiskBackend
from polystore.backends.memory import MemoryBackend
from polystore.errors import (
    AlreadyExistsError,
    BackendConfigError,
    BackendNotFoundError,
    BackendUnavailableError,
    CatalogDamagedError,
    ConflictError,
    DuplicateBackendError,
    IntegrityError,
    InvalidPathError,
    IsADirectoryError,
    NotADirectoryError,
    NotFoundError,
    PolystoreError,
    ReadOnlyError,
    SchemaVersionError,
    SerializationError,
    StorageFullError,
    UnsupportedOperationError,
)
from polystore.manager import FileManager
from polystore.registry import BackendRegistry

if TYPE_CHECKING:
    from polystore.backends.sql import SQLBackend
    from polystore.backends.sql.fsck import FsckReport
    from polystore.backends.sql.gc import GCReport, RebalanceReport
    from polystore.backends.sql.snapshots import Change, Snapshot

__version__ = "0.1.0"

__all__ = [
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


#: Names that load SQLAlchemy, imported on first use: module -> names.
_LAZY = {
    "polystore.backends.sql": ("SQLBackend",),
    "polystore.backends.sql.fsck": ("FsckReport",),
    "polystore.backends.sql.gc": ("GCReport", "RebalanceReport"),
    "polystore.backends.sql.snapshots": ("Change", "Snapshot"),
}


def __getattr__(name: str) -> Any:
    # SQLAlchemy costs ~100 ms to import; load it only when the SQL backend is used.
    for module, names in _LAZY.items():
        if name in names:
            import importlib

            return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'polystore' has no attribute {name!r}")
