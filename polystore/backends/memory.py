"""``MemoryBackend``: an in-process backend over two dicts.

Values are stored as private copies (``copy.deepcopy``; numpy arrays keep their
dtype, byte order and memory order), and ``load`` returns a fresh copy, so
mutating the caller's object, or a loaded one, never changes what is stored. A
value that cannot be copied raises :class:`~polystore.errors.SerializationError`.
Memory does not look at extensions: any copyable value may live at any path.

Directories are real: an explicit set, with the root ``""`` always present.
Saving creates missing parents; ``ensure_directory`` creates empty ones.

The rules every built-in backend follows (memory and disk alike):

- ``load`` of a missing path, or of a path that runs through a file:
  :class:`~polystore.errors.NotFoundError`; of a directory:
  :class:`~polystore.errors.IsADirectoryError`.
- ``save`` onto a directory: ``IsADirectoryError``; under a file:
  :class:`~polystore.errors.NotADirectoryError`; ``overwrite=False`` onto an
  existing file: :class:`~polystore.errors.AlreadyExistsError`.
- ``list_dir``/``list_files`` of a file: ``NotADirectoryError``; of a missing
  path: ``NotFoundError``.
- ``delete`` removes a file or an empty directory. A non-empty directory needs
  ``recursive=True``; without it, ``IsADirectoryError`` with
  ``errno == errno.ENOTEMPTY`` is raised and nothing is removed.
- ``move``/``copy`` take a file or a whole tree; missing parents of ``dst`` are
  created; an existing ``dst`` raises ``AlreadyExistsError``; a directory moved
  or copied into itself raises :class:`~polystore.errors.InvalidPathError`.
- ``ensure_directory`` on a file, or under one: ``NotADirectoryError``.
- Unknown keyword arguments raise ``TypeError`` instead of being ignored.

``save(..., attrs={...})`` keeps user attributes, returned by ``stat``. They
are checked exactly as the SQL catalog checks them (a ``dict`` with ``str``
keys, plain JSON, at most 64 KiB; else
:class:`~polystore.errors.SerializationError`) and returned as that JSON reads
back.
``transaction()`` snapshots the store and restores it if the block raises;
transactions nest, and ``save_batch`` is all-or-nothing. Every operation holds
one re-entrant lock, so the backend can be shared between threads (a
transaction holds the lock until it ends).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from polystore import paths
from polystore.backends import _common as c
from polystore.backends.base import StatResult, StorageBackend
from polystore.errors import SerializationError

if TYPE_CHECKING:
    from polystore.arrays import LazyArray

__all__ = ["MemoryBackend"]


@dataclass(frozen=True)
class _Entry:
    # Never mutated and never handed out: load() returns copies. So entries may
    # be shared between paths (copy) and between snapshots (transaction).
    value: Any
    created_at: dt.datetime
    modified_at: dt.datetime
    attrs: dict[str, Any] = field(default_factory=dict)


def _private_copy(value: Any, what: str = "value") -> Any:
    try:
        return copy.deepcopy(value)
    except Exception as exc:
        raise SerializationError(
            f"MemoryBackend cannot store a copy of this {type(value).__name__} {what}: {exc}"
        ) from exc


def _describe(value: Any) -> tuple[str, int | None, str | None, tuple[int, ...] | None]:
    """``(serializer, size, dtype, shape)`` for ``stat``; numpy is not imported."""
    if hasattr(value, "dtype") and hasattr(value, "shape") and hasattr(value, "nbytes"):
        return "ndarray", int(value.nbytes), str(value.dtype), tuple(value.shape)
    if isinstance(value, bytes | bytearray):
        return "bytes", len(value), None, None
    if isinstance(value, str):
        return "str", len(value.encode("utf-8", "surrogatepass")), None, None
    try:
        return "json", len(json.dumps(value).encode("utf-8")), None, None
    except (TypeError, ValueError, RecursionError):
        return "object", None, None, None


class MemoryBackend(StorageBackend):
    """Values in a dict, as private copies; real directories; transactions."""

    _backend_type = "memory"
    supports_transactions: ClassVar[bool] = True

    def __init__(self) -> None:
        self._files: dict[str, _Entry] = {}
        # directory path -> names of its entries; the root always exists.
        self._dirs: dict[str, set[str]] = {paths.ROOT: set()}
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"MemoryBackend(files={len(self._files)}, dirs={len(self._dirs) - 1})"

    # -- internals ------------------------------------------------------------

    def _check_dir_chain(self, path: str) -> None:
        """No proper ancestor of ``path`` may be a file."""
        for parent in c.ancestors(path):
            if parent in self._files:
                raise c.not_a_directory(parent)

    def _make_dirs(self, path: str) -> None:
        """Create ``path`` as a directory, with its missing ancestors."""
        for d in [*c.ancestors(path), path]:
            if d not in self._dirs:
                self._dirs[d] = set()
                parent, name = paths.split(d)
                self._dirs[parent].add(name)

    def _subtree(self, path: str) -> tuple[list[str], list[str]]:
        """Directories (``path`` first) and files under directory ``path``."""
        dirs: list[str] = []
        files: list[str] = []
        stack = [path]
        while stack:
            cur = stack.pop()
            dirs.append(cur)
            for name in self._dirs[cur]:
                child = paths.join(cur, name)
                (stack if child in self._dirs else files).append(child)
        return dirs, files

    def _unlink(self, path: str) -> None:
        """Remove a file or a whole directory tree and its name in its parent."""
        if path in self._dirs:
            dirs, files = self._subtree(path)
            for f in files:
                del self._files[f]
            for d in dirs:
                del self._dirs[d]
        else:
            del self._files[path]
        parent, name = paths.split(path)
        self._dirs[parent].discard(name)

    def _directory(self, path: str) -> set[str]:
        """The entries of directory ``path``, or the right error."""
        entries = self._dirs.get(path)
        if entries is None:
            if path in self._files:
                raise c.not_a_directory(path)
            raise c.not_found(path)
        return entries

    def _prepare_destination(self, src: str, dst: str) -> None:
        """Checks shared by move and copy, then create ``dst``'s parents."""
        if src not in self._files and src not in self._dirs:
            raise c.not_found(src)
        if src in self._dirs:
            c.check_not_into_itself(src, dst)
        if dst in self._files or dst in self._dirs:
            raise c.already_exists(dst)
        self._check_dir_chain(dst)
        self._make_dirs(paths.split(dst)[0])

    # -- the abstract surface -------------------------------------------------

    def save(
        self,
        data: Any,
        file_path: str,
        *,
        overwrite: bool = True,
        attrs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # docstring inherited
        c.reject_kwargs(self, "save", kwargs)
        # Checked as the SQL catalog checks them, and kept as the JSON it would
        # return (tuples become lists), so both backends give back the same attrs.
        attrs_copy = {} if attrs is None else json.loads(c.attrs_json(attrs))
        path = paths.normalize_file(file_path)
        value = _private_copy(data)
        with self._lock:
            if path in self._dirs:
                raise c.is_a_directory(path)
            self._check_dir_chain(path)
            old = self._files.get(path)
            if old is not None and not overwrite:
                raise c.already_exists(path)
            now = c.utcnow()
            parent, name = paths.split(path)
            self._make_dirs(parent)
            self._files[path] = _Entry(value, old.created_at if old else now, now, attrs_copy)
            self._dirs[parent].add(name)

    def load(self, file_path: str, **kwargs: Any) -> Any:
        # docstring inherited
        c.reject_kwargs(self, "load", kwargs)
        path = paths.normalize_file(file_path)
        with self._lock:
            entry = self._files.get(path)
            if entry is None:
                raise c.is_a_directory(path) if path in self._dirs else c.not_found(path)
        return copy.deepcopy(entry.value)

    def list_files(
        self,
        directory: str,
        pattern: str | None = None,
        extensions: Any = None,
        recursive: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        # docstring inherited
        c.reject_kwargs(self, "list_files", kwargs)
        start = paths.normalize(directory)
        exts = paths.normalize_extensions(extensions)
        found: list[str] = []
        with self._lock:
            self._directory(start)
            stack = [start]
            while stack:
                cur = stack.pop()
                for name in self._dirs[cur]:
                    child = paths.join(cur, name)
                    if child in self._dirs:
                        if recursive:
                            stack.append(child)
                    elif paths.match_name(name, pattern, exts):
                        found.append(child)
        return sorted(found)

    def exists(self, path: str) -> bool:
        # docstring inherited
        p = paths.normalize(path)
        with self._lock:
            return p in self._files or p in self._dirs

    def is_file(self, path: str) -> bool:
        # docstring inherited
        p = paths.normalize(path)
        with self._lock:
            return p in self._files

    def is_dir(self, path: str) -> bool:
        # docstring inherited
        p = paths.normalize(path)
        with self._lock:
            return p in self._dirs

    def list_dir(self, path: str) -> list[str]:
        # docstring inherited
        p = paths.normalize(path)
        with self._lock:
            return sorted(self._directory(p))

    # -- batches ----------------------------------------------------------------

    def save_batch(
        self, data_list: Sequence[Any], output_paths: Sequence[str], **kwargs: Any
    ) -> None:
        """Save each value at its path; all or nothing."""
        with self.transaction():
            super().save_batch(data_list, output_paths, **kwargs)

    def load_batch(self, file_paths: Sequence[str], **kwargs: Any) -> list[Any]:
        # docstring inherited
        with self._lock:  # one consistent view of the store
            return super().load_batch(file_paths, **kwargs)

    # -- optional operations ----------------------------------------------------

    def delete(self, path: str, recursive: bool = False) -> None:
        # docstring inherited
        p = paths.normalize_file(path)
        with self._lock:
            if p in self._dirs:
                if self._dirs[p] and not recursive:
                    raise c.directory_not_empty(p)
            elif p not in self._files:
                raise c.not_found(p)
            self._unlink(p)

    def move(self, src: str, dst: str) -> None:
        # docstring inherited
        s, d = paths.normalize_file(src), paths.normalize_file(dst)
        with self._lock:
            self._prepare_destination(s, d)
            if s in self._files:
                self._files[d] = self._files[s]
            else:
                dirs, files = self._subtree(s)
                for old in dirs:
                    self._dirs[d + old[len(s) :]] = self._dirs[old]
                for old in files:
                    self._files[d + old[len(s) :]] = self._files[old]
            self._unlink(s)
            parent, name = paths.split(d)
            self._dirs[parent].add(name)

    def copy(self, src: str, dst: str) -> None:
        # docstring inherited
        s, d = paths.normalize_file(src), paths.normalize_file(dst)
        with self._lock:
            self._prepare_destination(s, d)
            now = c.utcnow()
            if s in self._files:
                old = self._files[s]
                self._files[d] = _Entry(old.value, now, now, old.attrs)
            else:
                dirs, files = self._subtree(s)
                for old_dir in dirs:
                    self._dirs[d + old_dir[len(s) :]] = set(self._dirs[old_dir])
                for old_file in files:
                    entry = self._files[old_file]
                    self._files[d + old_file[len(s) :]] = _Entry(entry.value, now, now, entry.attrs)
            parent, name = paths.split(d)
            self._dirs[parent].add(name)

    def ensure_directory(self, path: str) -> None:
        # docstring inherited
        p = paths.normalize(path)
        with self._lock:
            self._check_dir_chain(p)
            if p in self._files:
                raise c.not_a_directory(p)
            self._make_dirs(p)

    def stat(self, path: str) -> StatResult:
        # docstring inherited
        p = paths.normalize(path)
        with self._lock:
            if p in self._dirs:
                return StatResult(path=p, kind="dir")
            entry = self._files.get(p)
            if entry is None:
                raise c.not_found(p)
        serializer, size, dtype, shape = _describe(entry.value)
        return StatResult(
            path=p,
            kind="file",
            size=size,
            created_at=entry.created_at,
            modified_at=entry.modified_at,
            serializer=serializer,
            dtype=dtype,
            shape=shape,
            attrs=copy.deepcopy(entry.attrs),
        )

    def open_array(self, path: str) -> LazyArray:
        # docstring inherited
        from polystore.arrays import BufferSource, LazyArray

        p = paths.normalize_file(path)
        with self._lock:
            entry = self._files.get(p)
            if entry is None:
                raise c.is_a_directory(p) if p in self._dirs else c.not_found(p)
        array = entry.value  # never mutated: a later save replaces the entry
        if _describe(array)[0] != "ndarray" or getattr(array.dtype, "hasobject", True):
            raise SerializationError(f"{p!r} does not hold a numpy array; load() it instead")
        import numpy as np

        order: Literal["C", "F"] = "F" if array.ndim > 1 and array.flags.f_contiguous else "C"
        flat = np.asarray(array, order=order)
        raw = flat.T.reshape(-1) if order == "F" else flat.reshape(-1)
        return LazyArray(BufferSource(self, raw.view(np.uint8)), p, flat.dtype, flat.shape, order)

    @contextmanager
    def transaction(self) -> Iterator[MemoryBackend]:
        """Snapshot the store; restore it if the block raises. Nests."""
        with self._lock:
            files = dict(self._files)
            dirs = {d: set(names) for d, names in self._dirs.items()}
            try:
                yield self
            except BaseException:
                self._files, self._dirs = files, dirs
                raise

    def __reduce__(self) -> tuple[Any, ...]:
        """Refused: the values live in this process's memory."""
        raise TypeError(
            f"a {type(self).__name__} cannot be pickled: its values live in this process's "
            "memory and cannot be shared between processes; use a SQLBackend or a "
            "DiskBackend for data that other processes (dask workers) read"
        )
