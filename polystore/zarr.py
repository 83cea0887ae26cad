"""``PolystoreStore``: a zarr v3 store over a polystore backend.

Each zarr key ``k`` is the file ``{path}/{k}`` of the backend, holding the
key's bytes verbatim (saved as ``bytes``, so ``backend.load`` returns them).
On an :class:`~polystore.SQLBackend`:

* a ``zarr.json`` whose bytes are a JSON object is also saved with that
  document as its ``attrs``, so plain SQL over ``polystore_catalog`` finds
  arrays and groups by shape, data type or attribute (a document the catalog
  cannot keep as attrs -- over 64 KiB, or with ``NaN`` literals -- is saved
  without);
* partial reads (zarr's ``byte_range``) read only the requested bytes
  (:mod:`polystore.backends.sql.ranges`);
* identical chunks are stored once, as all content is (deduplicated by hash).

Other backends work too, through their ``load``/``save`` (a partial read then
loads the whole value and slices it). ``DiskBackend`` is not one of them: it
picks a file's format by extension and so cannot keep ``zarr.json`` as bytes;
zarr's own ``LocalStore`` is the store for a directory on disk.

Transactions. ``SQLBackend.transaction()`` follows the thread (a
``ContextVar``), and zarr runs store calls on its own event-loop thread, so a
store cannot simply join the caller's database transaction. Instead,
:meth:`PolystoreStore.transaction` buffers every write and delete made through
the store (and its :meth:`~PolystoreStore.with_read_only` copies) during the
block, from whatever thread, and reads through the store see them; at the end
of the block they are applied in one ``backend.transaction()`` on the thread
that leaves it -- all or nothing. An exception leaves the backend untouched.

Pickling goes by configuration: a store over an ``SQLBackend`` pickles as its
URL and options (``inline_limit``, ``allow_pickle``, the blob store) and the
copy opens its catalog on first use, so dask's processes can share it. A store
over a ``MemoryBackend`` cannot leave its process and refuses with ``TypeError``.

zarr is an optional dependency: ``pip install 'polystore[zarr]'``. This module
is never imported by ``import polystore``.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple, Self, TypeVar, cast

from zarr.abc.store import (
    ByteRequest,
    OffsetByteRequest,
    RangeByteRequest,
    Store,
    SuffixByteRequest,
)
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.core.buffer.core import default_buffer_prototype
from zarr.core.common import concurrent_map
from zarr.core.config import config as zarr_config

from polystore import paths
from polystore.backends._common import check_attrs
from polystore.backends.base import StorageBackend
from polystore.backends.memory import MemoryBackend
from polystore.errors import (
    AlreadyExistsError,
    NotFoundError,
    SerializationError,
    UnsupportedOperationError,
)
from polystore.serializers import byte_view

if TYPE_CHECKING:
    from polystore.backends.sql.backend import SQLBackend

__all__ = ["PolystoreStore"]

#: The name of zarr v3's metadata documents, which are also saved as attrs.
METADATA_KEY = "zarr.json"

#: A value on its way to the backend: ``bytes``, or on an SQL catalog a view of
#: zarr's buffer (see :meth:`PolystoreStore._data`).
_Bytes = bytes | memoryview

# What reading a key can run into that means "no such key" to zarr.
_MISSING = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


def _is_sql_backend(backend: StorageBackend) -> bool:
    # Without the module imported, no SQLBackend exists (and none is imported here).
    module = sys.modules.get("polystore.backends.sql.backend")
    return module is not None and isinstance(backend, module.SQLBackend)


def _reopen(url: str, options: dict[str, Any], path: str, read_only: bool) -> PolystoreStore:
    """Unpickle a store by configuration: its catalog opens on first use."""
    return PolystoreStore._over(_Catalog(url=url, options=options), _Pending(), path, read_only)


# -- the backend a store and its copies share -----------------------------------------


class _Catalog:
    """The backend behind a store and its ``with_read_only`` copies.

    Given a URL, it opens the :class:`~polystore.SQLBackend` on first use and
    owns it (``close`` closes it; the next use opens it again). Given a backend
    instance, it only uses it.
    """

    def __init__(
        self,
        backend: StorageBackend | None = None,
        *,
        url: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        self._backend = backend
        #: Only SQL catalogs are opened from a URL.
        self.is_sql = backend is None or _is_sql_backend(backend)
        self.url = (
            url if backend is None else getattr(backend, "url", None) if self.is_sql else None
        )
        self.options = dict(options or {})
        self.owned = backend is None
        #: Whether ``save`` takes ``attrs=`` and ``overwrite=`` (the built-in catalogs do).
        self.takes_options = self.is_sql or isinstance(backend, MemoryBackend)
        self._lock = threading.Lock()
        # SQLite takes one writer at a time, and zarr writes up to ten chunks at
        # once: queued on a lock, they wait their turn instead of sleeping in
        # SQLite's busy handler (a little faster, measured: medians 0.93 s
        # against 1.0 s for 400 chunks).
        self._writer = threading.Lock()
        #: Whether the last chunk read through a store over it was large
        #: (:class:`_GroupRead`; None: no chunk read yet): shared with the
        #: store's copies, which zarr makes on every ``open_array(..., mode="r")``.
        self.large_values: bool | None = None
        self._reads_in_groups: bool | None = None
        self._local: bool | None = None

    @property
    def reads_in_groups(self) -> bool:
        """Whether reads of small values go to :class:`_GroupRead`.

        Only an SQL catalog reads many values at once (``load_batch``), and only
        values in the catalog itself: those in a blob store are read one after
        another, where a thread each reads them at once (on S3, a round trip
        each). So not where values up to :data:`GROUP_UNDER` may be external.
        """
        if self._reads_in_groups is None:
            self._reads_in_groups = self.is_sql and self.inline_up_to >= GROUP_UNDER
        return self._reads_in_groups

    @property
    def local(self) -> bool:
        """Whether the catalog is an open SQLite database: its calls take this process's
        CPU and local disk, never a network round trip. (False while the catalog is
        not open: opening it is no short call.)"""
        backend = self._backend
        if backend is None:
            return False
        if self._local is None:
            engine = getattr(backend, "engine", None) if self.is_sql else None
            self._local = engine is not None and engine.dialect.name == "sqlite"
        return self._local

    @property
    def inline_up_to(self) -> float:
        """The largest value an SQL catalog keeps in itself (not in its blob store), now."""
        backend = self.backend
        if getattr(backend, "blob_store", None) is None:
            return float("inf")
        return float(getattr(backend, "inline_limit", 0))

    @property
    def writer_busy(self) -> bool:
        """Whether a write through a store over this catalog holds its writer lock now."""
        return self._writer.locked()

    @property
    def backend(self) -> StorageBackend:
        backend = self._backend
        if backend is None:
            with self._lock:
                if self._backend is None:
                    assert self.url is not None
                    from polystore.backends.sql.backend import SQLBackend

                    self._backend = SQLBackend(self.url, **self.options)
                backend = self._backend
        return backend

    def check_not_joined(self, *, write: bool = True) -> None:
        """Raise :class:`~polystore.errors.UnsupportedOperationError` if a call of the
        store from zarr's side cannot go on beside a transaction of the SQL
        catalog open in the calling context.

        zarr runs store calls on its own thread, which cannot join a caller's
        ``backend.transaction()``. A write would run outside it: on SQLite it
        would wait for its write lock (the whole busy timeout), on PostgreSQL
        commit apart from it, or wait on a row it holds. A read runs beside it
        on a connection of its own, and sees what has committed -- except on an
        in-memory SQLite catalog, which is one connection: the read would take
        it from the transaction, and roll the transaction back when done.
        """
        if not self.is_sql:
            return
        catalog = getattr(self._backend, "_catalog", None)
        if catalog is None or not catalog.in_transaction:
            return
        if write:
            raise UnsupportedOperationError(
                f"a transaction of {self._backend!r} is open where zarr was called: zarr "
                "writes from its own thread, which cannot join it; write inside "
                "PolystoreStore.transaction() instead, which applies the writes together"
            )
        from sqlalchemy.pool import StaticPool

        engine = getattr(self._backend, "engine", None)
        if engine is not None and isinstance(engine.pool, StaticPool):
            raise UnsupportedOperationError(
                f"a transaction of {self._backend!r} is open where zarr was called, and this "
                "in-memory catalog is one connection, which zarr's thread would take from it: "
                "read through zarr outside the transaction, or use a SQLite file"
            )

    def writing(self) -> AbstractContextManager[Any]:
        """Held while the store writes: one writer at a time on SQLite, any number elsewhere."""
        self.backend  # noqa: B018 -- (opened first: :attr:`local` is False until it is)
        return self._writer if self.local else nullcontext()

    def identity(self) -> tuple[str, Any]:
        """What two equal stores share: the catalog's URL, or the very backend."""
        if self.url is not None:
            return ("url", self.url)
        return ("backend", id(self._backend))

    def describe(self) -> str:
        if self.url is None:
            return repr(self._backend)
        from sqlalchemy.engine import make_url

        return make_url(self.url).render_as_string(hide_password=True)

    def config(self) -> tuple[str, dict[str, Any]] | StorageBackend:
        """What a pickled store carries: ``(url, options)``, or a backend that pickles itself."""
        backend = self._backend
        if backend is None:
            assert self.url is not None
            return self.url, self.options
        if isinstance(backend, MemoryBackend):
            raise TypeError(
                "a PolystoreStore over a MemoryBackend cannot be pickled: the memory backend "
                "lives in this process only; use an SQLBackend (a database URL) to share data "
                "between processes"
            )
        if not self.is_sql:
            return backend
        sql = cast("SQLBackend", backend)
        url = sql.engine.url
        if url.get_backend_name() == "sqlite" and (
            url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"
        ):
            raise TypeError(
                "a PolystoreStore over an in-memory SQLite catalog cannot be pickled: another "
                "process would open an empty database; use a SQLite file or PostgreSQL"
            )
        options = {
            "inline_limit": sql.inline_limit,
            "allow_pickle": sql.allow_pickle,
            "blob_store": sql.blob_store,
        }
        return sql.url, options

    def close(self) -> None:
        if self.owned:
            with self._lock:
                backend, self._backend = self._backend, None
            if backend is not None:
                backend.close()


# -- writes buffered by transaction() -----------------------------------------------


@dataclass
class _Layer:
    """The writes of one ``transaction()`` block: key -> bytes, or None for deleted.

    ``cleared`` holds the prefixes ``delete_dir`` removed (``"a/"``, or ``""``
    for everything); a write after a clear is in ``writes``, one before it is
    gone, so the clears apply first.
    """

    writes: dict[str, bytes | None] = field(default_factory=dict)
    cleared: set[str] = field(default_factory=set)

    def clear(self, prefix: str) -> None:
        self.writes = {k: v for k, v in self.writes.items() if not k.startswith(prefix)}
        self.cleared = {p for p in self.cleared if not p.startswith(prefix)} | {prefix}

    def absorb(self, inner: _Layer) -> None:
        for prefix in inner.cleared:
            self.clear(prefix)
        self.writes.update(inner.writes)


class _Pending:
    """The open ``transaction()`` blocks of a store and its copies, innermost last.

    Shared by every thread, guarded by one lock: zarr writes from its
    event-loop thread while the block runs in the caller's.
    """

    def __init__(self) -> None:
        self._layers: list[_Layer] = []
        self.lock = threading.RLock()

    @property
    def active(self) -> bool:
        return bool(self._layers)

    def lookup(self, key: str) -> tuple[bool, bytes | None]:
        """``(True, bytes or None)`` if the open blocks decide ``key``, else ``(False, None)``."""
        with self.lock:
            for layer in reversed(self._layers):
                if key in layer.writes:
                    return True, layer.writes[key]
                if any(key.startswith(prefix) for prefix in layer.cleared):
                    return True, None
        return False, None

    def write(self, key: str, value: _Bytes | None) -> bool:
        """Buffer a write (None: a delete); False when no block is open.

        The block keeps a copy: the caller may reuse its buffer once ``set``
        returns, long before the block commits.
        """
        with self.lock:
            if not self._layers:
                return False
            self._layers[-1].writes[key] = None if value is None else bytes(value)
            return True

    def clear(self, prefix: str) -> bool:
        with self.lock:
            if not self._layers:
                return False
            self._layers[-1].clear(prefix)
            return True

    def written(self) -> set[str]:
        """Every key an open block wrote (not deleted), as reads would now see it."""
        with self.lock:
            keys = {k for layer in self._layers for k, v in layer.writes.items() if v is not None}
            return {k for k in keys if self.lookup(k)[1] is not None}

    def visible(self, key: str) -> bool:
        """Whether a key the backend holds is still there for reads through the store."""
        decided, value = self.lookup(key)
        return not decided or value is not None

    def push(self) -> None:
        with self.lock:
            self._layers.append(_Layer())

    def pop(self) -> _Layer:
        with self.lock:
            return self._layers.pop()

    def top(self) -> _Layer:
        with self.lock:
            return self._layers[-1]

    @property
    def depth(self) -> int:
        with self.lock:
            return len(self._layers)


# -- byte ranges ---------------------------------------------------------------------


#: Values over this size are read each on a worker thread of its own (:class:`_GroupRead`).
GROUP_UNDER = 1 << 20
#: Queued writes holding more bytes than this are committed in groups of half
#: zarr's writes in flight (:meth:`_GroupCommit._take`).
SPLIT_OVER = 64 << 20


class _Group:
    """Calls that arrive while a worker thread is busy with others are run together, next.

    zarr reads and writes an array's chunks concurrently (up to its
    ``async.concurrency`` calls in flight). Sending each to a worker thread of
    its own costs a thread hop per chunk (about 65 µs here, several times the
    read of a small chunk from an SQL catalog) and, for a write, a commit per
    chunk. Here a call waits for the group in flight (if any) and then goes,
    in one worker-thread call, with every call that queued meanwhile. Each
    caller gets its own outcome, its own result or exception.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[tuple[Any, asyncio.AbstractEventLoop, asyncio.Future[Any]]] = []
        self._busy = False

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            self._queue.append((item, loop, done))
            start, self._busy = not self._busy, True
        if start:
            # On the loop's next round, so that the calls zarr started with
            # this one queue too -- and whatever happens to this caller meanwhile.
            loop.call_soon(self._start, loop)
        return await done

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            # On the loop itself, in a context of its own: the one this
            # callback inherits may be a caller's thread's (zarr's sync API
            # hands its calls over with it), and a worker thread's has nothing.
            contextvars.Context().run(self._drain, loop)
        except BaseException as exc:  # noqa: BLE001 -- a closing loop: fail what waits
            self._fail_all(exc)

    def _fail_all(self, exc: BaseException) -> None:
        """Give every queued call ``exc``, and let the next call start a drain."""
        with self._lock:
            queued, self._queue, self._busy = self._queue, [], False
        for _, loop, done in queued:
            with suppress(RuntimeError):  # the caller's loop has closed
                loop.call_soon_threadsafe(_settle, done, _Outcome(None, exc))

    def _drain(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Run the queued groups until none is left (on a worker thread).

        Called with ``loop``, on that loop's own thread: the next group runs
        there if :meth:`_here` takes it, and the drain goes on at the loop's
        next turn; otherwise the queue goes to a worker thread.
        """
        while True:
            try:
                with self._lock:
                    group = self._take(self._queue)
                    if not group:
                        self._busy = False
                        return
                    leave = loop is not None and not self._here([item for item, _, _ in group])
                    if not leave:
                        del self._queue[: len(group)]
                if leave:
                    assert loop is not None
                    loop.run_in_executor(None, self._drain)  # (not awaited: each caller's is)
                    return
            except BaseException as exc:  # noqa: BLE001 -- never leave callers waiting
                self._fail_all(exc)
                return
            try:
                outcomes = self._run([item for item, _, _ in group])
            except BaseException as exc:  # noqa: BLE001 -- each waiting caller must hear one
                outcomes = [_Outcome(None, exc)] * len(group)
            for (_, caller, done), outcome in zip(group, outcomes, strict=True):
                if caller is loop:
                    _settle(done, outcome)
                    continue
                with suppress(RuntimeError):  # the caller's loop has closed
                    caller.call_soon_threadsafe(_settle, done, outcome)
            if loop is not None:
                # One group at a time on the loop: its other callbacks run
                # before the next (which calls from other threads may fill).
                with self._lock:
                    if not self._queue:
                        self._busy = False
                        return
                loop.call_soon(self._start, loop)
                return

    def _here(self, items: list[Any]) -> bool:
        """Whether ``items`` are better run on the event loop than on a worker thread.

        A worker thread costs a hop there and back, and takes turns at the GIL
        with zarr's loop, which meanwhile prepares the next chunks. For short
        calls (small values, a local catalog) the loop's own thread is faster;
        long ones (large values, a database over a network) would keep zarr's
        other I/O waiting.
        """
        return False

    def _take(self, queue: list[Any]) -> list[Any]:
        """The next group, from the front of ``queue`` (under the lock): all of it."""
        return queue[:]

    def _run(self, items: list[Any]) -> list[_Outcome]:
        """The outcome of each of ``items``, in order (in a worker thread)."""
        raise NotImplementedError


class _Outcome(NamedTuple):
    """What one call of a :class:`_Group` returns to its caller, or raises there."""

    result: Any
    error: BaseException | None = None


def _nbytes(data: _Bytes | None) -> int:
    """The size of a write's value (0: a delete)."""
    return 0 if data is None else memoryview(data).nbytes


T = TypeVar("T")


async def _in_thread(func: Callable[..., T], /, *args: Any) -> T:
    """``func(*args)`` on a worker thread, in a context of its own.

    Not :func:`asyncio.to_thread`, which copies the caller's context: zarr's
    sync API hands its calls to its I/O thread with the calling thread's, and
    a ``backend.transaction()`` open there would then be joined from another
    thread -- by some of the store's calls, while group commits
    (:class:`_Group`) never join it. No call sent to a worker thread does.
    """
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, partial(contextvars.Context().run, func, *args))


def _attempt(call: Callable[[], Any]) -> _Outcome:
    try:
        return _Outcome(call())
    except BaseException as exc:  # noqa: BLE001 -- handed to the caller, raised there
        return _Outcome(None, exc)


def _settle(done: asyncio.Future[Any], outcome: _Outcome) -> None:
    if done.cancelled():
        return
    if outcome.error is None:
        done.set_result(outcome.result)
    else:
        done.set_exception(outcome.error)


class _GroupCommit(_Group):
    """Writes (``(key, bytes or None to delete)``) applied together, in one commit.

    Each ``set`` still returns only once its write is committed. When a group
    fails, its writes are applied again one by one, so each caller gets its
    own outcome, not a neighbour's.
    """

    def __init__(
        self, apply: Callable[[dict[str, _Bytes | None]], None], catalog: _Catalog
    ) -> None:
        super().__init__()
        self._apply = apply
        self._catalog = catalog

    def _here(self, items: list[tuple[str, _Bytes | None]]) -> bool:
        """Small writes to a local catalog, kept in it: on the loop (:meth:`_Group._here`).

        10,000 chunks of 4 KiB written through zarr on SQLite: 10.4 s
        committed from a worker thread (in groups of 6 on average), 5.2 s from
        zarr's loop (in groups of 10: zarr prepares no chunk while a group
        commits, so all ten it keeps in flight are queued by then).
        """
        catalog = self._catalog
        if not catalog.local or catalog.writer_busy:
            return False  # (busy: another thread's write; waiting for it would hold the loop)
        inline = catalog.inline_up_to
        total = 0
        for _, data in items:
            size = _nbytes(data)
            if size > inline:
                return False
            total += size
        return total <= GROUP_UNDER

    def _run(self, items: list[tuple[str, _Bytes | None]]) -> list[_Outcome]:
        try:
            self._apply(dict(items))
        except BaseException:  # noqa: BLE001 -- then each write on its own
            return [_attempt(partial(self._apply, {key: data})) for key, data in items]
        return [_Outcome(None)] * len(items)

    def _take(self, queue: list[Any]) -> list[Any]:
        """The next group: the whole queue, or half of zarr's writes in flight
        when they are large.

        zarr keeps ``async.concurrency`` writes in flight (ten by default) and
        starts the next one only when one returns. Committed together, ten
        large chunks all return at once, and this thread then waits while zarr
        prepares ten more (copying each out of the caller's array: about 0.1 s
        per 160 MiB here). In groups of half that many, one group is hashed,
        written and fsynced while zarr prepares the chunks that replace the
        other (1 GiB in 16 MiB chunks, fsynced, on a busy 2-core machine:
        medians 2.5-2.8 s -> 1.7-2.4 s in four interleaved runs). Small writes
        still share one commit: a commit costs more than they do.
        """
        taken = len(queue)
        if taken > 1:
            size = sum(_nbytes(data) for (_, data), _, _ in queue)
            if size > SPLIT_OVER:
                in_flight = zarr_config.get("async.concurrency") or 10
                taken = min(taken, max(1, (in_flight + 1) // 2))
        return queue[:taken]


class _GroupRead(_Group):
    """Whole reads of keys, read together: one ``load_batch`` on an SQL catalog.

    10,000 chunks of 4 KiB read back through zarr, on SQLite, in one run:
    2.06 s with a thread hop each, 1.66 s in groups (of 6 on average: zarr
    keeps 10 reads in flight), against 1.78 s from ``LocalStore`` and 1.23 s
    from ``MemoryStore`` (zarr's own cost). Read in zarr's event loop itself,
    without a worker thread, they took 1.39 s: the worker and the loop take
    turns at the GIL. But a read can be long (a large chunk, a remote
    database), and it must not stop zarr's other I/O. Once the values read
    are known to be small and the catalog local (:meth:`here`), each read is
    made on the loop as zarr asks for it, with no group at all.

    Large values are better read each on a worker thread of its own, several
    at once (1 GiB in 16 MiB chunks: 0.71 s, against 1.21 s in groups), so
    :attr:`large` says whether the last chunk read was over
    :data:`GROUP_UNDER` bytes, and the store then reads alone (:meth:`saw`).
    """

    def __init__(
        self,
        load: Callable[[str], bytes | None],
        load_many: Callable[[list[str]], list[bytes]],
        catalog: _Catalog,
    ) -> None:
        super().__init__()
        self._load = load
        self._load_many = load_many
        self._catalog = catalog

    @property
    def large(self) -> bool:
        """Whether the values last read were large: read them each alone."""
        return bool(self._catalog.large_values)

    def _here(self, items: list[str]) -> bool:
        """Reads of values known to be small from a local catalog: on the loop
        (:meth:`_Group._here`). Until a chunk is read, its size is unknown: the
        first group goes to a worker thread."""
        return self.here()

    def here(self) -> bool:
        """Whether the values read so far were small, from a local catalog: then
        :meth:`PolystoreStore.get` reads each on zarr's loop, as it is asked,
        and only what queued before goes in a group."""
        return self._catalog.large_values is False and self._catalog.local

    @property
    def busy(self) -> bool:
        """Whether a group is being read: a read then joins the queue, so that
        reads never run on two threads at once (an in-memory catalog is one
        connection)."""
        return self._busy

    def _run(self, items: list[str]) -> list[_Outcome]:
        values = None
        if len(items) > 1:
            with suppress(Exception):  # (a missing key, say: then one by one)
                values = self._load_many(items)
        outcomes = (
            [_attempt(partial(self._load, key)) for key in items]
            if values is None
            else [_Outcome(value) for value in values]
        )
        for key, outcome in zip(items, outcomes, strict=True):
            self.saw(key, outcome.result)
        return outcomes

    def saw(self, key: str, value: bytes | None) -> None:
        """Note the size of the value of ``key`` just read.

        Metadata documents do not count: they are small whatever the chunks are.
        """
        if value is not None and not key.endswith(METADATA_KEY):
            self._catalog.large_values = len(value) > GROUP_UNDER


def _buffer(data: bytes | None, prototype: BufferPrototype | None) -> Buffer | None:
    """``data`` as a zarr buffer of ``prototype`` (zarr's default CPU buffer if None)."""
    if data is None:
        return None
    return (prototype or default_buffer_prototype()).buffer.from_bytes(data)


def _check_byte_range(byte_range: ByteRequest | None) -> None:
    if byte_range is None:
        return
    if isinstance(byte_range, RangeByteRequest):
        if not 0 <= byte_range.start <= byte_range.end:
            raise ValueError(f"a byte range needs 0 <= start <= end, got {byte_range}")
    elif isinstance(byte_range, OffsetByteRequest):
        if byte_range.offset < 0:
            raise ValueError(f"a byte offset cannot be negative, got {byte_range}")
    elif isinstance(byte_range, SuffixByteRequest):
        if byte_range.suffix < 0:
            raise ValueError(f"a byte suffix cannot be negative, got {byte_range}")
    else:
        raise TypeError(f"Unexpected byte_range, got {byte_range}.")


def _cut(data: bytes, byte_range: ByteRequest | None) -> bytes:
    """``byte_range`` of content already in memory."""
    if byte_range is None:
        return data
    if isinstance(byte_range, RangeByteRequest):
        return data[byte_range.start : byte_range.end]
    if isinstance(byte_range, OffsetByteRequest):
        return data[byte_range.offset :]
    assert isinstance(byte_range, SuffixByteRequest)
    return data[len(data) - min(byte_range.suffix, len(data)) :]


def _metadata_attrs(key: str, data: _Bytes) -> dict[str, Any] | None:
    """The document of a ``zarr.json`` whose bytes are a JSON object the catalog can keep."""
    if key != METADATA_KEY and not key.endswith("/" + METADATA_KEY):
        return None
    try:
        document = json.loads(bytes(data))
        return check_attrs(document) if isinstance(document, dict) else None
    except (ValueError, SerializationError):  # (UnicodeDecodeError is a ValueError)
        return None


def _as_bytes(value: Any, path: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise SerializationError(
        f"{path!r} holds a {type(value).__name__}, not bytes: it was not written by a zarr store"
    )


class PolystoreStore(Store):
    """A zarr v3 store whose keys are files under ``path`` in a polystore backend.

    ``backend`` is a :class:`~polystore.backends.base.StorageBackend` instance
    or a database URL (an :class:`~polystore.SQLBackend` for it is opened on
    first use, and closed by :meth:`close`). Two stores are equal when their
    backend URL (or, for a backend without one, the backend itself), ``path``
    and ``read_only`` are.

    The class is long because it is zarr's whole ``Store`` interface (about
    twenty-five methods, the synchronous ones included) over one set of
    private helpers; its state lives in the small classes beside it (the
    catalog it opens, the writes of a transaction, their group commit).

    >>> import zarr
    >>> store = PolystoreStore("sqlite:///catalog.db", "experiments/run1")  # doctest: +SKIP
    >>> zarr.create_array(store, shape=(100,), chunks=(10,), dtype="f4")  # doctest: +SKIP
    """

    supports_writes: bool = True
    supports_deletes: bool = True
    supports_listing: bool = True

    _catalog: _Catalog
    _pending: _Pending
    _commits: _GroupCommit
    _reads: _GroupRead

    def __init__(
        self, backend: StorageBackend | str, path: str = "", *, read_only: bool = False
    ) -> None:
        super().__init__(read_only=read_only)
        if isinstance(backend, str):
            self._catalog = _Catalog(url=backend)
        elif isinstance(backend, StorageBackend):
            self._catalog = _Catalog(backend)
        else:
            raise TypeError(
                f"backend must be a StorageBackend or a database URL, not {type(backend).__name__}"
            )
        #: The directory of the backend that holds the keys ("" for its root).
        self.path = paths.normalize(path)
        self._pending = _Pending()
        self._groups()

    @classmethod
    def _over(cls, catalog: _Catalog, pending: _Pending, path: str, read_only: bool) -> Self:
        store = cls.__new__(cls)
        Store.__init__(store, read_only=read_only)
        store._catalog = catalog
        store._pending = pending
        store.path = path
        store._groups()
        return store

    def _groups(self) -> None:
        self._commits = _GroupCommit(self._apply, self._catalog)
        self._reads = _GroupRead(
            partial(self._load, byte_range=None), self._load_many, self._catalog
        )

    @property
    def backend(self) -> StorageBackend:
        """The backend the keys live in (opened now if the store was given a URL)."""
        return self._catalog.backend

    def with_read_only(self, read_only: bool = False) -> Self:
        # docstring inherited; the copy shares the backend and any open transaction()
        return self._over(self._catalog, self._pending, self.path, read_only)

    async def _open(self) -> None:
        await _in_thread(lambda: self._catalog.backend)
        await super()._open()

    def close(self) -> None:
        # docstring inherited; a catalog the store opened from a URL is closed too
        super().close()
        self._catalog.close()

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, PolystoreStore)
            and self._catalog.identity() == other._catalog.identity()
            and self.path == other.path
            and self.read_only == other.read_only
        )

    def __hash__(self) -> int:
        return hash((self._catalog.identity(), self.path, self.read_only))

    def __repr__(self) -> str:
        read_only = ", read_only=True" if self.read_only else ""
        return f"{type(self).__name__}({self._catalog.describe()!r}, path={self.path!r}{read_only})"

    def __reduce__(self) -> tuple[Any, ...]:
        if self._pending.active:
            raise TypeError(
                "a PolystoreStore cannot be pickled inside its transaction(): writes from "
                "another process could not join it"
            )
        config = self._catalog.config()
        if isinstance(config, tuple):
            return _reopen, (*config, self.path, self.read_only)
        return type(self), (config, self.path), {"_read_only": self.read_only}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __copy__(self) -> Self:
        # A copy in this process shares the catalog: no second connection pool.
        return self._over(self._catalog, self._pending, self.path, self.read_only)

    def __deepcopy__(self, memo: dict[int, Any]) -> Self:
        return self.__copy__()

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        # What makes two stores equal, without dask's pickle round trip.
        return (type(self).__name__, self._catalog.identity(), self.path, self.read_only)

    # -- keys and paths --------------------------------------------------------------

    def _file(self, key: str) -> str:
        """The backend path of key ``key`` (InvalidPathError for a key no path can hold)."""
        return paths.normalize_file(paths.join(self.path, key))

    def _dir(self, prefix: str) -> str:
        """The backend directory of a key prefix that ends at a ``/`` (or is empty)."""
        return paths.normalize(paths.join(self.path, prefix.rstrip("/")))

    def _key(self, file_path: str) -> str:
        return file_path[len(self.path) + 1 :] if self.path else file_path

    # -- work on the backend (blocking; run in a worker thread by the async API) --------

    def _load(self, key: str, byte_range: ByteRequest | None) -> bytes | None:
        if not key.strip("/"):
            return None  # the store's own directory
        path = self._file(key)
        backend = self.backend
        try:
            if byte_range is None or not self._catalog.is_sql:
                return _cut(_as_bytes(backend.load(path), path), byte_range)
            from polystore.backends.sql import SQLBackend

            sql = cast(SQLBackend, backend)
            if isinstance(byte_range, RangeByteRequest):
                return sql.read_range(path, byte_range.start, byte_range.end, serializer="bytes")
            if isinstance(byte_range, OffsetByteRequest):
                return sql.read_range(path, byte_range.offset, serializer="bytes")
            assert isinstance(byte_range, SuffixByteRequest)
            return sql.read_suffix(path, byte_range.suffix, serializer="bytes")
        except _MISSING:
            return None

    def _load_many(self, keys: list[str]) -> list[bytes]:
        """Whole values of ``keys``, in order, by one ``load_batch`` (an SQL catalog).

        Raises whatever one of the keys raises (a missing key, say): the
        caller then reads each alone.
        """
        files = [self._file(key) for key in keys]
        return [_as_bytes(v, f) for v, f in zip(self.backend.load_batch(files), files, strict=True)]

    def _size(self, key: str) -> int:
        backend = self.backend
        path = self._file(key)
        if self._catalog.is_sql:
            stat = backend.stat(path)
            if stat.kind != "file" or stat.size is None:
                raise NotFoundError(f"no key {key!r} in {self!r}: it is a directory")
            return stat.size
        return len(_as_bytes(backend.load(path), path))

    def _exists(self, key: str) -> bool:
        return bool(key.strip("/")) and self.backend.is_file(self._file(key))

    def _atomically(self) -> AbstractContextManager[Any]:
        backend = self.backend
        return backend.transaction() if backend.supports_transactions else nullcontext()

    def _apply(self, writes: Mapping[str, _Bytes | None], cleared: Iterable[str] = ()) -> None:
        """Clear ``cleared``, then write and delete ``writes``, in one backend transaction."""
        backend = self.backend
        saves: list[tuple[str, _Bytes]] = []
        documents: list[tuple[str, _Bytes, dict[str, Any]]] = []
        deletes: list[str] = []
        for key, value in writes.items():
            path = self._file(key)
            if value is None:
                deletes.append(path)
                continue
            attrs = _metadata_attrs(key, value) if self._catalog.takes_options else None
            if attrs is None:
                saves.append((path, value))
            else:
                documents.append((path, value, attrs))
        # One operation is a transaction already: a chunk at a time, as zarr
        # writes, skips the BEGIN, SAVEPOINT and RELEASE a wrapper would add.
        clears = list(cleared)
        operations = 2 * len(clears) + len(deletes) + bool(saves) + len(documents)
        atomically = self._atomically() if operations > 1 else nullcontext()
        with self._catalog.writing(), atomically:
            for prefix in clears:
                self._clear(prefix)
            for path in deletes:
                self._remove(path)
            if saves:
                backend.save_batch([value for _, value in saves], [path for path, _ in saves])
            for path, value, attrs in documents:
                backend.save(value, path, attrs=attrs)

    def _save_new(self, key: str, value: _Bytes) -> None:
        """Save ``key`` unless it exists (atomically on the built-in catalogs)."""
        path = self._file(key)
        backend = self.backend
        if not self._catalog.takes_options:
            if not backend.exists(path):
                backend.save(value, path)
            return
        attrs = _metadata_attrs(key, value)
        with self._catalog.writing(), suppress(AlreadyExistsError):
            backend.save(value, path, overwrite=False, attrs=attrs)

    def _remove(self, path: str) -> None:
        with suppress(FileNotFoundError):
            self.backend.delete(path, recursive=True)

    def _clear(self, prefix: str) -> None:
        """Delete every key under ``prefix`` (``""``: every key of the store)."""
        backend = self.backend
        directory = self._dir(prefix)
        if directory == paths.ROOT:  # the backend's root itself cannot go
            for name in self._names(directory):
                self._remove(name)
        elif backend.is_dir(directory):
            self._remove(directory)

    def _names(self, directory: str) -> list[str]:
        try:
            return self.backend.list_dir(directory)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _files_under(self, directory: str) -> list[str]:
        """Keys of every file under backend ``directory``, at any depth."""
        try:
            found = self.backend.list_files(directory, recursive=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [self._key(path) for path in found]

    def _keys(self, prefix: str) -> list[str]:
        """Keys that start with ``prefix``, as reads through the store see them."""
        directory = self._dir(prefix.rpartition("/")[0])
        keys = [k for k in self._files_under(directory) if k.startswith(prefix)]
        if self._pending.active:
            keys = [k for k in keys if self._pending.visible(k)]
            keys += sorted(k for k in self._pending.written() - set(keys) if k.startswith(prefix))
        return keys

    def _children(self, prefix: str) -> list[str]:
        """Names directly under ``prefix``: keys and the first part of longer keys."""
        if not self._pending.active:
            return self._names(self._dir(prefix))
        start = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
        return sorted({key[len(start) :].split("/")[0] for key in self._keys(start)})

    def _has_keys(self, directory: str) -> bool:
        """Whether a file lies under backend ``directory``, stopping at the first found."""
        backend = self.backend
        try:
            files = backend.list_files(directory)
            if files:
                return True
            names = backend.list_dir(directory)
        except (FileNotFoundError, NotADirectoryError):
            return False
        seen = {paths.split(path)[1] for path in files}
        return any(self._has_keys(paths.join(directory, n)) for n in names if n not in seen)

    # -- transactions ------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[Self]:
        """Group every write through this store: all are applied at the end, or none.

        Writes and deletes made during the block -- by zarr's I/O thread or any
        other -- are kept in memory, and reads through the store (and its
        :meth:`with_read_only` copies) see them. When the block ends they are
        applied in one transaction of the backend, on the thread that leaves
        the block; an exception inside the block discards them. Blocks nest:
        an inner block that raises discards only its own writes.

        Needs a backend with transactions (``supports_transactions``), else
        :class:`~polystore.errors.UnsupportedOperationError`. Content is held in
        memory until the end, so size a block to what memory can hold.
        """
        if not self.backend.supports_transactions:
            raise UnsupportedOperationError(
                f"{type(self.backend).__name__} has no transactions, so a store over it "
                "cannot apply writes all or nothing"
            )
        pending = self._pending
        pending.push()
        try:
            yield self
        except BaseException:
            pending.pop()
            raise
        with pending.lock:
            if pending.depth > 1:
                inner = pending.pop()
                pending.top().absorb(inner)
                return
            # The outermost block: apply while holding the lock, so a write
            # arriving meanwhile waits for the commit instead of being lost.
            try:
                layer = pending.top()
                self._apply(layer.writes, sorted(layer.cleared))
            finally:
                pending.pop()

    # -- reading -------------------------------------------------------------------------

    async def get(
        self,
        key: str,
        prototype: BufferPrototype | None = None,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        # docstring inherited
        decided, data = self._decided(key, byte_range)
        if not decided:
            self._catalog.check_not_joined(write=False)
            reads = self._reads
            if byte_range is None and self._catalog.reads_in_groups and not reads.large:
                if reads.here() and not reads.busy:
                    # A few µs on zarr's loop, without a wait: a group's futures
                    # and wake-ups cost each read more than its own load (10,000
                    # reads of 4 KiB: 0.83 s -> 0.78 s). In a context of its own,
                    # like a group's (:meth:`_Group._start`).
                    data = contextvars.Context().run(self._load, key, None)
                    reads.saw(key, data)
                else:
                    data = await reads.submit(key)
            else:
                data = await _in_thread(self._load, key, byte_range)
                if byte_range is None:
                    reads.saw(key, data)
        return _buffer(data, prototype)

    def get_sync(
        self,
        key: str,
        *,
        prototype: BufferPrototype | None = None,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        """:meth:`get`, in the calling thread (zarr's synchronous read protocol)."""
        decided, data = self._decided(key, byte_range)
        if not decided:
            data = self._load(key, byte_range)
        return _buffer(data, prototype)

    def _decided(self, key: str, byte_range: ByteRequest | None) -> tuple[bool, bytes | None]:
        """``(True, bytes or None)`` for a key an open :meth:`transaction` wrote or
        deleted; ``(False, None)`` for one the backend must be asked about."""
        _check_byte_range(byte_range)
        decided, value = self._pending.lookup(key)
        if not decided or value is None:
            return decided, None
        return True, _cut(value, byte_range)

    async def get_partial_values(
        self,
        prototype: BufferPrototype,
        key_ranges: Iterable[tuple[str, ByteRequest | None]],
    ) -> list[Buffer | None]:
        # docstring inherited
        async def get_one(key: str, byte_range: ByteRequest | None) -> Buffer | None:
            return await self.get(key, prototype, byte_range)

        return await concurrent_map(list(key_ranges), get_one, limit=None)

    async def _read(self, func: Callable[..., T], /, *args: Any) -> T:
        """``func(*args)``, a read of the backend, on a worker thread (see :func:`_in_thread`)."""
        self._catalog.check_not_joined(write=False)
        return await _in_thread(func, *args)

    async def exists(self, key: str) -> bool:
        # docstring inherited
        decided, value = self._pending.lookup(key)
        if decided:
            return value is not None
        return await self._read(self._exists, key)

    async def getsize(self, key: str) -> int:
        # docstring inherited
        decided, value = self._pending.lookup(key)
        if decided:
            if value is None:
                raise NotFoundError(f"no key {key!r} in {self!r}")
            return len(value)
        return await self._read(self._size, key)

    async def is_empty(self, prefix: str) -> bool:
        # docstring inherited: the catalog's directories answer without listing every key
        if self._pending.active:
            return await super().is_empty(prefix)
        return not await self._read(self._has_keys, self._dir(prefix))

    # -- writing -------------------------------------------------------------------------

    def _data(self, value: Buffer) -> _Bytes:
        """The bytes of ``value``: a view of them for an SQL catalog, a copy for others.

        An SQL catalog's save copies content out once (into its row, or to its
        blob store) and holds nothing after it, and every write returns only
        once saved (or copied by an open :meth:`transaction`), so a view is
        enough -- and a 16 MiB chunk is not copied once more for nothing (a
        third of a second per GiB here, on the thread zarr prepares chunks
        on). Other backends may keep the value they are given (memory's
        ``deepcopy`` cannot copy a view), so they get ``bytes``.
        """
        self._check_writable()
        if not isinstance(value, Buffer):
            raise TypeError(
                f"PolystoreStore.set(): `value` must be a Buffer instance, not {type(value)}"
            )
        if not self._catalog.is_sql:
            return value.to_bytes()
        return byte_view(value.as_numpy_array())

    async def _write(self, func: Callable[..., T], /, *args: Any) -> T:
        """``func(*args)``, a write to the backend, on a worker thread (see :func:`_in_thread`)."""
        self._catalog.check_not_joined()
        return await _in_thread(func, *args)

    async def set(self, key: str, value: Buffer) -> None:
        # docstring inherited
        data = self._data(value)
        self._file(key)  # a bad key fails now, not when a transaction ends
        if not self._pending.write(key, data):
            self._catalog.check_not_joined()
            await self._commits.submit((key, data))

    def set_sync(self, key: str, value: Buffer) -> None:
        """:meth:`set`, in the calling thread (zarr's synchronous write protocol)."""
        data = self._data(value)
        self._file(key)
        if not self._pending.write(key, data):
            self._apply({key: data})

    async def _set_many(self, values: Iterable[tuple[str, Buffer]]) -> None:
        # docstring inherited: one batch, in one backend transaction
        writes: dict[str, _Bytes | None] = {}
        for key, value in values:
            self._file(key)
            writes[key] = self._data(value)
        with self._pending.lock:
            if self._pending.active:
                for key, data in writes.items():
                    self._pending.write(key, data)
                return
        await self._write(self._apply, writes)

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        # docstring inherited: atomic on the built-in catalogs (overwrite=False)
        data = self._data(value)
        self._file(key)
        with self._pending.lock:
            if self._pending.active:
                decided, current = self._pending.lookup(key)
                if decided:
                    if current is None:
                        self._pending.write(key, data)
                    return
                # In the caller's context: the write is applied by the thread
                # that leaves the block, in a transaction of the caller's if one
                # is open there, and must not replace what that one wrote.
                if not self._exists(key):
                    self._pending.write(key, data)
                return
        await self._write(self._save_new, key, data)

    async def delete(self, key: str) -> None:
        # docstring inherited; deleting a key that names a directory deletes it all
        self._check_writable()
        if not self._pending.write(key, None):
            self._catalog.check_not_joined()
            await self._commits.submit((key, None))

    def delete_sync(self, key: str) -> None:
        """:meth:`delete`, in the calling thread (zarr's synchronous delete protocol)."""
        self._check_writable()
        if not self._pending.write(key, None):
            self._apply({key: None})

    async def delete_dir(self, prefix: str) -> None:
        # docstring inherited
        self._check_writable()
        prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
        if not self._pending.clear(prefix):
            await self._write(self._apply, {}, [prefix])

    async def clear(self) -> None:
        # docstring inherited
        await self.delete_dir("")

    # -- listing -------------------------------------------------------------------------

    async def list(self) -> AsyncIterator[str]:
        # docstring inherited
        for key in await self._read(self._keys, ""):
            yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        # docstring inherited
        for key in await self._read(self._keys, prefix):
            yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        # docstring inherited
        for name in await self._read(self._children, prefix):
            yield name
