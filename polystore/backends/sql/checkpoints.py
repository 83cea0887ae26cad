"""WAL checkpoints of a SQLite catalog, on a thread of their own.

In WAL mode a commit appends pages to the ``-wal`` file; a *checkpoint*
copies them back into the database file and fsyncs it. SQLite runs one
automatically in the commit that takes the WAL past ``wal_autocheckpoint``
pages, so that commit also pays for copying everything since the last one:
a ``save_batch`` of 10,000 arrays of 4 KiB (40 MiB) spent 130 of its 400 ms
there. SQLite's documentation suggests the alternative used here: commits
only append, and a thread of the process checkpoints (``PASSIVE``: it never
blocks readers or writers) once a commit has left more than
:data:`~.engine.WAL_CHECKPOINT_BYTES` in the WAL that no checkpoint has
copied back yet. Durability is unchanged (``synchronous=NORMAL``: a commit
survives a crash of the process; a power cut may lose the last ones).

How much is left to copy is read from the WAL index (the ``-shm`` file, whose
layout is part of SQLite's documented file format): ``mxFrame``, the last
valid frame, at byte 16 of its header, and ``nBackfill``, the frames already
copied back, at byte 96. A header that cannot be read, or is not of the
version described there, wakes no thread: SQLite's own automatic checkpoint,
at four times the threshold, still bounds the WAL, and so it does whenever
the thread falls behind.

The thread starts at the first commit that needs it, tries again for a few
seconds while a checkpoint leaves too much behind (a reader still needs old
pages, another process is checkpointing), ends after :data:`IDLE_SECONDS` without work (a
later commit starts another), and is stopped by :meth:`Checkpointer.close`,
which the catalog calls when it is closed: a checkpoint in progress
finishes first. A ``fork()`` waits for a checkpoint in progress too: SQLite
keeps the locks of a process's connections in memory the child inherits,
and a child forked mid-checkpoint would find the checkpoint lock taken by a
connection it does not have, for good.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import struct
import threading
import weakref

__all__ = ["IDLE_SECONDS", "RETRIES", "RETRY_SECONDS", "Checkpointer"]

#: Seconds the checkpoint thread waits for work before it ends.
IDLE_SECONDS = 10.0

#: Seconds before the thread tries again when a checkpoint left more than the
#: threshold, doubling while it does, :data:`RETRIES` times (~6 s in all).
RETRY_SECONDS = 0.05
RETRIES = 6

#: The WAL-index header's version field (``iVersion``) this module reads.
_WAL_INDEX_VERSION = 3007000

#: ``iVersion`` (offset 0), ``isInit`` (12), ``szPage`` (14), ``mxFrame`` (16)
#: of the first copy of the WAL-index header, and ``nBackfill`` (96), native byte order.
_HEADER = struct.Struct("=I8xBxHI")
_BACKFILL = struct.Struct("=I")


#: Every checkpointer of this process, for the fork handlers below.
_ALL: weakref.WeakSet[Checkpointer] = weakref.WeakSet()


def _before_fork() -> None:
    for checkpointer in list(_ALL):
        checkpointer._working.acquire()


def _after_fork() -> None:
    for checkpointer in list(_ALL):
        if checkpointer._working.locked():
            checkpointer._working.release()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork, after_in_child=_after_fork)


class Checkpointer:
    """Checkpoints the WAL of the SQLite file at ``path`` when commits have left
    more than ``threshold`` bytes in it (see the module's docstring)."""

    def __init__(self, path: str, threshold: int) -> None:
        self._path = path
        self._threshold = threshold
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._closed = False
        self._shm: int | None = None  # the -shm file, open (:meth:`_read_index`)
        #: Held while a checkpoint runs (and by a fork, which waits for it).
        self._working = threading.Lock()
        _ALL.add(self)

    def pending(self) -> int | None:
        """Bytes in the WAL that no checkpoint has copied back yet; None if unknown."""
        head = self._read_index()
        if len(head) < 100:
            return None
        version, initialized, page, last = _HEADER.unpack_from(head)
        (backfilled,) = _BACKFILL.unpack_from(head, 96)
        if version != _WAL_INDEX_VERSION or initialized != 1 or last < backfilled:
            return None
        page_size = 65536 if page == 1 else page
        return int(last - backfilled) * int(page_size)

    def _read_index(self) -> bytes:
        """The first 100 bytes of the ``-shm`` file (b"" if there is none).

        Kept open: a read costs ~1 µs where opening costs ~10 (every commit
        asks). SQLite deletes the file when its last connection closes and
        makes a new one for the next: a file no longer linked is opened again.
        """
        for _ in range(2):
            fd = self._shm
            if fd is None:
                with self._lock:
                    if self._shm is None and not self._closed:
                        with contextlib.suppress(OSError):
                            self._shm = os.open(f"{self._path}-shm", os.O_RDONLY)
                    fd = self._shm
                if fd is None:
                    return b""
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_nlink:
                    return os.pread(fd, 100, 0)
            with self._lock:
                if self._shm == fd:
                    self._shm = None
                    with contextlib.suppress(OSError):
                        os.close(fd)
        return b""

    def committed(self) -> None:
        """After a write transaction: wake the thread if the WAL needs a checkpoint."""
        pending = self.pending()
        if pending is None or pending <= self._threshold:
            return
        with self._lock:
            if self._closed:
                return
            if self._pid != os.getpid():  # forked: the parent's thread is not here
                self._pid, self._thread = os.getpid(), None
                self._wake = threading.Event()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"polystore-checkpoint {self._path}", daemon=True
                )
                self._thread.start()
            self._wake.set()

    def _run(self) -> None:
        wake = self._wake
        conn = sqlite3.connect(self._path, timeout=0, isolation_level=None)
        retry: float | None = None  # seconds until the next try, when one fell short
        try:
            while True:
                wake.wait(IDLE_SECONDS if retry is None else retry)
                with self._lock:
                    if self._closed:
                        return
                    if retry is None and not wake.is_set():  # idle: a commit starts another
                        self._thread = None
                        return
                    wake.clear()
                # PASSIVE: copies what no reader still needs, never waits.
                with self._working, contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                # Short of the threshold still (a reader holds old pages, another
                # process checkpoints): again soon, then less and less often,
                # for a few seconds; after that, at the next commit.
                left = self.pending()
                short = left is not None and left > self._threshold
                retry = 2 * (retry or RETRY_SECONDS / 2) if short else None
                if retry is not None and retry > RETRY_SECONDS * 2**RETRIES:
                    retry = None
        finally:
            conn.close()
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None  # (ended by an error: the next commit starts another)

    def close(self) -> None:
        """Stop the thread, after the checkpoint it may be running."""
        with self._lock:
            self._closed = True
            thread = self._thread if self._pid == os.getpid() else None
            self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._lock:
            fd, self._shm = self._shm, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
