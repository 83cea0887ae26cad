"""Lazy arrays: a stored numpy array, sliced without reading the rest of it.

``backend.open_array(path)`` returns a :class:`LazyArray`: the array's shape and
dtype, read from the catalog (or the file's header) when it is opened, and
nothing else. Indexing it (``x[10:20, ::2]``, integers, ``...``, ``None``)
reads only the byte ranges the selection covers and returns a new, writeable
``numpy.ndarray``; ``numpy.asarray(x)`` reads it all.

How a selection becomes reads (C order; a Fortran-ordered array is the C-ordered
array of the reversed shape, transposed):

* The trailing axes the selection takes whole form one contiguous block per
  element of the last axis it does not take whole (axis ``k``). Each
  combination of the selected indices of the axes before ``k`` is one *run*
  of contiguous bytes: the selected span of axis ``k`` times that block.
* A step on axis ``k`` whose gaps are small (:data:`GAP_BYTES`) is read as part
  of the span and dropped afterwards; with large gaps, each selected element of
  axis ``k`` is a run of its own.
* Runs closer than :data:`GAP_BYTES` are fetched together, in requests of at
  most :data:`REQUEST_BYTES` (beyond one run's size), so a selection of a
  million tiny runs costs a few hundred requests, and memory stays near one
  request plus the result.

Where the bytes come from is a :class:`ByteSource`: the SQL backend reads the
blob the file named *when it was opened* (by its content hash: a later
overwrite of the path does not change what the lazy array reads), the disk
backend the ``.npy`` file it opened, the memory backend the array it holds.
A lazy array pickles as its backend does -- by configuration -- so dask's
processes scheduler can send it to a worker, which reopens the catalog.

Ranged reads are size-checked, not hashed: a part cannot be checked against
the hash of the whole (:mod:`polystore.backends.sql.ranges`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from polystore.errors import SerializationError

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "GAP_BYTES",
    "REQUEST_BYTES",
    "BufferSource",
    "ByteSource",
    "LazyArray",
    "array_layout",
]

#: Runs of a selection closer than this are read together (the bytes between
#: them read and dropped) rather than as separate requests.
GAP_BYTES = 64 * 1024
#: Runs are read in requests of at most this many bytes (or one run, if larger).
REQUEST_BYTES = 8 * 1024 * 1024


class ByteSource(Protocol):
    """Where a lazy array's raw bytes are: byte ranges of one immutable content."""

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[Any]:
        """The bytes of each ``(start, stop)`` range, as buffers, each exactly that long."""
        ...


class BufferSource:
    """Bytes already in memory (a :class:`~polystore.MemoryBackend`'s array).

    Pickles as ``owner`` does: a ``MemoryBackend`` refuses, with a ``TypeError``
    that says why.
    """

    __slots__ = ("buffer", "owner")

    def __init__(self, owner: Any, buffer: Any) -> None:
        self.owner = owner
        self.buffer = memoryview(buffer).cast("B").toreadonly()  # results are copies

    def __reduce__(self) -> tuple[Any, ...]:
        self.owner.__reduce_ex__(2)  # a MemoryBackend refuses here, before any copy
        return (BufferSource, (self.owner, bytes(self.buffer)))

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[Any]:
        return [self.buffer[start:stop] for start, stop in ranges]


def array_layout(path: str, serializer: str | None, meta: Any) -> tuple[Any, tuple[int, ...], str]:
    """``(dtype, shape, order)`` of a file saved by the ``ndarray`` serializer.

    Raises :class:`~polystore.errors.SerializationError` for anything else: a
    lazy array reads the array's raw bytes, which only that serializer writes.
    """
    from polystore.serializers import _layout

    if serializer != "ndarray" or not isinstance(meta, dict) or "descr" not in meta:
        raise SerializationError(
            f"{path!r} is not a numpy array (saved by serializer {serializer!r}); "
            "open_array() reads arrays only: load() it instead"
        )
    dtype, shape, _count, order, _scalar = _layout(meta)
    return dtype, shape, order


class LazyArray:
    """A read-only, sliceable view of a stored numpy array that reads on demand.

    Has ``shape``, ``dtype``, ``ndim``, ``size``, ``nbytes``, ``len()``;
    ``x[key]`` with basic indexing and ``numpy.asarray(x)`` return new
    ``numpy.ndarray`` objects. Works as ``dask.array.from_array(x, chunks=...)``.
    """

    __slots__ = ("_order", "_source", "dtype", "path", "shape")

    def __init__(
        self, source: ByteSource, path: str, dtype: Any, shape: tuple[int, ...], order: str = "C"
    ) -> None:
        self._source = source
        self._order = order
        #: The catalog path the array was opened from.
        self.path = path
        self.dtype = dtype
        self.shape = tuple(shape)

    # -- what numpy and dask look at ----------------------------------------------

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * int(self.dtype.itemsize)

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of unsized object")
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyArray({self.path!r}, shape={self.shape}, dtype={self.dtype})"

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype, copy=False)

    def __reduce__(self) -> tuple[Any, ...]:
        # The source pickles by its backend's configuration (or refuses, as a
        # MemoryBackend does).
        return (LazyArray, (self._source, self.path, self.dtype, self.shape, self._order))

    # -- reading ---------------------------------------------------------------

    def __getitem__(self, key: Any) -> np.ndarray:
        import numpy as np

        selections, post = _normalize(key, self.shape)
        if self._order == "F" and self.ndim > 1:
            # The bytes are the C-ordered array of the reversed shape.
            out = _read_c(self._source, self.dtype, self.shape[::-1], selections[::-1]).T
        else:
            out = _read_c(self._source, self.dtype, self.shape, selections)
        return np.ascontiguousarray(out[post]) if post else out


# -- selections ---------------------------------------------------------------------

# One axis's selection: ``(range over the axis in ascending order, reversed, keep)``:
# ``keep`` is False for an integer index (the axis is dropped from the result).
_Axis = tuple[range, bool, bool]


def _normalize(key: Any, shape: tuple[int, ...]) -> tuple[list[_Axis], tuple[Any, ...]]:
    """Per-axis selections, and what to apply to their result (``()`` when nothing).

    The result of the selections has one axis per kept input axis, each in
    ascending order; ``post`` reverses the axes a negative step selected and
    inserts the ``None`` axes.
    """
    items = key if isinstance(key, tuple) else (key,)
    if sum(item is Ellipsis for item in items) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    explicit = sum(item is not None and item is not Ellipsis for item in items)
    if explicit > len(shape):
        raise IndexError(
            f"too many indices for array: array is {len(shape)}-dimensional, "
            f"but {explicit} were indexed"
        )
    if not any(item is Ellipsis for item in items):  # (``in`` would compare arrays)
        items = (*items, Ellipsis)
    selections: list[_Axis] = []
    post: list[Any] = []
    special = False
    for item in items:
        if item is Ellipsis:
            for _ in range(len(shape) - explicit):
                selections.append((range(shape[len(selections)]), False, True))
                post.append(slice(None))
        elif item is None:
            post.append(None)
            special = True
        elif isinstance(item, slice):
            r = range(shape[len(selections)])[item]
            backwards = r.step < 0
            selections.append((r[::-1] if backwards else r, backwards, True))
            post.append(slice(None, None, -1) if backwards else slice(None))
            special = special or backwards
        else:
            selections.append(
                (_integer(item, shape[len(selections)], len(selections)), False, False)
            )
    return selections, (tuple(post) if special else ())


def _integer(item: Any, dim: int, axis: int) -> range:
    try:
        if isinstance(item, bool) or getattr(item, "ndim", 0) != 0:
            raise TypeError
        i = operator.index(item)
    except TypeError:
        raise IndexError(
            f"open_array() supports basic indexing (integers, slices, '...', None), "
            f"not {type(item).__name__}; load() the array for fancy indexing"
        ) from None
    if not -dim <= i < dim:
        raise IndexError(f"index {i} is out of bounds for axis {axis} with size {dim}")
    i %= dim
    return range(i, i + 1)


# -- reads --------------------------------------------------------------------------


def _read_c(
    source: ByteSource, dtype: Any, shape: tuple[int, ...], selections: list[_Axis]
) -> np.ndarray:
    """The selection of a C-ordered array, every kept axis ascending."""
    import numpy as np

    kept = tuple(len(r) for r, _, keep in selections if keep)
    if any(len(r) == 0 for r, _, _ in selections):
        return np.empty(kept, dtype)
    itemsize = dtype.itemsize
    # k: the last axis not taken whole; the axes after it are read whole.
    k = max((i for i, (r, _, _) in enumerate(selections) if r != range(shape[i])), default=-1)
    inner = itemsize * math.prod(shape[k + 1 :])
    # Integer-indexed axes dropped; the trailing ``...`` keeps a 0-d result an
    # array (``a[0, 0]`` of a 2-d array would be a scalar).
    drop = (*(slice(None) if keep else 0 for _, _, keep in selections), ...)
    if k < 0:  # the whole array: one run (an integer index here is on an axis of 1)
        return _assemble(source, np.zeros(1, np.int64), inner, dtype).reshape(shape)[drop]
    strides = [inner // itemsize]
    for d in reversed(shape[1 : k + 1]):
        strides.insert(0, strides[0] * d)
    rk = selections[k][0]
    split = rk.step > 1 and (rk.step - 1) * inner > GAP_BYTES
    outer_axes = k + 1 if split else k
    # The element offset where each run starts, in ascending (C) order.
    offsets = np.zeros(1, np.int64)
    for axis in range(outer_axes):
        r = np.arange(selections[axis][0].start, selections[axis][0].stop, selections[axis][0].step)
        offsets = np.add.outer(offsets, r * strides[axis]).ravel()
    if split:
        run_shape: tuple[int, ...] = ()
        step = 1
    else:
        offsets += rk.start * strides[k]
        run_shape = (rk[-1] - rk.start + 1,)
        step = rk.step
    run_bytes = inner * (run_shape[0] if run_shape else 1)
    flat = _assemble(source, offsets * itemsize, run_bytes, dtype)
    counts = [len(selections[axis][0]) for axis in range(outer_axes)]
    out = flat.reshape(*counts, *run_shape, *shape[k + 1 :])
    if step > 1:
        out = out[(slice(None),) * outer_axes + (slice(None, None, step),)]
    out = out[drop]
    return out if out.flags.c_contiguous else np.ascontiguousarray(out)


def _assemble(source: ByteSource, starts: np.ndarray, run_bytes: int, dtype: Any) -> np.ndarray:
    """Runs of ``run_bytes`` at byte offsets ``starts`` (ascending), concatenated."""
    import numpy as np

    n = len(starts)
    if run_bytes == 0:
        return np.empty(0, dtype)
    requests = _requests(starts, run_bytes)
    buffers = source.read_ranges(
        [(int(starts[a]), int(starts[b - 1]) + run_bytes) for a, b in requests]
    )
    if n == 1:
        (buffer,) = buffers
        view = np.frombuffer(buffer, np.uint8)
        return (view if view.flags.writeable else view.copy()).view(dtype)
    out = np.empty((n, run_bytes), np.uint8)
    for (a, b), buffer in zip(requests, buffers, strict=True):
        data = np.frombuffer(buffer, np.uint8)
        local = starts[a:b] - starts[a]
        # Runs equally spaced in the buffer are one strided copy.
        breaks = np.flatnonzero(np.diff(local, 2)) + 1 if b - a > 2 else np.array([], np.int64)
        for lo, hi in zip(
            (0, *(breaks + 1).tolist()), (*(breaks + 1).tolist(), b - a), strict=True
        ):
            spacing = int(local[lo + 1] - local[lo]) if hi - lo > 1 else run_bytes
            out[a + lo : a + hi] = np.lib.stride_tricks.as_strided(
                data[int(local[lo]) :], shape=(hi - lo, run_bytes), strides=(spacing, 1)
            )
    return out.reshape(-1).view(dtype)


def _requests(starts: np.ndarray, run_bytes: int) -> list[tuple[int, int]]:
    """Group runs (by index, ``[a, b)``) into requests: close together, bounded in size."""
    import numpy as np

    n = len(starts)
    if n == 1:
        return [(0, 1)]
    gaps = starts[1:] - starts[:-1] - run_bytes
    cut = np.flatnonzero(gaps > GAP_BYTES) + 1
    groups: list[tuple[int, int]] = []
    for a, b in zip((0, *cut.tolist()), (*cut.tolist(), n), strict=True):
        # Within a group of close runs, a new request every REQUEST_BYTES.
        size = max(REQUEST_BYTES, run_bytes)
        bucket = (starts[a:b] + run_bytes - 1 - starts[a]) // size
        sub = np.flatnonzero(np.diff(bucket)) + 1 + a
        groups.extend(zip((a, *sub.tolist()), (*sub.tolist(), b), strict=True))
    return groups
