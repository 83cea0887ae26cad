"""Serializers: how a Python value becomes stored bytes plus metadata, and back.

A serializer is chosen by the value's type when saving, and by the name the
catalog recorded when loading. The built-in ones, tried in this order:

========== ===================================== ===============================
name       values                                 stored as
========== ===================================== ===============================
``ndarray`` numpy arrays and numpy scalars        raw bytes + dtype/shape/order
``bytes``   ``bytes``, ``bytearray``, ``memoryview`` the bytes
``str``     ``str``                               UTF-8
``json``    dict, list, tuple, int, float, bool,  compact JSON (UTF-8)
            ``None``
``pickle``  anything picklable, only when the     pickle protocol 5
            backend was opened with
            ``allow_pickle=True``
========== ===================================== ===============================

Arrays are never written with ``np.save``: the raw buffer is stored as is
(zero-copy for contiguous arrays) and the dtype, shape and memory order go into
the catalog, so reading back is one ``np.frombuffer``.

Add your own by subclassing :class:`Serializer` and registering it::

    registry = SerializerRegistry.default()
    registry.register(MySerializer(), first=True)
    SQLBackend(url, serializers=registry)
"""

from __future__ import annotations

import json
import pickle
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar

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


class NDArraySerializer(Serializer):
    name = "ndarray"

    def accepts(self, value: Any) -> bool:
        np = _numpy_if_loaded()
        return np is not None and isinstance(value, np.ndarray | np.generic)

    def encode(self, value: Any) -> Encoded:
        import numpy as np

        scalar = isinstance(value, np.generic)
        arr = np.asarray(value)
        if arr.dtype.hasobject:
            raise SerializationError(
                f"numpy arrays of dtype {arr.dtype} hold Python objects and cannot be stored "
                "as raw bytes; convert them, or open the backend with allow_pickle=True "
                "and save a list instead"
            )
        order = "C"
        if arr.flags.c_contiguous:
            flat = arr.reshape(-1)
        elif arr.flags.f_contiguous:
            order, flat = "F", arr.T.reshape(-1)
        else:
            flat = np.ascontiguousarray(arr).reshape(-1)
        # A uint8 view exposes the bytes of any dtype without a copy (datetime64
        # arrays, for one, refuse the buffer protocol directly).
        data = memoryview(flat.view(np.uint8)) if flat.nbytes else b""  # type: ignore[arg-type]
        dtype_name, meta = _array_meta(arr.dtype, order, scalar)
        return Encoded(self.name, self.version, data, meta, dtype=dtype_name, shape=arr.shape)

    def decode(self, data: Buffer, meta: dict[str, Any]) -> Any:
        import numpy as np

        descr = meta["descr"]
        dtype = _dtype_of(descr) if isinstance(descr, str) else _descr_to_dtype(descr)
        shape = tuple(meta["shape"])
        count = 1
        for n in shape:
            count *= n
        flat = np.frombuffer(data, dtype=dtype, count=count) if count else np.empty(0, dtype)
        order = meta.get("order", "C")
        arr = flat.reshape(shape, order=order)
        # frombuffer over bytes is read-only: one copy makes the result writeable
        # and owns its memory (the driver's buffer can then be freed).
        arr = arr.copy(order="K") if not arr.flags.writeable else arr
        return arr[()] if meta.get("scalar") else arr


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


class BytesSerializer(Serializer):
    name = "bytes"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bytes | bytearray | memoryview)

    def encode(self, value: Any) -> Encoded:
        # tobytes() copies any buffer, contiguous or not, in C order.
        data = value if isinstance(value, bytes) else memoryview(value).tobytes()
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
        except (TypeError, ValueError, RecursionError) as exc:  # too deep is bad input too
            raise SerializationError(f"value is not JSON-serializable: {exc}") from exc
        return Encoded(self.name, self.version, text.encode("utf-8"))

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

    def decode(
        self, name: str, data: Buffer, meta: dict[str, Any], *, allow_pickle: bool = False
    ) -> Any:
        """Decode content that serializer ``name`` wrote."""
        serializer = self.get(name)
        if serializer.unsafe and not allow_pickle:
            raise SerializationError(
                f"this content was stored with {name!r}, which can run code when loaded; "
                "open the backend with allow_pickle=True to load it"
            )
        try:
            return serializer.decode(data, meta)
        except SerializationError:
            raise
        except Exception as exc:
            raise SerializationError(
                f"stored content cannot be decoded by {name!r}: {exc}"
            ) from exc


def _numpy_if_loaded() -> Any:
    # A value can only be a numpy array if numpy is already imported, so an
    # import here would only cost time for non-array values.
    return sys.modules.get("numpy")
