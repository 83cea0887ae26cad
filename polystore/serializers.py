"""Serializers: how a Python value becomes stored bytes plus metadata, and back.

A serializer is chosen by the value's type when saving, and by the name the
catalog recorded when loading. The built-in ones, tried in this order:

=========== ============================================ ==============================
name        values                                       stored as
=========== ============================================ ==============================
``ndarray`` numpy arrays and numpy scalars               raw bytes + dtype/shape/order
``bytes``   ``bytes``, ``bytearray``, ``memoryview``     the bytes
``str``     ``str``                                      UTF-8
``json``    dict, list, tuple, int, float, bool,         compact JSON (UTF-8)
            ``None``
``pickle``  anything picklable, only when the backend    pickle protocol 5
            was opened with ``allow_pickle=True``
=========== ============================================ ==============================

Arrays are never written with ``np.save``: the raw buffer is stored as is
(zero-copy for contiguous arrays) and the dtype, shape and memory order go into
the catalog, so reading back is one ``np.frombuffer``.

Add your own by subclassing :class:`Serializer` and registering it (the
catalog guide has a worked example)::

    registry = SerializerRegistry.default()
    registry.register(MySerializer(), first=True)
    SQLBackend(url, serializers=registry)
"""

from __future__ import annotations

import copy
import json
import pickle
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any, ClassVar, TypeVar

from polystore.errors import SerializationError

__all__ = [
    "BytesSerializer",
    "Encoded",
    "JSONSerializer",
    "NDArraySerializer",
    "PickleSerializer",
    "Serializer",
    "SerializerRegistry",
    "StrSerializer",
]

Buffer = bytes | bytearray | memoryview
_D = TypeVar("_D")  # a decoder, of one content or of a list


@dataclass(frozen=True)
class Encoded:
    """A value turned into content plus the metadata needed to read it back."""

    serializer: str
    version: int
    data: Buffer
    meta: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    shape: tuple[int, ...] | None = None

    @property
    def size(self) -> int:
        return memoryview(self.data).nbytes


def _encoded(
    serializer: str,
    version: int,
    data: Buffer,
    meta: dict[str, Any],
    dtype: str | None,
    shape: tuple[int, ...] | None,
) -> Encoded:
    """``Encoded(...)`` without the frozen dataclass's per-field ``__setattr__`` calls."""
    encoded = object.__new__(Encoded)
    encoded.__dict__.update(
        serializer=serializer, version=version, data=data, meta=meta, dtype=dtype, shape=shape
    )
    return encoded


class Serializer:
    """Base class: subclasses set ``name`` and ``version`` and implement three methods."""

    name: ClassVar[str]
    version: ClassVar[int] = 1
    #: Only used when the backend allows pickle (it can run code on load).
    unsafe: ClassVar[bool] = False

    def accepts(self, value: Any) -> bool:
        """Whether this serializer handles ``value``."""
        raise NotImplementedError

    def encode(self, value: Any) -> Encoded:
        """Turn ``value`` into an :class:`Encoded`; raise SerializationError if it cannot."""
        raise NotImplementedError

    def decode(self, data: Buffer, meta: dict[str, Any]) -> Any:
        """Turn stored content and metadata back into a value.

        ``meta`` is what ``encode`` recorded, plus ``dtype`` and ``shape`` when
        the encoded value had them.
        """
        raise NotImplementedError

    def decoder(self, meta: dict[str, Any]) -> Callable[[Buffer], Any]:
        """A function that decodes content recorded with ``meta``.

        Backends that load many files of the same metadata (arrays of one dtype
        and shape) build one decoder and reuse it. The default calls
        :meth:`decode`; override it to do the per-metadata work only once.
        """
        return partial(_decode_with, self, meta)

    def batch_decoder(self, meta: dict[str, Any]) -> Callable[[Sequence[Buffer]], list[Any]]:
        """A function that decodes a list of contents, all recorded with ``meta``.

        ``load_batch`` decodes the files of one kind in a chunk with one call.
        The default calls :meth:`decoder`'s function on each; override it where
        a whole list can be decoded at once for less.
        """
        return partial(_decode_each, self.decoder(meta))


def _decode_each(decode: Callable[[Buffer], Any], datas: Sequence[Buffer]) -> list[Any]:
    return [decode(data) for data in datas]


#: ``load_batch`` gives arrays of at most this many bytes views into a buffer
#: shared with others of their chunk (one copy for many), and keeps each such
#: buffer to at most ``SHARED_BUFFER_BYTES``: holding on to one array keeps no
#: more than that alive.
SHARED_ARRAY_BYTES = 64 * 1024
SHARED_BUFFER_BYTES = 1024 * 1024
_BYTES_TYPES = {bytes, bytearray}


class NDArraySerializer(Serializer):
    name = "ndarray"

    def accepts(self, value: Any) -> bool:
        np = _numpy_if_loaded()
        return np is not None and isinstance(value, (np.ndarray, np.generic))

    def encode(self, value: Any) -> Encoded:
        import numpy as np

        # Batches encode thousands of small arrays: every step here is kept cheap.
        if value.__class__ is np.ndarray:
            arr, scalar = value, False
        else:
            scalar = isinstance(value, np.generic)
            arr = np.asarray(value)
        dtype = arr.dtype
        if dtype.hasobject:
            raise SerializationError(
                f"numpy arrays of dtype {arr.dtype} hold Python objects and cannot be stored "
                "as raw bytes; convert them, or open the backend with allow_pickle=True "
                "and save a list instead"
            )
        order = "C"
        flags = arr.flags
        if flags.c_contiguous:
            flat = arr
        elif flags.f_contiguous:
            order, flat = "F", arr.T
        else:
            flat = np.ascontiguousarray(arr)
        data: Buffer = b""
        if flat.nbytes:
            try:
                # The bytes, in order, without a copy.
                data = memoryview(flat).cast("B")  # type: ignore[arg-type]
            except (TypeError, ValueError, NotImplementedError):
                # A uint8 view exposes the bytes of any dtype (datetime64 arrays,
                # for one, refuse the buffer protocol directly).
                data = memoryview(flat.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
        dtype_name, meta = _array_meta(dtype, order, scalar)
        return _encoded(self.name, self.version, data, meta, dtype_name, arr.shape)

    def decode(self, data: Buffer, meta: dict[str, Any]) -> Any:
        return self.decoder(meta)(data)

    def decoder(self, meta: dict[str, Any]) -> Callable[[Buffer], Any]:
        import numpy as np

        dtype, shape, count, order, scalar = _layout(meta)
        flat_shape = shape == (count,)
        nbytes = dtype.itemsize * count if _copies_bytes_into(dtype) else -1

        def decode(data: Buffer) -> Any:
            if data.__class__ is bytes and len(data) == nbytes:
                # What drivers return for small content, copied straight into
                # a new array: two thirds of the time of a view and its copy.
                arr = np.empty(count, dtype)
                arr.data.cast("B")[:] = data
            else:
                arr = np.frombuffer(data, dtype=dtype, count=count) if count else np.empty(0, dtype)
                if not arr.flags.writeable:
                    # frombuffer over bytes is read-only: one copy makes the result
                    # writeable and owns its memory (the driver's buffer can be freed).
                    arr = arr.copy()
            if not flat_shape:
                arr = arr.reshape(shape, order=order)
            return arr[()] if scalar else arr

        return decode

    def batch_decoder(self, meta: dict[str, Any]) -> Callable[[Sequence[Buffer]], list[Any]]:
        """Small arrays of a list are copied into shared buffers, not one by one.

        Each array is a writeable view of its own bytes in a buffer of up to
        :data:`SHARED_BUFFER_BYTES` that it shares with the arrays decoded
        next to it: one copy and one view per array, instead of a copy, a
        reshape and two Python calls. Scalars, 0-d, empty, Fortran-ordered
        multi-dimensional and subarray-dtype arrays, arrays over
        :data:`SHARED_ARRAY_BYTES`, and lists whose contents are not all
        exactly the recorded size are decoded one by one, by :meth:`decoder`;
        so is everything when a subclass overrides :meth:`decoder`.
        """
        import numpy as np

        decode_each = partial(_decode_each, self.decoder(meta))
        dtype, shape, count, order, scalar = _layout(meta)
        nbytes = dtype.itemsize * count
        if (
            type(self).decoder is not NDArraySerializer.decoder  # a subclass decodes its way
            or scalar
            or not shape
            or not 0 < nbytes <= SHARED_ARRAY_BYTES
            or dtype.subdtype is not None
            or (order != "C" and len(shape) > 1)
        ):
            return decode_each
        per_buffer = max(1, SHARED_BUFFER_BYTES // nbytes)
        sizes = {nbytes}

        def decode_many(datas: Sequence[Buffer]) -> list[Any]:
            # Every content exactly the recorded size, or bytes would shift
            # between arrays: len() is that size for bytes and bytearray (what
            # drivers return), a view's nbytes for anything else.
            if set(map(type, datas)) <= _BYTES_TYPES:
                if set(map(len, datas)) != sizes:
                    return decode_each(datas)
            elif {memoryview(d).nbytes for d in datas} != sizes:
                return decode_each(datas)
            out: list[Any] = []
            for start in range(0, len(datas), per_buffer):
                part = datas[start : start + per_buffer]
                buffer = bytearray().join(part)
                out.extend(np.frombuffer(buffer, dtype).reshape(len(part), *shape))
            return out

        return decode_many


def _copies_bytes_into(dtype: Any) -> bool:
    """Whether content can be copied into a new array of ``dtype`` as raw bytes.

    Not for object dtypes (the bytes would be pointers), subarray dtypes (an
    array of them takes another shape) or those Python's buffers cannot
    describe (datetimes).
    """
    import numpy as np

    if dtype.hasobject or dtype.subdtype is not None:
        return False
    try:
        np.empty(1, dtype).data.cast("B")
    except (TypeError, ValueError, NotImplementedError):
        return False
    return True


def _layout(meta: dict[str, Any]) -> tuple[Any, tuple[int, ...], int, Any, bool]:
    """``(dtype, shape, count, order, scalar)`` of an array recorded with ``meta``."""
    descr = meta["descr"]
    dtype = _dtype_of(descr) if isinstance(descr, str) else _descr_to_dtype(descr)
    shape = tuple(meta["shape"])
    count = 1
    for n in shape:
        count *= n
    return dtype, shape, count, meta.get("order", "C"), bool(meta.get("scalar"))


@lru_cache(maxsize=512)
def _array_meta(dtype: Any, order: str, scalar: bool) -> tuple[str, dict[str, Any]]:
    # Cached per dtype: batches of like arrays share one (read-only) meta dict,
    # which also lets the SQL backend serialize it to JSON once per batch.
    import numpy as np

    meta: dict[str, Any] = {"descr": np.lib.format.dtype_to_descr(dtype), "order": order}
    if scalar:
        meta["scalar"] = True
    return str(dtype), meta


@lru_cache(maxsize=512)
def _dtype_of(descr: str) -> Any:
    return _descr_to_dtype(descr)


def _descr_to_dtype(descr: Any) -> Any:
    import numpy as np

    return np.lib.format.descr_to_dtype(_tuplify(descr))


def _tuplify(descr: Any) -> Any:
    # JSON turned the tuples of a structured descr into lists; numpy wants tuples.
    if isinstance(descr, list):
        return [
            tuple(_tuplify(x) for x in item) if isinstance(item, list) else item for item in descr
        ]
    return descr


def byte_view(value: Any) -> bytes | memoryview:
    """The bytes of a buffer: a view of a C-contiguous one, else a copy in C order."""
    view = memoryview(value)
    if view.c_contiguous and view.nbytes:  # (an empty view with a 0 in its shape cannot cast)
        return view.cast("B")
    return view.tobytes()  # (copies any buffer, contiguous or not, in C order)


class BytesSerializer(Serializer):
    name = "bytes"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bytes | bytearray | memoryview)

    def encode(self, value: Any) -> Encoded:
        data = value if isinstance(value, bytes) else byte_view(value)
        return Encoded(self.name, self.version, data)

    def decode(self, data: Buffer, meta: dict[str, Any]) -> Any:
        return bytes(data)


class StrSerializer(Serializer):
    name = "str"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str)

    def encode(self, value: Any) -> Encoded:
        try:
            data = value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise SerializationError(f"str is not valid Unicode text: {exc}") from exc
        return Encoded(self.name, self.version, data)

    def decode(self, data: Buffer, meta: dict[str, Any]) -> Any:
        return bytes(data).decode("utf-8")


class JSONSerializer(Serializer):
    name = "json"

    def accepts(self, value: Any) -> bool:
        return value is None or isinstance(value, dict | list | tuple | int | float | bool)

    def encode(self, value: Any) -> Encoded:
        try:
            text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
            # (a lone surrogate in a string is not text: UnicodeEncodeError, a ValueError)
            data = text.encode("utf-8")
        except (TypeError, ValueError, RecursionError) as exc:  # too deep is bad input too
            raise SerializationError(f"value is not JSON-serializable: {exc}") from exc
        return Encoded(self.name, self.version, data)

    def decode(self, data: Buffer, meta: dict[str, Any]) -> Any:
        return json.loads(bytes(data))


class PickleSerializer(Serializer):
    name = "pickle"
    unsafe = True

    def accepts(self, value: Any) -> bool:
        return True

    def encode(self, value: Any) -> Encoded:
        try:
            data = pickle.dumps(value, protocol=5)
        except Exception as exc:
            raise SerializationError(f"value cannot be pickled: {exc}") from exc
        return Encoded(self.name, self.version, data)

    def decode(self, data: Buffer, meta: dict[str, Any]) -> Any:
        return pickle.loads(data)


class SerializerRegistry:
    """An ordered set of serializers; the first whose ``accepts`` says yes encodes."""

    def __init__(self, serializers: list[Serializer] | None = None) -> None:
        self._by_name: dict[str, Serializer] = {}
        #: Raised by every :meth:`register`, so callers can drop cached decoders.
        self.changes = 0
        for serializer in serializers or []:
            self.register(serializer)

    @classmethod
    def default(cls) -> SerializerRegistry:
        """A fresh registry with the built-in serializers."""
        return cls(
            [
                NDArraySerializer(),
                BytesSerializer(),
                StrSerializer(),
                JSONSerializer(),
                PickleSerializer(),
            ]
        )

    def register(self, serializer: Serializer, *, first: bool = False) -> None:
        """Add ``serializer`` (replacing one of the same name); ``first`` tries it before the rest."""
        if not getattr(serializer, "name", None):
            raise TypeError(f"{type(serializer).__name__} needs a class attribute 'name'")
        self.changes += 1
        self._by_name.pop(serializer.name, None)
        if first:
            self._by_name = {serializer.name: serializer, **self._by_name}
        else:
            self._by_name[serializer.name] = serializer

    def __iter__(self) -> Iterator[Serializer]:
        return iter(self._by_name.values())

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def get(self, name: str) -> Serializer:
        try:
            return self._by_name[name]
        except KeyError:
            raise SerializationError(
                f"content was stored by serializer {name!r}, which this backend does not have; "
                "register it with SerializerRegistry.register()"
            ) from None

    def encode(self, value: Any, *, allow_pickle: bool = False) -> Encoded:
        """Encode ``value`` with the first serializer that accepts it."""
        for serializer in self._by_name.values():
            if serializer.unsafe and not allow_pickle:
                continue
            if serializer.accepts(value):
                return serializer.encode(value)
        raise SerializationError(
            f"cannot store a value of type {type(value).__module__}.{type(value).__qualname__}: "
            "supported are numpy arrays, bytes, str and JSON values "
            "(open the backend with allow_pickle=True to pickle other objects)"
        )

    def encoder(self, *, allow_pickle: bool = False) -> Callable[[Any], Encoded]:
        """:meth:`encode` as a one-argument function, for encoding many values.

        Same choices, made once where the order allows: when the first
        serializer tried is the built-in :class:`NDArraySerializer`, a plain
        ``numpy.ndarray`` goes straight to it (it would accept it anyway).
        """
        np = _numpy_if_loaded()
        if np is None or not self.encodes_arrays_first(allow_pickle=allow_pickle):
            return partial(self.encode, allow_pickle=allow_pickle)
        ndarray, encode_array, encode = np.ndarray, self._tried(allow_pickle)[0].encode, self.encode

        def encode_one(value: Any) -> Encoded:
            if value.__class__ is ndarray:
                return encode_array(value)
            return encode(value, allow_pickle=allow_pickle)

        return encode_one

    def encodes_arrays_first(self, *, allow_pickle: bool = False) -> bool:
        """Whether :meth:`encode` hands every plain ``numpy.ndarray`` to the built-in
        :class:`NDArraySerializer` (so a batch may reuse one array's metadata for
        the next array of the same dtype and shape)."""
        tried = self._tried(allow_pickle)
        return bool(tried) and type(tried[0]) is NDArraySerializer

    def _tried(self, allow_pickle: bool) -> list[Serializer]:
        """The serializers :meth:`encode` tries, in order."""
        return [s for s in self._by_name.values() if allow_pickle or not s.unsafe]

    def decode(
        self, name: str, data: Buffer, meta: dict[str, Any], *, allow_pickle: bool = False
    ) -> Any:
        """Decode content that serializer ``name`` wrote."""
        return self.decoder(name, meta, allow_pickle=allow_pickle)(data)

    def decoder(
        self, name: str, meta: dict[str, Any], *, allow_pickle: bool = False
    ) -> Callable[[Buffer], Any]:
        """A function decoding content that serializer ``name`` wrote with ``meta``.

        Every failure, building the decoder or calling it, raises
        :class:`~polystore.errors.SerializationError`.
        """
        decode = self._build_decoder(name, allow_pickle, lambda s: s.decoder(meta))
        return partial(_guarded, name, decode)

    def batch_decoder(
        self, name: str, meta: dict[str, Any], *, allow_pickle: bool = False
    ) -> Callable[[Sequence[Buffer]], list[Any]]:
        """Like :meth:`decoder`, for a list of contents: one value for each, in order."""
        decode_many = self._build_decoder(name, allow_pickle, lambda s: s.batch_decoder(meta))
        return partial(_guarded_many, name, decode_many)

    def _build_decoder(
        self, name: str, allow_pickle: bool, build: Callable[[Serializer], _D]
    ) -> _D:
        """``build(serializer)`` for serializer ``name``; every failure a SerializationError."""
        serializer = self.get(name)
        if serializer.unsafe and not allow_pickle:
            raise SerializationError(
                f"this content was stored with {name!r}, which can run code when loaded; "
                "open the backend with allow_pickle=True to load it"
            )
        try:
            return build(serializer)
        except SerializationError:
            raise
        except Exception as exc:
            raise _cannot_decode(name, exc) from exc


def _cannot_decode(name: str, exc: Exception) -> SerializationError:
    return SerializationError(f"stored content cannot be decoded by {name!r}: {exc}")


def _guarded(name: str, decode: Callable[[Buffer], Any], data: Buffer) -> Any:
    # Runs for every file loaded: a plain try, no context manager.
    try:
        return decode(data)
    except SerializationError:
        raise
    except Exception as exc:
        raise _cannot_decode(name, exc) from exc


def _guarded_many(
    name: str, decode_many: Callable[[Sequence[Buffer]], list[Any]], datas: Sequence[Buffer]
) -> list[Any]:
    try:
        values = list(decode_many(datas))
    except SerializationError:
        raise
    except Exception as exc:
        raise _cannot_decode(name, exc) from exc
    if len(values) != len(datas):
        raise SerializationError(
            f"serializer {name!r} decoded {len(values)} values from {len(datas)} contents"
        )
    return values


def _decode_with(serializer: Serializer, meta: dict[str, Any], data: Buffer) -> Any:
    # A decoder serves many loads: each call gets metadata of its own to keep.
    return serializer.decode(data, copy.deepcopy(meta) if meta else {})


def _numpy_if_loaded() -> Any:
    # A value can only be a numpy array if numpy is already imported, so an
    # import here would only cost time for non-array values.
    return sys.modules.get("numpy")
