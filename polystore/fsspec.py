"""``PolystoreFileSystem``: a catalog as an fsspec filesystem (protocol ``polystore``).

Anything that speaks fsspec -- pandas, dask, xarray, ``fsspec.open`` -- reads
and writes a polystore catalog through this class::

    fs = fsspec.filesystem("polystore", url="sqlite:///catalog.db")
    pandas.read_csv("polystore://plate1/a.csv", storage_options={"url": ...})

Paths are catalog paths (``plate1/a.csv``; a ``polystore://`` prefix and
leading slashes are dropped). Listings come from the catalog, and ``info``
adds polystore's fields (``serializer``, ``dtype``, ``shape``, ``attrs``,
``hash``, ``store``).

What a file reads as is what ``polystore get`` writes for it
(``polystore.cli.localfiles.local_writer``):

================= ==========================================================
stored as         read as
================= ==========================================================
bytes, text       the content itself (UTF-8 for text), read by byte range
array             ``np.save``'s ``.npy`` bytes (TIFF for a ``.tif`` name)
JSON value        JSON text, in the layout ``polystore put`` recorded
================= ==========================================================

Arrays and JSON are rendered whole when read; their ``info()["size"]`` is the
size of the stored content, and an open file's ``size`` is the rendered
length. Bytes written through ``pipe_file`` or ``open(path, "wb")`` are stored
as bytes and read back unchanged. A file opened for writing is saved when it
is closed, in one transaction; an exception inside its ``with`` block saves
nothing, and so does one inside ``with fs.transaction:``, which saves all its
files together or none.

Instances are not cached (``cachable = False``): each ``PolystoreFileSystem(...)``
is its own object with its own connections, which :meth:`~PolystoreFileSystem.close`
(or garbage collection) releases. A filesystem pickles by configuration,
and the copy opens the catalog on first use.

This module imports fsspec; ``import polystore`` does not import it.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import inspect
import io
import json
import threading
import weakref
from pathlib import PurePosixPath
from types import TracebackType
from typing import Any, ClassVar, Self, cast

from fsspec.spec import AbstractBufferedFile, AbstractFileSystem
from fsspec.transaction import Transaction

from polystore import paths
from polystore.backends.base import StatResult
from polystore.backends.sql import SQLBackend
from polystore.backends.sql.engine import default_url
from polystore.backends.sql.reopen import absolute_url
from polystore.errors import (
    ConflictError,
    InvalidPathError,
    IsADirectoryError,
    NotADirectoryError,
    SerializationError,
    UnsupportedOperationError,
)

__all__ = ["PolystoreFile", "PolystoreFileSystem"]

#: Serializers whose stored content is exactly what a file reads as.
_VERBATIM = ("bytes", "str")
#: What ``SQLBackend(...)`` accepts besides the URL.
_BACKEND_OPTIONS = tuple(inspect.signature(SQLBackend).parameters)[1:]


def _read_range(backend: SQLBackend, path: str, start: int, end: int) -> bytes:
    """Bytes ``start`` to ``end`` (exclusive) of the content stored at ``path``.

    Only for files stored as bytes or text, whose stored content is what they
    read as (text as UTF-8): :meth:`SQLBackend.read_range` reads just those
    bytes (a SQL substring inline, a ranged read on the blob store). A file
    overwritten meanwhile by a value of another kind raises ConflictError.
    """
    try:
        return backend.read_range(path, start, end, serializer="bytes")
    except SerializationError:
        try:
            return backend.read_range(path, start, end, serializer="str")
        except SerializationError:
            raise ConflictError(
                f"{path!r} changed while it was read: it no longer holds bytes or text"
            ) from None


def _render(backend: SQLBackend, path: str, st: StatResult) -> bytes:
    """The bytes ``polystore get`` writes for the file ``st`` describes."""
    from polystore.cli.localfiles import local_writer

    value = backend.load(path)
    _, write = local_writer(value, PurePosixPath(paths.split(path)[1]), st.attrs)
    out = io.BytesIO()
    write(out)
    return out.getvalue()


def _close(backend: SQLBackend) -> None:
    # (close looked up now: an unpickled copy changes class when it opens)
    backend.close()


def _has_magic(path: str) -> bool:
    return any(char in path for char in "*?[")


def _timestamp(value: dt.datetime | None) -> float | None:
    return None if value is None else value.timestamp()


class PolystoreFileSystem(AbstractFileSystem):  # type: ignore[misc]
    """A polystore catalog as an fsspec filesystem.

    ``url`` is the catalog's database URL (default: ``POLYSTORE_URL``, else
    ``sqlite:///polystore.db``), or an open :class:`~polystore.SQLBackend` to
    share (which :meth:`close` then leaves open). ``options`` are those of
    ``SQLBackend`` (``blob_store``, ``inline_limit``, ``allow_pickle``...). The
    catalog opens on first use.

    The class is long because it is fsspec's ``AbstractFileSystem`` interface
    (about thirty methods that fsspec's own tests expect), each a few lines
    over the backend; files opened for reading and writing are the classes
    beside it.
    """

    protocol: ClassVar[str] = "polystore"
    root_marker: ClassVar[str] = ""
    #: fsspec would keep every instance in a process-wide cache (its _Cached
    #: metaclass), with its open connections: polystore keeps no hidden
    #: global state, so each call builds a fresh filesystem.
    cachable: ClassVar[bool] = False

    def __init__(self, url: str | SQLBackend | None = None, **options: Any) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._backend: SQLBackend | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        if isinstance(url, SQLBackend):
            if options:
                raise TypeError(
                    "PolystoreFileSystem takes options only with a URL; "
                    f"an open SQLBackend already has them: {', '.join(sorted(options))}"
                )
            self._backend = url
            self.url = url.url
        else:
            unknown = set(options) - set(_BACKEND_OPTIONS)
            if unknown:
                raise TypeError(
                    f"unknown PolystoreFileSystem options: {', '.join(sorted(unknown))} "
                    f"(SQLBackend takes {', '.join(_BACKEND_OPTIONS)})"
                )
            self.url = url or default_url()
        self._options = options

    @property
    def backend(self) -> SQLBackend:
        """The catalog's backend, opened on first use."""
        backend = self._backend
        if backend is None:
            with self._lock:
                backend = self._backend
                if backend is None:
                    backend = SQLBackend(self.url, **self._options)
                    self._adopt(backend)
        return backend

    def _adopt(self, backend: SQLBackend) -> None:
        """Own ``backend``: close it with this filesystem, or when it is collected."""
        self._backend = backend
        self._finalizer = weakref.finalize(self, _close, backend)

    def close(self) -> None:
        """Close the backend this filesystem opened (not one it was given)."""
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        # By configuration: the backend pickles as its own (its copy opens on
        # first use), or, not opened yet, the URL (a SQLite path made absolute)
        # and options, which the copy resolves as this filesystem would have.
        if self._backend is not None:
            return (_unpickle_filesystem, (self._backend, {}, True))
        return (_unpickle_filesystem, (absolute_url(self.url), self._options, False))

    # -- paths ------------------------------------------------------------------------

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = str(path)
        if path.startswith("polystore://"):
            path = path[len("polystore://") :]
        elif path.startswith("polystore::"):
            path = path[len("polystore::") :]
        return path.strip("/")

    def _norm(self, path: Any) -> str:
        return paths.normalize(self._strip_protocol(path))

    # -- inspecting ---------------------------------------------------------------------

    def _info(self, st: StatResult) -> dict[str, Any]:
        info: dict[str, Any] = {
            "name": st.path,
            "size": st.size if st.kind == "file" else 0,
            "type": "file" if st.kind == "file" else "directory",
            "created": _timestamp(st.created_at),
            "mtime": _timestamp(st.modified_at),
        }
        if st.kind == "file":
            info.update(
                serializer=st.serializer,
                dtype=st.dtype,
                shape=list(st.shape) if st.shape is not None else None,
                attrs=st.attrs,
                hash=st.hash,
                store=st.store,
            )
        return info

    def info(self, path: Any, **kwargs: Any) -> dict[str, Any]:
        # docstring inherited
        return self._info(self.backend.stat(self._norm(path)))

    def ls(self, path: Any, detail: bool = True, **kwargs: Any) -> list[Any]:
        """The entries of directory ``path``: their ``info`` dicts, or paths (``detail=False``).

        One query for the whole directory. A file lists as itself.
        """
        norm = self._norm(path)
        try:
            if not detail:
                return [paths.join(norm, name) for name in self.backend.list_dir(norm)]
            return [self._info(st) for st in self.backend.scan_dir(norm)]
        except NotADirectoryError:
            st = self.backend.stat(norm)  # a file lists as itself
            return [self._info(st) if detail else st.path]

    def exists(self, path: Any, **kwargs: Any) -> bool:
        # docstring inherited
        try:
            return self.backend.exists(self._norm(path))
        except InvalidPathError:
            return False

    def isdir(self, path: Any) -> bool:
        # docstring inherited
        try:
            return self.backend.is_dir(self._norm(path))
        except InvalidPathError:
            return False

    def isfile(self, path: Any) -> bool:
        # docstring inherited
        try:
            return self.backend.is_file(self._norm(path))
        except InvalidPathError:
            return False

    def find(
        self,
        path: Any,
        maxdepth: int | None = None,
        withdirs: bool = False,
        detail: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Every file under ``path`` (and directory, ``withdirs=True``), sorted.

        One catalog query for the whole tree; ``maxdepth=1`` keeps the
        entries of ``path`` itself; ``detail=True`` gives ``{path: info}``.
        """
        if maxdepth is not None and maxdepth < 1:
            raise ValueError("maxdepth must be at least 1")
        norm = self._norm(path)
        out: dict[str, dict[str, Any]] = {}
        try:
            found = self.backend.query(under=norm)
        except NotADirectoryError:
            out[norm] = self.info(norm)
        except FileNotFoundError:
            found = []
        else:
            if withdirs and norm:
                out[norm] = self.info(norm)
            start = len(norm) + 1 if norm else 0
            for st in found:
                if st.kind == "dir" and not withdirs:
                    continue
                if maxdepth is not None and st.path[start:].count("/") >= maxdepth:
                    continue
                out[st.path] = self._info(st)
        names = sorted(out)
        return {name: out[name] for name in names} if detail else names

    def du(
        self,
        path: Any,
        total: bool = True,
        maxdepth: int | None = None,
        withdirs: bool = False,
        **kwargs: Any,
    ) -> Any:
        """The bytes stored under ``path``: a total, or ``{path: size}`` (``total=False``).

        Sizes are those the catalog records (the stored content's), from the
        one query of :meth:`find`.
        """
        found = self.find(path, maxdepth=maxdepth, withdirs=withdirs, detail=True)
        sizes = {name: info["size"] for name, info in found.items()}
        return sum(sizes.values()) if total else sizes

    def created(self, path: Any) -> dt.datetime:
        """When the file or directory was created (UTC)."""
        created = self.backend.stat(self._norm(path)).created_at
        assert created is not None  # the catalog records it for every node
        return created

    def modified(self, path: Any) -> dt.datetime:
        """When the file's content or the directory was last changed (UTC)."""
        modified = self.backend.stat(self._norm(path)).modified_at
        assert modified is not None
        return modified

    def ukey(self, path: Any) -> str:
        """A key that changes whenever what the file reads as changes.

        The content hash for bytes and text; for arrays and JSON, a hash of
        the content hash and what else their rendering depends on (the name's
        suffix, the recorded JSON layout).
        """
        st = self.backend.stat(self._norm(path))
        if st.kind != "file" or st.hash is None:
            return str(super().ukey(path))
        if st.serializer in _VERBATIM:
            return st.hash
        rendering = [st.hash, st.serializer, PurePosixPath(st.path).suffix.lower(), st.attrs]
        return hashlib.sha256(json.dumps(rendering, default=str).encode()).hexdigest()

    def checksum(self, path: Any) -> int:
        # docstring inherited (from the content hash: no content is read)
        return int(self.ukey(path), 16)

    def sign(self, path: Any, expiration: int = 100, **kwargs: Any) -> str:
        """Not supported: a catalog has no URLs to hand out."""
        raise NotImplementedError(
            "polystore catalogs have no signed URLs; share the catalog URL and a path instead"
        )

    # -- reading ---------------------------------------------------------------------------

    def _file_stat(self, norm: str) -> StatResult:
        st = self.backend.stat(norm)
        if st.kind != "file":
            raise IsADirectoryError(errno.EISDIR, "Is a directory", norm)
        return st

    def cat_file(
        self, path: Any, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        """The bytes ``polystore get`` writes for ``path``, or those from ``start`` to ``end``.

        ``start`` and ``end`` count as in a slice (negative from the end).
        Bytes and text are read by range; arrays and JSON are rendered whole.
        """
        norm = self._norm(path)
        st = self._file_stat(norm)
        if st.serializer in _VERBATIM:
            first, stop, _ = slice(start, end).indices(st.size or 0)
            if stop <= first:
                return b""
            return _read_range(self.backend, norm, first, stop)
        return _render(self.backend, norm, st)[start:end]

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | None = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> PolystoreFile:
        # docstring inherited
        return PolystoreFile(
            self,
            self._norm(path),
            mode,
            block_size=block_size,
            autocommit=autocommit,
            cache_options=cache_options,
            **kwargs,
        )

    def open(
        self,
        path: Any,
        mode: str = "rb",
        block_size: int | None = None,
        cache_options: dict[str, Any] | None = None,
        compression: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """A file of this filesystem; see :class:`PolystoreFile`.

        Text modes wrap it in a text layer; text written in a ``with`` block
        that raises is not saved either.
        """
        if "b" in mode or "r" in mode or compression is not None:
            return super().open(path, mode, block_size, cache_options, compression, **kwargs)
        text = {k: kwargs.pop(k) for k in ("encoding", "errors", "newline") if k in kwargs}
        binary = super().open(
            path, mode.replace("t", "") + "b", block_size, cache_options, compression, **kwargs
        )
        return _TextWriter(binary, **text)

    # -- writing ---------------------------------------------------------------------------

    def pipe_file(self, path: Any, value: Any, mode: str = "overwrite", **kwargs: Any) -> None:
        """Store ``value`` (bytes) at ``path`` verbatim; ``mode="create"`` refuses an existing file.

        ``attrs=`` stores attributes with it, as ``save`` does.
        """
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"pipe_file stores bytes, not {type(value).__name__}")
        self.backend.save(bytes(value), self._norm(path), overwrite=mode != "create", **kwargs)

    def touch(self, path: Any, truncate: bool = True, **kwargs: Any) -> None:
        """Create an empty file (replacing one that exists, with ``truncate``).

        ``truncate=False`` on an existing file is not supported: the catalog
        changes a file's modification time only with its content.
        """
        norm = self._norm(path)
        if not truncate and self.backend.exists(norm):
            raise NotImplementedError(
                "touch(truncate=False) of an existing file: polystore changes a file's "
                "modification time only when its content changes"
            )
        self.backend.save(b"", norm)

    def mkdir(self, path: Any, create_parents: bool = True, **kwargs: Any) -> None:
        # docstring inherited
        norm = self._norm(path)
        parent = paths.split(norm)[0]
        with self.backend.transaction() as backend:
            if backend.exists(norm):
                raise FileExistsError(errno.EEXIST, "File exists", norm)
            if not create_parents and not backend.is_dir(parent):
                if backend.exists(parent):
                    raise NotADirectoryError(errno.ENOTDIR, "Not a directory", parent)
                raise FileNotFoundError(errno.ENOENT, "No such directory", parent)
            backend.ensure_directory(norm)

    def makedirs(self, path: Any, exist_ok: bool = False) -> None:
        # docstring inherited
        norm = self._norm(path)
        with self.backend.transaction() as backend:
            if backend.exists(norm) and not (exist_ok and backend.is_dir(norm)):
                raise FileExistsError(errno.EEXIST, "File exists", norm)
            backend.ensure_directory(norm)

    def rmdir(self, path: Any) -> None:
        # docstring inherited
        norm = self._norm(path)
        if not norm:
            return  # the root stays, as in fsspec's memory filesystem
        with self.backend.transaction() as backend:
            if backend.is_file(norm):
                raise NotADirectoryError(errno.ENOTDIR, "Not a directory", norm)
            backend.delete(norm)

    def rm_file(self, path: Any) -> None:
        # docstring inherited
        norm = self._norm(path)
        with self.backend.transaction() as backend:
            self._file_stat(norm)
            backend.delete(norm)

    _rm = rm_file

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        """Delete files, and directories; all of them or, on any error, none.

        ``recursive=True`` deletes a directory's whole tree in one operation of
        the catalog; without it, only empty directories are deleted.
        """
        with self.backend.transaction() as backend:
            if recursive and maxdepth is None:
                done: list[str] = []
                for p in self.expand_path(path):
                    if not any(p == d or p.startswith(d + "/") for d in done):
                        backend.delete(p, recursive=True)
                        done.append(p)
                return
            for p in reversed(self.expand_path(path, recursive=recursive, maxdepth=maxdepth)):
                backend.delete(p)

    def cp_file(self, path1: Any, path2: Any, **kwargs: Any) -> None:
        """Copy a file (its catalog row; the content is shared) or create a directory.

        An existing file at ``path2`` is replaced.
        """
        src, dst = self._norm(path1), self._norm(path2)
        with self.backend.transaction() as backend:
            if backend.is_dir(src):
                if not backend.is_dir(dst):
                    backend.ensure_directory(dst)
                return
            self._file_stat(src)
            if src == dst:
                return
            if backend.is_dir(dst):
                raise IsADirectoryError(errno.EISDIR, "Is a directory", dst)
            if backend.exists(dst):
                backend.delete(dst)
            backend.copy(src, dst)

    def copy(self, path1: Any, path2: Any, *args: Any, **kwargs: Any) -> None:
        # docstring inherited (in one transaction: all copies, or none)
        with self.backend.transaction():
            super().copy(path1, path2, *args, **kwargs)

    def mv(
        self,
        path1: Any,
        path2: Any,
        recursive: bool = False,
        maxdepth: int | None = None,
        **kwargs: Any,
    ) -> None:
        """Move a file or a directory tree, like ``mv`` (and fsspec's local filesystem).

        A directory moves whatever ``recursive`` says, by rewriting one catalog
        row; into ``path2`` if that is a directory (or ends with ``/``), else
        to ``path2``. An existing file at the destination is replaced. Lists
        and globs move through copy and delete, in one transaction.
        """
        single = isinstance(path1, str) and isinstance(path2, str) and maxdepth is None
        if single and _has_magic(path1) and not self.exists(path1):
            single = False  # a glob (a name with "*" that exists is taken as it is)
        if not single:
            with self.backend.transaction():
                super().mv(path1, path2, recursive=recursive, maxdepth=maxdepth, **kwargs)
            return
        src, dst = self._norm(path1), self._norm(path2)
        if src == dst:
            return  # (as fsspec does)
        with self.backend.transaction() as backend:
            st = backend.stat(src)
            if path2.endswith("/") or backend.is_dir(dst):
                dst = paths.join(dst, paths.split(src)[1])
            if dst == src:
                return
            if backend.exists(dst):
                if st.kind == "dir" or backend.is_dir(dst):
                    raise FileExistsError(errno.EEXIST, "Destination exists", dst)
                backend.delete(dst)
            backend.move(src, dst)


def _unpickle_filesystem(
    target: str | SQLBackend, options: dict[str, Any], owns: bool
) -> PolystoreFileSystem:
    fs = PolystoreFileSystem(target, **options)
    if owns:
        assert isinstance(target, SQLBackend)
        fs._adopt(target)
    return fs


class _CatalogTransaction(Transaction):  # type: ignore[misc]
    """``with fs.transaction:`` -- the files written inside save together, or none do."""

    def complete(self, commit: bool = True) -> None:
        if not commit:
            super().complete(commit=False)
            return
        with self.fs.backend.transaction():
            super().complete(commit=True)


PolystoreFileSystem.transaction_type = _CatalogTransaction


class PolystoreFile(AbstractBufferedFile):  # type: ignore[misc]
    """A file of a :class:`PolystoreFileSystem`.

    Read mode (``rb``) is seekable: bytes and text are read by range, as the
    reader asks; arrays and JSON are rendered once, when the file opens.
    Write modes (``wb``; ``xb`` refuses an existing file; ``ab`` appends to a
    file stored as bytes or text) keep the bytes in memory and save them when
    the file is closed, in one transaction. An exception inside the ``with``
    block saves nothing.
    """

    def __init__(self, fs: PolystoreFileSystem, path: str, mode: str = "rb", **kwargs: Any) -> None:
        self._rendered: bytes | None = None
        self._pending: bytes | None = None
        size = kwargs.pop("size", None)
        if mode == "rb":
            st = fs._file_stat(path)
            if st.serializer in _VERBATIM:
                size = st.size
            else:
                self._rendered = _render(fs.backend, path, st)
                size = len(self._rendered)
            kwargs.setdefault("cache_type", "readahead")
        elif mode == "xb" and fs.backend.exists(path):
            raise FileExistsError(errno.EEXIST, "File exists", path)
        elif mode not in ("wb", "xb", "ab"):
            raise ValueError(f"unsupported file mode {mode!r}: use rb, wb, xb or ab")
        existing = b""
        if mode == "ab" and fs.backend.exists(path):
            st = fs._file_stat(path)
            if st.serializer not in _VERBATIM:
                raise UnsupportedOperationError(
                    f"cannot append to {path!r}: it holds a {st.serializer} value, not bytes"
                )
            existing = fs.cat_file(path)
        # Every write mode is "wb" to fsspec (whose "xb" and "ab" vary by version):
        # the exclusive check and the appending are done here.
        super().__init__(fs, path, "wb" if mode != "rb" else mode, size=size, **kwargs)
        self._overwrite = mode != "xb"
        if existing:
            self.buffer.write(existing)

    def _fetch_range(self, start: int, end: int) -> bytes:
        if self._rendered is not None:
            return self._rendered[start:end]
        end = min(end, self.size)
        if end <= start:
            return b""
        return _read_range(self.fs.backend, self.path, start, end)

    def _upload_chunk(self, final: bool = False) -> bool:
        if not final:
            return False  # everything waits for close: nothing is visible before
        self._pending = self.buffer.getvalue()
        if self.autocommit:
            self.commit()
        return True

    def commit(self) -> None:
        """Save the bytes written (at close, or at the end of ``fs.transaction``)."""
        data, self._pending = self._pending, None
        if data is not None:
            self.fs.backend.save(data, self.path, overwrite=self._overwrite)

    def discard(self) -> None:
        """Forget the bytes written: nothing is saved."""
        self._pending = None
        self.buffer = io.BytesIO()

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None and self.writable():
            self.discard()
            self.closed = True
            return
        self.close()


class _TextWriter(io.TextIOWrapper):
    """Text over a :class:`PolystoreFile` in a write mode; an exception in ``with`` saves nothing."""

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            super().__exit__(exc_type, exc, traceback)
            return
        # The text written so far goes to the unsaved buffer, which then drops it.
        binary = cast(PolystoreFile, self.detach())
        binary.__exit__(exc_type, exc, traceback)
