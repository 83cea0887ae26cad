"""The backend interface: :class:`StorageBackend` and :class:`ReadOnlyBackend`.

A concrete subclass (no abstract method left) that defines ``_backend_type``
registers itself under that key when the class statement runs; abstract classes
are skipped. :class:`~polystore.registry.BackendRegistry` builds instances from
these classes on demand.
"""

from __future__ import annotations

import abc
import datetime as dt
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from polystore.errors import DuplicateBackendError, ReadOnlyError, UnsupportedOperationError

if TYPE_CHECKING:
    from polystore.arrays import LazyArray

__all__ = [
    "ReadOnlyBackend",
    "StatResult",
    "StorageBackend",
    "registered_backend_classes",
]

#: ``_backend_type`` -> class, filled by ``StorageBackend.__init_subclass__``.
#: The one piece of process-wide state polystore keeps (the seed asks for it).
_BACKEND_CLASSES: dict[str, type[StorageBackend]] = {}


def registered_backend_classes() -> dict[str, type[StorageBackend]]:
    """A copy of the class registry: ``_backend_type`` -> class."""
    return dict(_BACKEND_CLASSES)


def _abstract_names(cls: type) -> set[str]:
    # ABCMeta fills __abstractmethods__ only after __init_subclass__ has run, so
    # the class's own abstractness is worked out here from its attributes.
    return {
        name
        for name in dir(cls)
        if getattr(getattr(cls, name, None), "__isabstractmethod__", False)
    }


def _register_class(key: str, cls: type[StorageBackend]) -> None:
    if not isinstance(key, str) or not key:
        raise TypeError(f"{cls.__qualname__}._backend_type must be a non-empty str, not {key!r}")
    if "://" in key:
        raise ValueError(f"_backend_type {key!r} looks like a URL; URLs are reserved for catalogs")
    old = _BACKEND_CLASSES.get(key)
    if (
        old is not None
        and old is not cls
        and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__)
    ):
        raise DuplicateBackendError(
            f"backend type {key!r} is already registered by "
            f"{old.__module__}.{old.__qualname__}; "
            f"{cls.__module__}.{cls.__qualname__} must choose another _backend_type"
        )
    # Same module and qualname: a reload or a notebook cell run again. Replace.
    _BACKEND_CLASSES[key] = cls


@dataclass(frozen=True)
class StatResult:
    """What :meth:`StorageBackend.stat` returns for a file or directory."""

    path: str
    kind: Literal["file", "dir"]
    size: int | None = None
    created_at: dt.datetime | None = None
    modified_at: dt.datetime | None = None
    serializer: str | None = None
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    hash: str | None = None
    store: str | None = None

    @property
    def is_file(self) -> bool:
        return self.kind == "file"

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"


class StorageBackend(abc.ABC):
    """Abstract storage backend.

    Subclasses implement the seven abstract methods. ``save_batch`` and
    ``load_batch`` loop over ``save`` and ``load`` unless overridden; the optional
    operations (``delete``, ``move``, ``copy``, ``ensure_directory``, ``stat``,
    ``transaction``) raise :class:`~polystore.errors.UnsupportedOperationError`
    unless implemented. Capability flags are class attributes.
    """

    #: Registration key; ``None`` means "do not register".
    _backend_type: ClassVar[str | None] = None
    #: Every write raises :class:`~polystore.errors.ReadOnlyError`.
    read_only: ClassVar[bool] = False
    #: ``transaction()`` groups operations atomically.
    supports_transactions: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        key = cls.__dict__.get("_backend_type")
        if key is None or _abstract_names(cls):
            return
        _register_class(key, cls)

    # -- the abstract surface -------------------------------------------------

    @abc.abstractmethod
    def save(self, data: Any, file_path: str, **kwargs: Any) -> None:
        """Store ``data`` at ``file_path``, creating missing parent directories."""

    @abc.abstractmethod
    def load(self, file_path: str, **kwargs: Any) -> Any:
        """Return the value stored at ``file_path``."""

    @abc.abstractmethod
    def list_files(
        self,
        directory: str,
        pattern: str | None = None,
        extensions: Any = None,
        recursive: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        """Sorted paths (relative to the backend root) of files in ``directory``."""

    @abc.abstractmethod
    def exists(self, path: str) -> bool:
        """Whether a file or directory exists at ``path``."""

    @abc.abstractmethod
    def is_file(self, path: str) -> bool:
        """Whether ``path`` is a file."""

    @abc.abstractmethod
    def is_dir(self, path: str) -> bool:
        """Whether ``path`` is a directory."""

    @abc.abstractmethod
    def list_dir(self, path: str) -> list[str]:
        """Sorted names of the entries in directory ``path``."""

    # -- derived, overridable -------------------------------------------------

    def save_batch(
        self, data_list: Sequence[Any], output_paths: Sequence[str], **kwargs: Any
    ) -> None:
        """Save each value to its path (a loop; backends may do better)."""
        data_list, output_paths = list(data_list), list(output_paths)
        if len(data_list) != len(output_paths):
            raise ValueError(
                f"save_batch got {len(data_list)} values but {len(output_paths)} paths"
            )
        for data, path in zip(data_list, output_paths, strict=True):
            self.save(data, path, **kwargs)

    def load_batch(self, file_paths: Sequence[str], **kwargs: Any) -> list[Any]:
        """Load each path in order (a loop; backends may do better)."""
        return [self.load(path, **kwargs) for path in file_paths]

    # -- optional operations --------------------------------------------------

    def _unsupported(self, operation: str) -> UnsupportedOperationError:
        return UnsupportedOperationError(f"{type(self).__name__} does not support {operation}()")

    def delete(self, path: str, recursive: bool = False) -> None:
        """Remove a file, or a directory (``recursive=True`` when not empty)."""
        raise self._unsupported("delete")

    def move(self, src: str, dst: str) -> None:
        """Move a file or directory tree; ``dst`` must not exist."""
        raise self._unsupported("move")

    def copy(self, src: str, dst: str) -> None:
        """Copy a file or directory tree; ``dst`` must not exist."""
        raise self._unsupported("copy")

    def ensure_directory(self, path: str) -> None:
        """Create a directory and its missing parents; no error if it exists."""
        raise self._unsupported("ensure_directory")

    def stat(self, path: str) -> StatResult:
        """Describe a file or directory."""
        raise self._unsupported("stat")

    def open_array(self, path: str) -> LazyArray:
        """A lazy, read-only view of the numpy array at ``path``: slices read only their bytes.

        See :class:`~polystore.arrays.LazyArray`. A path that holds no array
        raises :class:`~polystore.errors.SerializationError`.
        """
        raise self._unsupported("open_array")

    def transaction(self) -> AbstractContextManager[Any]:
        """Group operations: all take effect, or none (on an exception)."""
        raise self._unsupported("transaction")

    def close(self) -> None:  # noqa: B027 -- optional hook, a no-op by default
        """Release connections and files. Safe to call twice."""


def _read_only(operation: str) -> Callable[..., Any]:
    def refuse(self: StorageBackend, *args: Any, **kwargs: Any) -> Any:
        raise ReadOnlyError(f"{type(self).__name__} is read-only: {operation}() refused")

    refuse.__name__ = operation
    refuse.__doc__ = "Refused: raises :class:`~polystore.errors.ReadOnlyError`."
    return refuse


class ReadOnlyBackend(StorageBackend):
    """A backend whose every write raises :class:`~polystore.errors.ReadOnlyError`."""

    read_only: ClassVar[bool] = True

    save = _read_only("save")
    save_batch = _read_only("save_batch")
    delete = _read_only("delete")
    move = _read_only("move")
    copy = _read_only("copy")
    ensure_directory = _read_only("ensure_directory")
