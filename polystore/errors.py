"""The exceptions polystore raises.

Every error subclasses :class:`PolystoreError` and, where one fits, the builtin
exception a Python user would already catch, so both ``except FileNotFoundError``
and ``except PolystoreError`` work::

    PolystoreError
    ├── NotFoundError                 (FileNotFoundError)
    ├── AlreadyExistsError            (FileExistsError)
    ├── IsADirectoryError             (builtins.IsADirectoryError)
    ├── NotADirectoryError            (builtins.NotADirectoryError)
    ├── ReadOnlyError                 (PermissionError)
    ├── InvalidPathError              (ValueError)
    ├── SerializationError            (TypeError)
    ├── BackendNotFoundError          (KeyError)
    ├── BackendConfigError            (TypeError)
    ├── BackendUnavailableError       (ConnectionError)
    ├── StorageFullError              (OSError, errno ENOSPC)
    ├── ConflictError
    ├── DuplicateBackendError
    ├── UnsupportedOperationError     (NotImplementedError)
    ├── IntegrityError
    │   └── CatalogDamagedError
    └── SchemaVersionError

``IsADirectoryError`` and ``NotADirectoryError`` shadow the builtins of the same
name inside this module on purpose: they *are* those builtins, refined.
"""

from __future__ import annotations

import builtins

__all__ = [
    "AlreadyExistsError",
    "BackendConfigError",
    "BackendNotFoundError",
    "BackendUnavailableError",
    "CatalogDamagedError",
    "ConflictError",
    "DuplicateBackendError",
    "IntegrityError",
    "InvalidPathError",
    "IsADirectoryError",
    "NotADirectoryError",
    "NotFoundError",
    "PolystoreError",
    "ReadOnlyError",
    "SchemaVersionError",
    "SerializationError",
    "StorageFullError",
    "UnsupportedOperationError",
]


class PolystoreError(Exception):
    """Root of every error polystore raises."""


class NotFoundError(PolystoreError, FileNotFoundError):
    """No file or directory exists at the path."""


class AlreadyExistsError(PolystoreError, FileExistsError):
    """Something already exists at the path and may not be replaced."""


class IsADirectoryError(PolystoreError, builtins.IsADirectoryError):  # noqa: A001
    """A file operation was given a directory."""


class NotADirectoryError(PolystoreError, builtins.NotADirectoryError):  # noqa: A001
    """A directory operation was given a file, or a path runs through a file."""


class ReadOnlyError(PolystoreError, PermissionError):
    """A write was attempted on a read-only backend."""


class InvalidPathError(PolystoreError, ValueError):
    """A path breaks the path rules (``..``, NUL, over-long names, ...)."""


class SerializationError(PolystoreError, TypeError):
    """A value cannot be stored, or stored content cannot be turned back into a value."""


class BackendNotFoundError(PolystoreError, KeyError):
    """No backend is registered under the key."""

    def __str__(self) -> str:
        # KeyError.__str__ shows the repr of its argument; a message reads better.
        return str(self.args[0]) if self.args else ""


class BackendConfigError(PolystoreError, TypeError):
    """A registered backend class cannot be built without arguments."""


class BackendUnavailableError(PolystoreError, ConnectionError):
    """The backend's database or object store cannot be reached."""


class StorageFullError(PolystoreError, OSError):
    """The disk or database is full; ``errno`` is ``ENOSPC``. Nothing was written."""


class ConflictError(PolystoreError):
    """The database aborted a transaction to resolve a conflict with a concurrent one.

    A deadlock or serialization failure inside :meth:`SQLBackend.transaction`
    (polystore retries its own single operations itself, a bounded number of
    times). Nothing of the transaction was written: run it again.
    """


class DuplicateBackendError(PolystoreError):
    """A different class already claims this ``_backend_type``."""


class UnsupportedOperationError(PolystoreError, NotImplementedError):
    """The backend does not implement this optional operation."""


class IntegrityError(PolystoreError):
    """Stored content does not match the hash or size the catalog records.

    Or the catalog itself is damaged: see :class:`CatalogDamagedError`.
    """


class CatalogDamagedError(IntegrityError):
    """The catalog itself is damaged: its database, or a row polystore cannot use.

    A SQLite file with damaged pages ("database disk image is malformed"), a
    table or index PostgreSQL reports corrupt, or a row that another program
    wrote with what polystore never writes: a blob hash that is not a content
    hash (64 lowercase hex digits), or ``shape``, ``meta`` or ``attrs`` that
    are not the JSON polystore stores. The message names the file or row where
    it can, and says what to do; ``fsck()`` lists the damaged rows. Nothing was
    written by the operation that raised it.
    """


class SchemaVersionError(PolystoreError):
    """The catalog's schema is not the revision this polystore expects."""
