"""``LocalBlobStore``: content-addressed objects in a local directory.

Layout: ``<root>/ab/abcd...`` -- one level of 256 shards by hash prefix, so a
directory holds a few thousand entries per million blobs.

Writes are atomic: the bytes go to ``<final>.tmp-<token>`` in the same
directory, which is renamed over the final name with :func:`os.replace` once
complete. A reader therefore sees a whole object or none. A writer killed
mid-upload leaves only its temporary file, whose name the catalog's upload
intent predicts, so ``gc()`` removes it without listing the directory.

Durability (``fsync=True``, the default): the temporary file is fsynced before
the rename, and the directory after it (and every shard directory the write
created), so an object is on disk before the catalog row that refers to it
commits -- a power cut can lose an upload, never leave a committed row pointing
at a truncated object. ``fsync=False`` skips the syncs: faster for scratch data
that a power cut may take with it.

Staged content (:meth:`LocalBlobStore.stage`: a save writes large content
while it hashes it) goes to ``<root>/incoming/<random>``, fsynced, and is
renamed to its final name once the hash is known and the upload intent is
committed; ``gc()`` removes what a killed writer left there after the grace
period.

The owner marker is ``<root>/polystore-owner.json``, created whole or not at
all: written to a temporary file, then hard-linked to its name, which fails if
the name exists (on a file system without hard links, ``O_EXCL`` creation).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from polystore.blobs.base import (
    OWNER_KEY,
    BlobReader,
    BlobStore,
    Buffer,
    Staging,
    StoredObject,
    check_hash,
    check_range,
    hash_key,
)
from polystore.errors import NotFoundError, ReadOnlyError, StorageFullError

__all__ = ["LocalBlobStore"]

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: Where staged content goes (:meth:`LocalBlobStore.stage`), beside the shards.
_INCOMING = "incoming"
_STAGED = re.compile(rf"{_INCOMING}/[0-9a-f]{{32}}")
_OBJECT = re.compile(r"([0-9a-f]{2})/(\1[0-9a-f]{62})(?:\.tmp-([A-Za-z0-9_-]{1,64}))?")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _FileReader(BlobReader):
    def __init__(self, path: Path) -> None:
        super().__init__()
        try:
            self._file = open(path, "rb", buffering=0)  # noqa: SIM115 -- closed in close()
        except FileNotFoundError:
            raise NotFoundError(f"no blob object at {path}") from None
        self.size = os.fstat(self._file.fileno()).st_size

    def readinto(self, buffer: Any) -> int:
        return self._file.readinto(buffer)

    def readall(self) -> bytes:
        return self._file.readall()

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


class LocalBlobStore(BlobStore):
    """Objects under ``root`` (created by the first write or :meth:`claim`, not before)."""

    records_owner = True
    can_stage = True

    def __init__(
        self, root: str | os.PathLike[str], *, name: str = "local", fsync: bool = True
    ) -> None:
        if not name or len(name) > 64 or name == "inline":
            raise ValueError(f"a blob store name is 1-64 characters and not 'inline': {name!r}")
        self.root = Path(root).expanduser().absolute()
        self.name = name
        self.fsync = bool(fsync)

    def __repr__(self) -> str:
        return f"LocalBlobStore({str(self.root)!r}, name={self.name!r}, fsync={self.fsync})"

    def where(self) -> str:
        # docstring inherited
        return str(self.root)

    def path(self, content_hash: str) -> Path:
        """Where the object for ``content_hash`` lives (whether or not it exists)."""
        return self.root / hash_key(content_hash)

    def _temp_path(self, content_hash: str, token: str) -> Path:
        if not _TOKEN.fullmatch(token):
            raise ValueError(f"an upload token is 1-64 characters of [A-Za-z0-9_-]: {token!r}")
        return self.path(content_hash).with_name(f"{content_hash}.tmp-{token}")

    def _make_shard(self, shard: Path) -> None:
        if shard.is_dir():
            return
        shard.mkdir(parents=True, exist_ok=True)
        if self.fsync:
            # The new directory entries must be durable too: the shard's in the
            # root, and the root's in its parent (the first write creates both).
            for directory in (shard.parent, shard.parent.parent):
                _fsync_dir(directory)

    def put(
        self, content_hash: str, chunks: Iterable[Buffer], size: int, *, token: str | None = None
    ) -> bool:
        # docstring inherited
        if self.size(content_hash) == size:
            return False
        self._write(content_hash, chunks, size, token)
        return True

    def replace(
        self, content_hash: str, chunks: Iterable[Buffer], size: int, *, token: str | None = None
    ) -> None:
        # docstring inherited
        self._write(content_hash, chunks, size, token)

    def _write(
        self, content_hash: str, chunks: Iterable[Buffer], size: int, token: str | None
    ) -> None:
        """Write the object through a temporary file renamed over the final name."""
        final = self.path(content_hash)
        temp = self._temp_path(content_hash, token or uuid.uuid4().hex)
        self._write_file(temp, chunks, size, content_hash)
        try:
            os.replace(temp, final)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        if self.fsync:
            _fsync_dir(final.parent)

    def _write_file(self, path: Path, chunks: Iterable[Buffer], size: int, what: str) -> None:
        """Write ``size`` bytes to the new file ``path`` (fsynced), or leave no file."""
        written = 0
        try:
            fd = self._create_temp(path)
            try:
                for chunk in chunks:
                    view = memoryview(chunk).cast("B")
                    while view.nbytes:
                        n = os.write(fd, view)
                        written += n
                        view = view[n:]
                if written != size:
                    raise ValueError(f"upload of {what} gave {written} bytes, not {size}")
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as exc:
            path.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise StorageFullError(
                    errno.ENOSPC, f"blob store {self.name!r} is full: {exc}", str(path)
                ) from exc
            raise

    # -- staging ----------------------------------------------------------------------

    def _staged_path(self, staging: Staging) -> Path:
        if not _STAGED.fullmatch(staging.key):
            raise ValueError(f"not a key of staged content: {staging.key!r}")
        return self.root / staging.key

    def stage(self, chunks: Iterable[Buffer], size: int) -> Staging:
        # docstring inherited
        staging = Staging(f"{_INCOMING}/{uuid.uuid4().hex}", size)
        self._write_file(self._staged_path(staging), chunks, size, "staged content")
        return staging

    def put_staged(self, content_hash: str, staging: Staging, *, replace: bool = False) -> bool:
        # docstring inherited
        if not replace and self.size(content_hash) == staging.size:
            return False
        final, source = self.path(content_hash), self._staged_path(staging)
        for _ in range(100):
            self._make_shard(final.parent)
            try:
                os.replace(source, final)
                break
            except FileNotFoundError:
                if not source.exists():
                    raise NotFoundError(f"no staged content at {source}") from None
                # the shard was removed between the two calls: make it again
        else:
            raise FileNotFoundError(errno.ENOENT, "shard directory keeps vanishing", str(final))
        if self.fsync:
            _fsync_dir(final.parent)
        return True

    def discard(self, staging: Staging) -> None:
        # docstring inherited
        self._staged_path(staging).unlink(missing_ok=True)

    def sweep_staged(self, older_than: float) -> int:
        # docstring inherited
        cutoff = time.time() - older_than
        removed = 0
        try:
            entries = list(os.scandir(self.root / _INCOMING))
        except FileNotFoundError:
            return 0
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                if _STAGED.fullmatch(f"{_INCOMING}/{entry.name}") and (
                    entry.stat().st_mtime < cutoff
                ):
                    os.unlink(entry.path)
                    removed += 1
        return removed

    def _create_temp(self, temp: Path) -> int:
        """Open a new temporary file in its shard, making the shard if need be.

        :meth:`delete` removes a shard directory it empties, so one made here
        may be gone by the time the file is created in it: then make it again.
        """
        for _ in range(100):
            self._make_shard(temp.parent)
            try:
                return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            except FileNotFoundError:
                continue  # the shard was removed between the two calls
        raise FileNotFoundError(errno.ENOENT, "shard directory keeps vanishing", str(temp))

    def open(self, content_hash: str) -> BlobReader:
        # docstring inherited
        return _FileReader(self.path(content_hash))

    def read_range(self, content_hash: str, start: int, end: int) -> bytes:
        # docstring inherited: one pread per call, never a read of the bytes before the range
        check_range(start, end)
        path = self.path(content_hash)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise NotFoundError(f"no blob object at {path}") from None
        try:
            pieces = []
            position = start
            while position < end:
                # (pread returns less than asked past 2 GiB, or at the end of the file)
                piece = os.pread(fd, end - position, position)
                if not piece:
                    break
                pieces.append(piece)
                position += len(piece)
        finally:
            os.close(fd)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def size(self, content_hash: str) -> int | None:
        # docstring inherited
        try:
            return self.path(content_hash).stat().st_size
        except FileNotFoundError:
            return None

    def delete(self, content_hashes: Iterable[str]) -> None:
        """Delete these objects; hashes with no object are ignored.

        A shard directory left empty is removed too, so that ``gc()`` leaves no
        empty folders behind (a writer that finds its shard gone makes it again).
        """
        shards: set[Path] = set()
        for content_hash in content_hashes:
            path = self.path(content_hash)
            path.unlink(missing_ok=True)
            shards.add(path.parent)
        for shard in sorted(shards):
            # Only when empty: not when other objects or an upload are in it.
            with contextlib.suppress(OSError):
                shard.rmdir()

    def abort(self, content_hash: str, token: str) -> None:
        # docstring inherited
        self._temp_path(content_hash, token).unlink(missing_ok=True)

    def read_marker(self) -> bytes | None:
        # docstring inherited
        try:
            return (self.root / OWNER_KEY).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def create_marker(self, data: bytes) -> bool:
        # docstring inherited
        final = self.root / OWNER_KEY
        try:
            new_root = not self.root.is_dir()
            self.root.mkdir(parents=True, exist_ok=True)
            temp = self.root / f"{OWNER_KEY}.tmp-{uuid.uuid4().hex}"
            try:
                self._write_new(temp, data)
                try:
                    os.link(temp, final)
                    created = True
                except FileExistsError:
                    created = False
                except OSError:  # no hard links on this file system
                    created = self._create_exclusive(final, data)
            finally:
                temp.unlink(missing_ok=True)
            if created and self.fsync:
                _fsync_dir(self.root)
                if new_root:
                    _fsync_dir(self.root.parent)
        except OSError as exc:
            if exc.errno == errno.EROFS:
                raise ReadOnlyError(
                    errno.EROFS, f"blob store {self.name!r} is read-only: {exc}", str(final)
                ) from exc
            raise
        return created

    def _create_exclusive(self, path: Path, data: bytes) -> bool:
        try:
            self._write_new(path, data)
        except FileExistsError:
            return False
        return True

    def _write_new(self, path: Path, data: bytes) -> None:
        """Create ``path`` holding ``data`` (FileExistsError if it exists); no part left on failure."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view.nbytes:
                view = view[os.write(fd, view) :]
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)

    def scan(self) -> Iterator[StoredObject]:
        # docstring inherited
        if not self.root.is_dir():
            return
        for directory, _dirs, files in os.walk(self.root):
            for file_name in files:
                full = Path(directory, file_name)
                key = full.relative_to(self.root).as_posix()
                if key == OWNER_KEY:
                    continue  # the owner marker, not an object
                try:
                    size = full.stat().st_size
                except FileNotFoundError:  # deleted while we walked
                    continue
                match = _OBJECT.fullmatch(key)
                if _STAGED.fullmatch(key):
                    yield StoredObject(key, size, None, staged=True)
                elif match is None:
                    yield StoredObject(key, size, None)
                else:
                    yield StoredObject(key, size, check_hash(match[2]), match[3])
