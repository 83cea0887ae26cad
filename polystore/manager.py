"""``FileManager``: one front door that routes each call to a named backend.

Paths are checked and normalised here (see :mod:`polystore.paths`) before any
backend sees them, so a user backend never receives ``..`` or a NUL byte.
Errors raised by a backend pass through unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Self

from polystore import paths
from polystore.backends.base import StatResult, StorageBackend
from polystore.errors import BackendNotFoundError
from polystore.registry import BackendRegistry, is_database_url

if TYPE_CHECKING:
    from polystore.arrays import LazyArray

__all__ = ["FileManager"]

PathArg = str | os.PathLike[str]


class FileManager:
    """Route storage calls to backends by name.

    ``registry`` is a :class:`~polystore.BackendRegistry`, any mapping of name to
    backend instance, or a database URL (which then becomes the default backend).
    ``default_backend`` names the backend used when a call gives no ``backend=``.
    """

    def __init__(
        self,
        registry: Mapping[str, StorageBackend] | str | None = None,
        *,
        default_backend: str | None = None,
    ) -> None:
        if isinstance(registry, str):
            if not is_database_url(registry):
                raise BackendNotFoundError(
                    f"FileManager takes a registry, a mapping or a database URL; "
                    f"{registry!r} is none of these"
                )
            default_backend = default_backend or registry
            registry = None
        self._backends: Mapping[str, StorageBackend] = (
            registry if registry is not None else BackendRegistry()
        )
        # Database URLs given as backend= on a plain mapping open here.
        self._urls: BackendRegistry | None = None
        self.default_backend = default_backend

    @property
    def registry(self) -> Mapping[str, StorageBackend]:
        """The mapping this manager routes through."""
        return self._backends

    def get_backend(self, backend: str | None = None) -> StorageBackend:
        """The backend instance a call with ``backend=`` would use."""
        name = backend if backend is not None else self.default_backend
        if name is None:
            raise BackendNotFoundError(
                "no backend= given and this FileManager has no default_backend; "
                f"available: {', '.join(sorted(self._backends)) or 'none'}"
            )
        backends = self._backends
        if isinstance(backends, BackendRegistry) or name in backends or not is_database_url(name):
            try:
                return backends[name]
            except BackendNotFoundError:
                raise
            except KeyError:
                raise BackendNotFoundError(
                    f"no backend named {name!r}; available: {', '.join(sorted(backends)) or 'none'}"
                ) from None
        if self._urls is None:
            self._urls = BackendRegistry()
        return self._urls[name]

    def close(self) -> None:
        """Close backends this manager opened (a registry it built, URLs it opened)."""
        if self._urls is not None:
            self._urls.close()
        if isinstance(self._backends, BackendRegistry):
            self._backends.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading and writing ------------------------------------------------------

    def save(
        self, data: Any, file_path: PathArg, *, backend: str | None = None, **kwargs: Any
    ) -> None:
        """Save ``data`` at ``file_path``."""
        self.get_backend(backend).save(data, paths.normalize_file(file_path), **kwargs)

    def load(self, file_path: PathArg, *, backend: str | None = None, **kwargs: Any) -> Any:
        """Load the value at ``file_path``."""
        return self.get_backend(backend).load(paths.normalize_file(file_path), **kwargs)

    def save_batch(
        self,
        data_list: Sequence[Any],
        output_paths: Sequence[PathArg],
        *,
        backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Save each value at its path; all-or-nothing on transactional backends."""
        data_list = list(data_list)
        norm = paths.normalize_files(output_paths)
        if len(data_list) != len(norm):
            raise ValueError(f"save_batch got {len(data_list)} values but {len(norm)} paths")
        self.get_backend(backend).save_batch(data_list, norm, **kwargs)

    def load_batch(
        self, file_paths: Sequence[PathArg], *, backend: str | None = None, **kwargs: Any
    ) -> list[Any]:
        """Load each path, in order."""
        norm = paths.normalize_files(file_paths)
        return list(self.get_backend(backend).load_batch(norm, **kwargs))

    # -- listing and inspection ----------------------------------------------------

    def list_files(
        self,
        directory: PathArg = "",
        *,
        backend: str | None = None,
        pattern: str | None = None,
        extensions: Iterable[str] | str | None = None,
        recursive: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        """Sorted paths of the files in ``directory`` (relative to the backend root)."""
        exts = paths.normalize_extensions(extensions)
        found = self.get_backend(backend).list_files(
            paths.normalize(directory),
            pattern=pattern,
            extensions=exts,
            recursive=recursive,
            **kwargs,
        )
        return sorted(str(p).lstrip("/") for p in found)

    def list_dir(self, path: PathArg = "", *, backend: str | None = None) -> list[str]:
        """Sorted names of the entries in directory ``path``."""
        return sorted(str(n) for n in self.get_backend(backend).list_dir(paths.normalize(path)))

    def exists(self, path: PathArg, *, backend: str | None = None) -> bool:
        """Whether a file or directory exists at ``path``."""
        return bool(self.get_backend(backend).exists(paths.normalize(path)))

    def is_file(self, path: PathArg, *, backend: str | None = None) -> bool:
        """Whether ``path`` is a file."""
        return bool(self.get_backend(backend).is_file(paths.normalize(path)))

    def is_dir(self, path: PathArg, *, backend: str | None = None) -> bool:
        """Whether ``path`` is a directory."""
        return bool(self.get_backend(backend).is_dir(paths.normalize(path)))

    def open_array(self, path: PathArg, *, backend: str | None = None) -> LazyArray:
        """A lazy, sliceable view of a stored numpy array (:meth:`StorageBackend.open_array`)."""
        return self.get_backend(backend).open_array(paths.normalize_file(path))

    def stat(self, path: PathArg, *, backend: str | None = None) -> StatResult:
        """Describe a file or directory."""
        return self.get_backend(backend).stat(paths.normalize(path))

    # -- changing the tree -----------------------------------------------------------

    def delete(self, path: PathArg, *, backend: str | None = None, recursive: bool = False) -> None:
        """Delete a file, or a directory (``recursive=True`` when it is not empty)."""
        self.get_backend(backend).delete(paths.normalize_file(path), recursive=recursive)

    def move(self, src: PathArg, dst: PathArg, *, backend: str | None = None) -> None:
        """Move a file or directory tree to ``dst``, which must not exist."""
        self.get_backend(backend).move(paths.normalize_file(src), paths.normalize_file(dst))

    def copy(self, src: PathArg, dst: PathArg, *, backend: str | None = None) -> None:
        """Copy a file or directory tree to ``dst``, which must not exist."""
        self.get_backend(backend).copy(paths.normalize_file(src), paths.normalize_file(dst))

    def ensure_directory(self, path: PathArg, *, backend: str | None = None) -> None:
        """Create directory ``path`` and its missing parents."""
        self.get_backend(backend).ensure_directory(paths.normalize(path))

    @contextmanager
    def transaction(self, *, backend: str | None = None) -> Iterator[StorageBackend]:
        """Group operations on one backend: all take effect, or none."""
        target = self.get_backend(backend)
        with target.transaction():
            yield target

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle the registry (each backend by its configuration) and the default name.

        A copy in another process opens its catalogs on first use; a
        :class:`~polystore.MemoryBackend` in the registry refuses to be pickled.
        """
        return (_unpickle_manager, (self._backends, self._urls, self.default_backend))


def _unpickle_manager(
    backends: Mapping[str, StorageBackend], urls: BackendRegistry | None, default: str | None
) -> FileManager:
    manager = FileManager(backends, default_backend=default)
    manager._urls = urls
    return manager
