"""``DiskBackend``: files under a root directory, format chosen by extension.

=====================  ======================================================
Extension (any case)   Stored as
=====================  ======================================================
``.npy``               numpy ``.npy`` (``allow_pickle=False``): any array
                       without Python objects, dtype, byte order, shape and
                       Fortran order kept.
``.json``              JSON (``json.dumps`` defaults), UTF-8.
``.txt``               a ``str``, UTF-8, written exactly (no newline changes).
``.csv``               a 1-D or 2-D array of bool, int, uint or float (up to
                       64-bit), comma-separated, after a first line
                       ``# polystore: {"dtype": "<f8", "shape": [2, 3]}`` that
                       brings dtype and shape back (memory order is not kept).
                       A CSV without that line loads as a 2-D float64 array.
``.tif``, ``.tiff``    TIFF through ``tifffile`` (``pip install
                       'polystore[tiff]'``): values and shape kept, byte order
                       becomes native.
anything else          raw bytes: ``bytes``, ``bytearray`` or ``memoryview``
                       in, ``bytes`` out.
=====================  ======================================================

A value the extension cannot hold raises
:class:`~polystore.errors.SerializationError` before anything is written.

Writes are atomic: the content goes to a temporary file in the target's
directory (named ``.polystore-tmp-<random>``), is flushed and fsync'ed, then
renamed over the target with ``os.replace`` (``os.link`` for
``overwrite=False``, so an existing file is never clobbered). A failed save
removes its temporary file and any directory it created, so it leaves nothing
behind. On a read-only file system (``EROFS``) every write -- ``save``,
``delete``, ``move``, ``copy``, ``ensure_directory`` -- raises
:class:`~polystore.errors.ReadOnlyError` (a ``PermissionError`` that keeps
``errno.EROFS``); a permission the OS denies (``EACCES``, ``EPERM``) stays the
builtin ``PermissionError``. Temporary files never appear in listings, and names starting with
``.polystore-tmp-`` are refused. ``save_batch`` is a loop, not all-or-nothing:
the disk backend has no transactions.

Error rules are those of :mod:`polystore.backends.memory` (a non-empty
directory deleted without ``recursive=True`` raises
:class:`~polystore.errors.IsADirectoryError` with ``errno.ENOTEMPTY``).
Symbolic links inside the root are followed for reading, not for recursive
listing. ``stat`` reports ``created_at`` only where the OS records birth times
(not on Linux). ``move`` and ``copy`` check that ``dst`` does not exist and then
act; a concurrent writer could slip in between.
"""

from __future__ import annotations

import datetime as dt
import errno
import io
import json
import os
import stat as stat_mod
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import IO, TYPE_CHECKING, Any

from polystore import paths
from polystore.backends import _common as c
from polystore.backends.base import StatResult, StorageBackend
from polystore.errors import (
    InvalidPathError,
    ReadOnlyError,
    SerializationError,
    StorageFullError,
    UnsupportedOperationError,
)

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["DiskBackend"]

TEMP_PREFIX = ".polystore-tmp-"

_Writer = Callable[[IO[bytes]], None]

# Suffix (lower case) -> format name. Checked longest first is not needed:
# no suffix here is a suffix of another.
_FORMATS = {
    ".npy": "npy",
    ".json": "json",
    ".txt": "txt",
    ".csv": "csv",
    ".tif": "tiff",
    ".tiff": "tiff",
}

_CSV_MAGIC = "# polystore: "
# Significant digits that round-trip each float size exactly.
_CSV_FLOAT_DIGITS = {2: 5, 4: 9, 8: 17}


def format_for(name: str) -> str:
    """The format a file name selects: ``npy``, ``json``, ``txt``, ``csv``,
    ``tiff`` or ``bytes``."""
    return _FORMATS.get(os.path.splitext(name)[1].lower(), "bytes")


# -- encoding: validate first, write later ----------------------------------------


def _refuse(fmt: str, value: Any, path: str, wants: str) -> SerializationError:
    return SerializationError(
        f"cannot save {type(value).__name__} to {path!r}: the .{fmt} format stores {wants}"
    )


def _plain_array(value: Any, fmt: str, path: str) -> Any:
    import numpy as np

    if not isinstance(value, np.ndarray) or value.dtype.hasobject:
        raise _refuse(fmt, value, path, "numpy arrays without Python objects")
    return value


def _encode(fmt: str, value: Any, path: str) -> _Writer:
    """Check ``value`` against the format and return a function that writes it."""
    if fmt == "npy":
        array = _plain_array(value, fmt, path)
        from numpy.lib import format as npy_format

        return lambda fh: npy_format.write_array(fh, array, allow_pickle=False)
    if fmt == "tiff":
        array = _plain_array(value, fmt, path)
        tifffile = _tifffile()
        return lambda fh: tifffile.imwrite(fh, array)
    if fmt == "json":
        try:
            content = json.dumps(value).encode("utf-8")
        except (TypeError, ValueError, RecursionError) as exc:  # nesting too deep is bad input too
            raise _refuse(fmt, value, path, f"JSON values ({exc})") from exc
    elif fmt == "txt":
        if not isinstance(value, str):
            raise _refuse(fmt, value, path, "str")
        try:
            content = value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _refuse(fmt, value, path, f"UTF-8 text ({exc})") from exc
    elif fmt == "csv":
        content = _encode_csv(value, path)
    elif isinstance(value, bytes | bytearray | memoryview):
        content = bytes(value)
    else:
        raise _refuse("bin", value, path, "bytes (name the file .npy, .json or .txt for others)")

    def write(fh: IO[bytes]) -> None:
        fh.write(content)

    return write


def _encode_csv(value: Any, path: str) -> bytes:
    import numpy as np

    if (
        not isinstance(value, np.ndarray)
        or value.ndim not in (1, 2)
        or value.dtype.kind not in "biuf"
        or (value.dtype.kind == "f" and value.dtype.itemsize not in _CSV_FLOAT_DIGITS)
    ):
        raise _refuse(
            "csv", value, path, "1-D or 2-D arrays of bool, int, uint or float up to 64 bits"
        )
    header = json.dumps({"dtype": value.dtype.str, "shape": list(value.shape)})
    out = io.StringIO()
    out.write(f"{_CSV_MAGIC}{header}\n")
    if value.size:
        digits = _CSV_FLOAT_DIGITS.get(value.dtype.itemsize)
        fmt = f"%.{digits}g" if value.dtype.kind == "f" else "%d"
        np.savetxt(out, value, fmt=fmt, delimiter=",")
    return out.getvalue().encode("utf-8")


# -- decoding ------------------------------------------------------------------------


def _decode(fmt: str, fh: IO[bytes], path: str) -> Any:
    try:
        if fmt == "npy":
            from numpy.lib import format as npy_format

            return npy_format.read_array(fh, allow_pickle=False)
        if fmt == "tiff":
            return _tifffile().imread(fh)
        content = fh.read()
        if fmt == "json":
            return json.loads(content)
        if fmt == "txt":
            return content.decode("utf-8")
        if fmt == "csv":
            return _decode_csv(content.decode("utf-8"))
        return content
    except SerializationError:
        raise
    except (ValueError, TypeError, KeyError, EOFError) as exc:
        # Includes json.JSONDecodeError and UnicodeDecodeError (ValueErrors).
        raise SerializationError(f"cannot read {path!r} as .{fmt}: {exc}") from exc


def _decode_csv(text: str) -> Any:
    import numpy as np

    first, _, _ = text.partition("\n")
    if not first.startswith(_CSV_MAGIC):
        if not text.strip():
            return np.empty((0, 0))
        return np.loadtxt(io.StringIO(text), delimiter=",", ndmin=2)
    meta = json.loads(first[len(_CSV_MAGIC) :])
    dtype, shape = np.dtype(meta["dtype"]), tuple(meta["shape"])
    if 0 in shape:
        return np.empty(shape, dtype)
    read_as = np.uint8 if dtype.kind == "b" else dtype.newbyteorder("=")
    array = np.loadtxt(io.StringIO(text), delimiter=",", dtype=read_as, ndmin=1)
    return array.reshape(shape).astype(dtype)


def _tifffile() -> Any:
    try:
        import tifffile
    except ImportError as exc:
        raise SerializationError(
            ".tif/.tiff files need tifffile: pip install 'polystore[tiff]'"
        ) from exc
    return tifffile


def _npy_header(full: str) -> tuple[str | None, tuple[int, ...] | None]:
    """``(dtype, shape)`` from an ``.npy`` header, or ``(None, None)``."""
    from numpy.lib import format as npy_format

    try:
        with open(full, "rb") as fh:
            version = npy_format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = npy_format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, dtype = npy_format.read_array_header_2_0(fh)
            else:
                return None, None
    except (OSError, ValueError):
        return None, None
    return str(dtype), tuple(shape)


@contextmanager
def _refuse_read_only(path: str) -> Iterator[None]:
    """A write the OS refuses because the file system is read-only (``EROFS``)
    raises :class:`~polystore.errors.ReadOnlyError`, as every read-only backend
    does. ``EACCES``/``EPERM`` stay the builtin ``PermissionError`` (a
    ``ReadOnlyError``'s base): they mean "not this user here", not "read-only"."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.EROFS and not isinstance(exc, ReadOnlyError):
            raise c.read_only_file_system(path) from exc
        raise


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself durable. Not possible on Windows; some
    # filesystems refuse fsync on a directory, which is fine to ignore.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class DiskBackend(StorageBackend):
    """Files under ``root`` (created if missing); format by extension."""

    _backend_type = "disk"

    def __init__(self, root: str | os.PathLike[str] = ".") -> None:
        from pathlib import Path  # here, not at the top: keeps `import polystore` light

        self.root: Path = Path(root).absolute()
        self._root = str(self.root)
        try:
            with _refuse_read_only(self._root):
                os.makedirs(self._root, exist_ok=True)
        except (FileExistsError, NotADirectoryError):  # a file, or a path through one
            raise c.not_a_directory(self._root) from None

    def __repr__(self) -> str:
        return f"DiskBackend(root={self._root!r})"

    # -- internals ------------------------------------------------------------

    def _full(self, path: str) -> str:
        return os.path.join(self._root, *paths.split_parts(path))

    @staticmethod
    def _hidden(path: str) -> bool:
        return paths.split(path)[1].startswith(TEMP_PREFIX)

    def _makedirs(self, path: str) -> list[str]:
        """Create directory ``path`` and its missing ancestors; return the created
        ones. A file in the way raises ``NotADirectoryError``."""
        if os.path.isdir(self._full(path)):
            return []
        created: list[str] = []
        try:
            for d in [*c.ancestors(path), path]:
                full = self._full(d)
                if os.path.isdir(full):
                    continue
                if os.path.lexists(full):
                    raise c.not_a_directory(d)
                try:
                    os.mkdir(full)
                except FileExistsError:
                    if not os.path.isdir(full):  # a file appeared meanwhile
                        raise c.not_a_directory(d) from None
                else:
                    created.append(d)
        except BaseException:
            self._remove_dirs(created)
            raise
        return created

    def _remove_dirs(self, created: list[str]) -> None:
        for d in reversed(created):
            with suppress(OSError):
                os.rmdir(self._full(d))

    def _open_temp(self, directory: str) -> tuple[str, int]:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        while True:
            temp = os.path.join(directory, TEMP_PREFIX + os.urandom(8).hex())
            try:
                # 0o666 and the umask decide the mode, as for open(); mkstemp
                # would leave every saved file private (0o600).
                return temp, os.open(temp, flags, 0o666)
            except FileExistsError:  # pragma: no cover -- 64 random bits collided
                continue

    def _atomic_write(self, path: str, write: _Writer, overwrite: bool) -> None:
        full = self._full(path)
        directory = os.path.dirname(full)
        temp, fd = self._open_temp(directory)
        placed = False
        try:
            # The opener hands over the descriptor, so fh.name is the temp path
            # (tifffile wants a named file; os.fdopen's name would be the fd).
            try:
                with open(temp, "wb", opener=lambda _path, _flags: fd) as fh:
                    write(fh)
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError as exc:
                # numpy's tofile() reports a full disk as a short write with no errno.
                if exc.errno == errno.ENOSPC or (exc.errno is None and "requested and" in str(exc)):
                    raise StorageFullError(
                        errno.ENOSPC, f"no space left to write {path!r}: {exc}", path
                    ) from exc
                raise
            if overwrite:
                try:
                    os.replace(temp, full)
                except IsADirectoryError:
                    raise c.is_a_directory(path) from None
                placed = True
            else:
                self._link_new(temp, full, path)
        finally:
            if not placed:
                with suppress(FileNotFoundError):
                    os.unlink(temp)
        _fsync_directory(directory)

    @staticmethod
    def _link_new(temp: str, full: str, path: str) -> None:
        """Put ``temp`` at ``full`` only if nothing is there (atomic with links)."""
        try:
            os.link(temp, full)
        except FileExistsError:
            raise c.already_exists(path) from None
        except OSError:
            # No hard links on this filesystem: check, then rename.
            if os.path.lexists(full):
                raise c.already_exists(path) from None
            os.replace(temp, full)

    def _scan(self, path: str) -> list[os.DirEntry[str]]:
        full = self._full(path)
        try:
            with os.scandir(full) as entries:
                return [e for e in entries if not e.name.startswith(TEMP_PREFIX)]
        except FileNotFoundError:
            raise c.not_found(path) from None
        except NotADirectoryError:
            if os.path.isfile(full):
                raise c.not_a_directory(path) from None
            raise c.not_found(path) from None  # runs through a file

    def _check_source(self, src: str, dst: str) -> str:
        """Checks shared by move and copy; returns the full source path."""
        full = self._full(src)
        if self._hidden(src) or not os.path.lexists(full):
            raise c.not_found(src)
        if os.path.isdir(full):
            c.check_not_into_itself(src, dst)
        if self._hidden(dst):
            raise InvalidPathError(f"names starting with {TEMP_PREFIX!r} are reserved: {dst!r}")
        if os.path.lexists(self._full(dst)):
            raise c.already_exists(dst)
        return full

    # -- the abstract surface -------------------------------------------------

    def save(self, data: Any, file_path: str, *, overwrite: bool = True, **kwargs: Any) -> None:
        # docstring inherited
        if "attrs" in kwargs:
            raise UnsupportedOperationError("DiskBackend does not store attrs")
        c.reject_kwargs(self, "save", kwargs)
        path = paths.normalize_file(file_path)
        parent, name = paths.split(path)
        if name.startswith(TEMP_PREFIX):
            raise InvalidPathError(f"names starting with {TEMP_PREFIX!r} are reserved: {path!r}")
        write = _encode(format_for(name), data, path)
        if os.path.isdir(self._full(path)):
            raise c.is_a_directory(path)
        with _refuse_read_only(path):
            created = self._makedirs(parent)
            try:
                self._atomic_write(path, write, overwrite)
            except BaseException:
                self._remove_dirs(created)
                raise

    def load(self, file_path: str, **kwargs: Any) -> Any:
        # docstring inherited
        c.reject_kwargs(self, "load", kwargs)
        path = paths.normalize_file(file_path)
        if self._hidden(path):
            raise c.not_found(path)
        try:
            fh = open(self._full(path), "rb")  # noqa: SIM115 -- closed below
        except (FileNotFoundError, NotADirectoryError):
            raise c.not_found(path) from None
        except IsADirectoryError:
            raise c.is_a_directory(path) from None
        with fh:
            return _decode(format_for(path), fh, path)

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
        stack = [start]
        while stack:
            cur = stack.pop()
            for entry in self._scan(cur):
                if entry.is_dir(follow_symlinks=False):
                    if recursive:
                        stack.append(paths.join(cur, entry.name))
                elif entry.is_file() and paths.match_name(entry.name, pattern, exts):
                    found.append(paths.join(cur, entry.name))
        return sorted(found)

    def exists(self, path: str) -> bool:
        # docstring inherited
        p = paths.normalize(path)
        return not self._hidden(p) and os.path.exists(self._full(p))

    def is_file(self, path: str) -> bool:
        # docstring inherited
        p = paths.normalize(path)
        return not self._hidden(p) and os.path.isfile(self._full(p))

    def is_dir(self, path: str) -> bool:
        # docstring inherited
        p = paths.normalize(path)
        return not self._hidden(p) and os.path.isdir(self._full(p))

    def list_dir(self, path: str) -> list[str]:
        # docstring inherited
        return sorted(entry.name for entry in self._scan(paths.normalize(path)))

    # -- optional operations ----------------------------------------------------

    def delete(self, path: str, recursive: bool = False) -> None:
        # docstring inherited
        p = paths.normalize_file(path)
        full = self._full(p)
        if self._hidden(p) or not os.path.lexists(full):
            raise c.not_found(p)
        with _refuse_read_only(p):
            if os.path.isdir(full) and not os.path.islink(full):
                if recursive:
                    import shutil

                    shutil.rmtree(full)
                    return
                try:
                    os.rmdir(full)
                except OSError as exc:
                    if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                        raise c.directory_not_empty(p) from None
                    raise
            else:
                os.unlink(full)

    def move(self, src: str, dst: str) -> None:
        # docstring inherited
        s, d = paths.normalize_file(src), paths.normalize_file(dst)
        full_src = self._check_source(s, d)
        with _refuse_read_only(d):
            created = self._makedirs(paths.split(d)[0])
            try:
                os.rename(full_src, self._full(d))
            except BaseException:
                self._remove_dirs(created)
                raise

    def copy(self, src: str, dst: str) -> None:
        # docstring inherited
        s, d = paths.normalize_file(src), paths.normalize_file(dst)
        full_src = self._check_source(s, d)
        import shutil

        with _refuse_read_only(d):
            created = self._makedirs(paths.split(d)[0])
            try:
                if os.path.isdir(full_src):
                    try:
                        shutil.copytree(
                            full_src,
                            self._full(d),
                            ignore=shutil.ignore_patterns(TEMP_PREFIX + "*"),
                        )
                    except BaseException:
                        shutil.rmtree(self._full(d), ignore_errors=True)
                        raise
                else:
                    with open(full_src, "rb") as source:
                        self._atomic_write(d, lambda fh: shutil.copyfileobj(source, fh), False)
            except BaseException:
                self._remove_dirs(created)
                raise

    def ensure_directory(self, path: str) -> None:
        # docstring inherited
        p = paths.normalize(path)
        if self._hidden(p):
            raise InvalidPathError(f"names starting with {TEMP_PREFIX!r} are reserved: {p!r}")
        with _refuse_read_only(p):
            self._makedirs(p)

    def stat(self, path: str) -> StatResult:
        # docstring inherited
        p = paths.normalize(path)
        full = self._full(p)
        try:
            if self._hidden(p):
                raise FileNotFoundError
            st = os.stat(full)
        except (FileNotFoundError, NotADirectoryError):
            raise c.not_found(p) from None
        created = _timestamp(getattr(st, "st_birthtime", None))
        modified = _timestamp(st.st_mtime)
        if stat_mod.S_ISDIR(st.st_mode):
            return StatResult(path=p, kind="dir", created_at=created, modified_at=modified)
        fmt = format_for(p)
        dtype, shape = _npy_header(full) if fmt == "npy" else (None, None)
        return StatResult(
            path=p,
            kind="file",
            size=st.st_size,
            created_at=created,
            modified_at=modified,
            serializer=fmt,
            dtype=dtype,
            shape=shape,
        )

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle by configuration: the copy is a backend on the same root.

        (Subclasses whose constructor takes other arguments override this.)
        """
        return (type(self), (self._root,))


def _timestamp(seconds: float | None) -> dt.datetime | None:
    if seconds is None:
        return None
    return dt.datetime.fromtimestamp(seconds, dt.UTC)
