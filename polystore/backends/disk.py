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
``stat`` reports ``created_at`` only where the OS records birth times
(not on Linux). ``move`` and ``copy`` check that ``dst`` does not exist and then
act; a concurrent writer could slip in between.

No operation follows a symbolic link out of the root: a path that would raises
:class:`~polystore.errors.InvalidPathError`, as ``..`` does, and nothing
outside is created, read or deleted. Links that stay inside the root are
followed (:mod:`polystore.backends._confined` walks every path one name at a
time, from the root's descriptor, so no other process can swap a link in
between a check and its use). ``delete`` and ``move`` act on a link itself,
never on its target; ``save`` replaces a link to a file or to nothing with the
new file, and refuses one that leads to a directory or out of the root;
``copy`` copies what a link given as its source leads to, and copies the links
inside a tree as links. Listings leave out links that lead nowhere, round in a
loop or out of the root, and a recursive listing does not enter links to
directories. The rules, and why, are in ``docs/decisions.rst``.
"""

from __future__ import annotations

import datetime as dt
import errno
import io
import json
import math
import os
import stat as stat_mod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import IO, TYPE_CHECKING, Any

from polystore import paths
from polystore.backends import _common as c
from polystore.backends._confined import (
    READ_DIR,
    READ_FILE,
    Place,
    Root,
    copy_tree,
    entries,
    lexists,
    scan_tree,
)
from polystore.backends.base import StatResult, StorageBackend
from polystore.errors import (
    ConflictError,
    IntegrityError,
    InvalidPathError,
    ReadOnlyError,
    SerializationError,
    StorageFullError,
    UnsupportedOperationError,
)

if TYPE_CHECKING:
    from pathlib import Path

    from polystore.arrays import LazyArray

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


def _read_npy_header(fh: IO[bytes]) -> tuple[tuple[int, ...], bool, Any]:
    """``(shape, fortran_order, dtype)`` from a ``.npy`` header; ``ValueError`` if none."""
    from numpy.lib import format as npy_format

    version = npy_format.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = npy_format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, fortran, dtype = npy_format.read_array_header_2_0(fh)
    else:
        raise ValueError(f".npy format version {version} is not supported here")
    return tuple(shape), bool(fortran), dtype


def _npy_header(place: Place) -> tuple[str | None, tuple[int, ...] | None]:
    """``(dtype, shape)`` from the header of ``.npy`` file ``place.name``, or ``(None, None)``."""
    try:
        with _reader(os.open(place.name, READ_FILE, dir_fd=place.fd), place.name) as fh:
            shape, _, dtype = _read_npy_header(fh)
    except (OSError, ValueError):
        return None, None
    return str(dtype), shape


def _reader(fd: int, name: str) -> io.BufferedReader:
    """A buffered reader of ``fd`` (which it owns, and closes on failure) named
    ``name``: tifffile wants a named file. A directory raises ``IsADirectoryError``."""
    try:
        raw = io.FileIO(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    raw.name = name
    # Built by hand rather than with open(): open() probes isatty(), a syscall.
    return io.BufferedReader(raw)


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


def _fsync_directory(place: Place) -> None:
    # Makes the rename itself durable. Some filesystems refuse fsync on a
    # directory, which is fine to ignore.
    try:
        fd = os.open(".", READ_DIR, dir_fd=place.fd)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _reserved(path: str) -> InvalidPathError:
    return InvalidPathError(f"names starting with {TEMP_PREFIX!r} are reserved: {path!r}")


def _not_into_itself(src: Place, dst: Place, s: str, d: str) -> None:
    """Refuse to move or copy directory ``s`` into itself through a link
    (``alias/inner``, ``alias`` a link to ``s``): the paths without links decide."""
    if not src.path or dst.path == src.path or dst.path.startswith(src.path + "/"):
        raise InvalidPathError(f"cannot move or copy directory {s!r} into itself ({d!r})")


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
        self._beneath = Root(self._root)

    def __repr__(self) -> str:
        return f"DiskBackend(root={self._root!r})"

    # -- internals ------------------------------------------------------------

    @staticmethod
    def _hidden(path: str) -> bool:
        return paths.split(path)[1].startswith(TEMP_PREFIX)

    def _remove_dirs(self, created: list[str]) -> None:
        for d in reversed(created):
            with suppress(OSError, InvalidPathError), self._beneath.walk(d) as place:
                os.rmdir(place.name, dir_fd=place.fd)

    def _display(self, place: Place, name: str) -> str:
        """A full path for a file object's ``name`` (shown, never opened)."""
        return os.path.join(self._root, *place.parts, name)

    def _atomic_write(self, place: Place, path: str, write: _Writer, overwrite: bool) -> None:
        temp, fd = _open_temp(place)
        placed = False
        try:
            # The opener hands over the descriptor, so fh.name is the temp path
            # (tifffile wants a named file; os.fdopen's name would be the fd).
            try:
                with open(self._display(place, temp), "wb", opener=lambda _p, _f: fd) as fh:
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
                    os.replace(temp, place.name, src_dir_fd=place.fd, dst_dir_fd=place.fd)
                except IsADirectoryError:
                    raise c.is_a_directory(path) from None
                placed = True
            else:
                _link_new(place, temp, path)
        finally:
            if not placed:
                with suppress(FileNotFoundError):
                    os.unlink(temp, dir_fd=place.fd)
        _fsync_directory(place)

    def _check_replaceable(self, place: Place, path: str) -> None:
        """Refuse to save over a directory, or over a link that leads to one or
        out of the root. A link to a file inside the root, or to nothing, is
        replaced by the new file (a rename never writes through a link)."""
        try:
            st = os.stat(place.name, dir_fd=place.fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat_mod.S_ISLNK(st.st_mode):
            link = Place(os.dup(place.fd), place.parts, place.name)
            try:
                target, target_st = self._beneath.settle(self._beneath.follow(link, path), path)
            except FileNotFoundError:
                return  # dangling inside the root
            target.close()
            if target_st is None:
                return
            st = target_st
        if stat_mod.S_ISDIR(st.st_mode):
            raise c.is_a_directory(path)

    def _kind(self, path: str) -> int | None:
        """The file type (``stat.S_IFMT``) at ``path``, links followed inside the
        root; ``None`` when nothing is there."""
        p = paths.normalize(path)
        if self._hidden(p):
            return None
        try:
            place, st = self._beneath.lookup(p)
        except OSError:
            return None
        place.close()
        if st is None or place.name.startswith(TEMP_PREFIX):
            return None
        return stat_mod.S_IFMT(st.st_mode)

    # -- the abstract surface -------------------------------------------------

    def save(self, data: Any, file_path: str, *, overwrite: bool = True, **kwargs: Any) -> None:
        # docstring inherited
        if "attrs" in kwargs:
            raise UnsupportedOperationError("DiskBackend does not store attrs")
        c.reject_kwargs(self, "save", kwargs)
        path = paths.normalize_file(file_path)
        if self._hidden(path):
            raise _reserved(path)
        write = _encode(format_for(path), data, path)
        created: list[str] = []
        with _refuse_read_only(path):
            try:
                with self._beneath.walk(path, create=created) as place:
                    self._check_replaceable(place, path)
                    self._atomic_write(place, path, write, overwrite)
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
            fd, place = self._beneath.open_file(path)
        except FileNotFoundError:
            raise c.not_found(path) from None
        with place:
            if place.name.startswith(TEMP_PREFIX):  # a link to a temporary file
                os.close(fd)
                raise c.not_found(path)
            try:
                fh = _reader(fd, self._display(place, place.name))
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
        with self._open_listing(start) as (top, fd):
            for dir_fd, below, entries in scan_tree(fd, recursive):
                here = "/".join([start, *below] if start else below)
                for entry in entries:
                    name = entry.name
                    if not paths.match_name(name, pattern, exts):
                        continue
                    if entry.is_file(follow_symlinks=False):
                        if name.startswith(TEMP_PREFIX):
                            continue
                    elif not entry.is_symlink() or (
                        self._beneath.kind(dir_fd, [*top.parts, *below], name) != stat_mod.S_IFREG
                    ):
                        continue  # a directory, or a link to no file inside the root
                    found.append(f"{here}/{name}" if here else name)
        return sorted(found)

    def exists(self, path: str) -> bool:
        # docstring inherited
        return self._kind(path) is not None

    def is_file(self, path: str) -> bool:
        # docstring inherited
        return self._kind(path) == stat_mod.S_IFREG

    def is_dir(self, path: str) -> bool:
        # docstring inherited
        return self._kind(path) == stat_mod.S_IFDIR

    def list_dir(self, path: str) -> list[str]:
        # docstring inherited
        with self._open_listing(paths.normalize(path)) as (top, fd):
            names = [
                e.name
                for e in entries(fd)
                if not e.name.startswith(TEMP_PREFIX)
                and (not e.is_symlink() or self._beneath.kind(fd, top.parts, e.name) is not None)
            ]
        return sorted(names)

    # -- optional operations ----------------------------------------------------

    def delete(self, path: str, recursive: bool = False) -> None:
        # docstring inherited
        p = paths.normalize_file(path)
        if self._hidden(p):
            raise c.not_found(p)
        with _refuse_read_only(p), self._beneath.walk(p) as place:
            try:
                st = os.stat(place.name, dir_fd=place.fd, follow_symlinks=False)
            except FileNotFoundError:
                raise c.not_found(p) from None
            if not stat_mod.S_ISDIR(st.st_mode):
                os.unlink(place.name, dir_fd=place.fd)  # a link itself, never its target
            elif recursive:
                import shutil

                # Descriptor-based (rmtree.avoids_symlink_attacks): removes
                # links, never what they point to, and never leaves the tree.
                shutil.rmtree(place.name, dir_fd=place.fd)
            else:
                try:
                    os.rmdir(place.name, dir_fd=place.fd)
                except OSError as exc:
                    if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                        raise c.directory_not_empty(p) from None
                    raise

    def move(self, src: str, dst: str) -> None:
        # docstring inherited
        s, d = paths.normalize_file(src), paths.normalize_file(dst)
        if self._hidden(s):
            raise c.not_found(s)
        with self._beneath.walk(s) as source:
            try:
                st = os.stat(source.name, dir_fd=source.fd, follow_symlinks=False)
            except FileNotFoundError:
                raise c.not_found(s) from None
            # A link moves as itself.
            with self._target(s, d, source, stat_mod.S_ISDIR(st.st_mode)) as target:
                os.rename(source.name, target.name, src_dir_fd=source.fd, dst_dir_fd=target.fd)

    def copy(self, src: str, dst: str) -> None:
        # docstring inherited
        s, d = paths.normalize_file(src), paths.normalize_file(dst)
        if self._hidden(s):
            raise c.not_found(s)
        source, st = self._beneath.lookup(s)  # a link is copied as what it leads to
        with source:
            if st is None or source.name.startswith(TEMP_PREFIX):
                raise c.not_found(s)
            is_dir = stat_mod.S_ISDIR(st.st_mode)
            with self._target(s, d, source, is_dir) as target:
                if is_dir:
                    self._copy_tree(source, target)
                else:
                    self._copy_file(source, target, d)

    @contextmanager
    def _target(self, s: str, d: str, source: Place, is_dir: bool) -> Iterator[Place]:
        """Where ``s`` (at ``source``) moves or copies to: ``d``, which must not exist.

        Missing parents of ``d`` are created, and removed again if the block fails.
        """
        if is_dir:
            c.check_not_into_itself(s, d)
        if self._hidden(d):
            raise _reserved(d)
        created: list[str] = []
        with _refuse_read_only(d):
            try:
                with self._beneath.walk(d, create=created) as target:
                    if lexists(target):
                        raise c.already_exists(d)
                    if is_dir:
                        _not_into_itself(source, target, s, d)
                    yield target
            except BaseException:
                self._remove_dirs(created)
                raise

    def _copy_file(self, source: Place, target: Place, d: str) -> None:
        import shutil

        with open(os.open(source.name, READ_FILE, dir_fd=source.fd), "rb") as fh:
            self._atomic_write(target, d, lambda out: shutil.copyfileobj(fh, out), False)

    def _copy_tree(self, source: Place, target: Place) -> None:
        import shutil

        src = os.open(source.name, READ_DIR, dir_fd=source.fd)
        try:
            os.mkdir(target.name, 0o700, dir_fd=target.fd)
            try:
                dst = os.open(target.name, READ_DIR, dir_fd=target.fd)
                try:
                    copy_tree(src, dst, skip=lambda name: name.startswith(TEMP_PREFIX))
                finally:
                    os.close(dst)
            except BaseException:
                shutil.rmtree(target.name, dir_fd=target.fd, ignore_errors=True)
                raise
        finally:
            os.close(src)

    def ensure_directory(self, path: str) -> None:
        # docstring inherited
        p = paths.normalize(path)
        if self._hidden(p):
            raise _reserved(p)
        created: list[str] = []
        with _refuse_read_only(p):
            try:
                self._beneath.open_dir(p, create=created).close()
            except BaseException:
                self._remove_dirs(created)
                raise

    def stat(self, path: str) -> StatResult:
        # docstring inherited
        p = paths.normalize(path)
        if self._hidden(p):
            raise c.not_found(p)
        place, st = self._beneath.lookup(p)
        with place:
            if st is None or place.name.startswith(TEMP_PREFIX):
                raise c.not_found(p)
            created = _timestamp(getattr(st, "st_birthtime", None))
            modified = _timestamp(st.st_mtime)
            if stat_mod.S_ISDIR(st.st_mode):
                return StatResult(path=p, kind="dir", created_at=created, modified_at=modified)
            fmt = format_for(p)
            dtype, shape = _npy_header(place) if fmt == "npy" else (None, None)
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

    def open_array(self, path: str) -> LazyArray:
        """A lazy view of the array in ``.npy`` file ``path``: slices ``pread`` only their bytes.

        The view keeps the file it opened open: a later save to the path (a
        new file, renamed into place) does not change what it reads. A copy
        in another process opens the path again, and raises
        :class:`~polystore.errors.ConflictError` if the file changed since.
        """
        from polystore.arrays import LazyArray

        p = paths.normalize_file(path)
        source = _NpyFile(self, p, 0, ())
        fd = source.open()
        try:
            if format_for(p) != "npy":
                raise SerializationError(
                    f"{p!r} is not a .npy file: open_array() reads numpy arrays; load() it instead"
                )
            dtype, shape, fortran, offset = _npy_layout(fd, p)
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        source.fd, source.offset = fd, offset
        source.identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if st.st_size < offset + dtype.itemsize * math.prod(shape):
            raise IntegrityError(f"{p!r} is shorter than its .npy header says")
        return LazyArray(source, p, dtype, shape, "F" if fortran else "C")

    @contextmanager
    def _open_listing(self, path: str) -> Iterator[tuple[Place, int]]:
        """Directory ``path`` (links followed inside the root), open for reading."""
        with self._beneath.open_dir(path) as top:
            fd = os.open(".", READ_DIR, dir_fd=top.fd)
            try:
                yield top, fd
            finally:
                os.close(fd)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle by configuration: the copy is a backend on the same root.

        (Subclasses whose constructor takes other arguments override this.)
        """
        return (type(self), (self._root,))


def _npy_layout(fd: int, path: str) -> tuple[Any, tuple[int, ...], bool, int]:
    """``(dtype, shape, fortran_order, data offset)`` from the header of ``.npy`` file ``fd``."""
    with io.FileIO(fd, "rb", closefd=False) as fh:
        try:
            shape, fortran, dtype = _read_npy_header(fh)
        except ValueError as exc:
            raise SerializationError(f"{path!r} is not a readable .npy file: {exc}") from exc
        if dtype.hasobject:
            raise SerializationError(f"{path!r} holds Python objects, which cannot be read lazily")
        return dtype, shape, fortran, fh.tell()


class _NpyFile:
    """The bytes of one opened ``.npy`` file, for :class:`~polystore.arrays.LazyArray`."""

    def __init__(
        self, backend: DiskBackend, path: str, offset: int, identity: tuple[int, ...]
    ) -> None:
        self.backend, self.path, self.offset, self.identity = backend, path, offset, identity
        self.fd: int | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (_NpyFile, (self.backend, self.path, self.offset, self.identity))

    def __del__(self) -> None:
        if self.fd is not None:
            os.close(self.fd)

    def open(self) -> int:
        """Open the file at the path (inside the root, as every read is)."""
        if self.backend._hidden(self.path):
            raise c.not_found(self.path)
        try:
            fd, place = self.backend._beneath.open_file(self.path)
        except FileNotFoundError:
            raise c.not_found(self.path) from None
        with place:
            hidden = place.name.startswith(TEMP_PREFIX)  # a link to a temporary file
        if hidden or stat_mod.S_ISDIR(os.fstat(fd).st_mode):
            os.close(fd)
            raise c.not_found(self.path) if hidden else c.is_a_directory(self.path)
        return fd

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[Any]:
        import numpy as np

        if self.fd is None:  # a copy from another process: the same file, or refuse
            fd = self.open()
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self.identity:
                os.close(fd)
                raise ConflictError(
                    f"{self.path!r} changed since open_array() opened it; open it again"
                )
            self.fd = fd
        out = []
        for start, stop in ranges:
            buffer = np.empty(stop - start, np.uint8)  # not zero-filled: read into
            view, at = memoryview(buffer.data), self.offset + start
            while view:
                n = os.preadv(self.fd, [view], at)
                if not n:
                    raise IntegrityError(f"{self.path!r} ended before byte {at}")
                view, at = view[n:], at + n
            out.append(buffer)
        return out


def _open_temp(place: Place) -> tuple[str, int]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_BINARY", 0)
    while True:
        temp = TEMP_PREFIX + os.urandom(8).hex()
        try:
            # 0o666 and the umask decide the mode, as for open(); mkstemp
            # would leave every saved file private (0o600).
            return temp, os.open(temp, flags, 0o666, dir_fd=place.fd)
        except FileExistsError:  # pragma: no cover -- 64 random bits collided
            continue


def _link_new(place: Place, temp: str, path: str) -> None:
    """Put ``temp`` at ``place.name`` only if nothing is there (atomic with links)."""
    try:
        os.link(temp, place.name, src_dir_fd=place.fd, dst_dir_fd=place.fd)
    except FileExistsError:
        raise c.already_exists(path) from None
    except OSError:
        # No hard links on this filesystem: check, then rename.
        if lexists(place):
            raise c.already_exists(path) from None
        os.replace(temp, place.name, src_dir_fd=place.fd, dst_dir_fd=place.fd)


def _timestamp(seconds: float | None) -> dt.datetime | None:
    if seconds is None:
        return None
    return dt.datetime.fromtimestamp(seconds, dt.UTC)
