"""Local files and catalog values: how ``put`` reads a file and ``get`` writes one.

``put`` types a file by its extension; ``get`` writes a value by its type:

=============== =============================== ====================================
extension       ``put`` stores                  ``get`` writes
=============== =============================== ====================================
``.npy``        the array (``np.load``, no      ``np.save`` (``.npy`` is appended to
                pickles)                        an array's name that lacks it)
``.json``       the parsed JSON value           JSON, in the file's original layout
``.txt``        the text (UTF-8) as ``str``     the text, unchanged
``.tif/.tiff``  the image array (tifffile)      ``tifffile.imwrite``
anything else   the bytes                       the bytes
=============== =============================== ====================================

A ``.npy``, ``.txt`` or raw file comes back byte for byte (a ``.npy`` written by
``np.save``: the header is numpy's). So does a ``.json`` file: its layout -- the
indent, the separators, ASCII escaping and a final newline, as any
``json.dumps`` call produces -- is recorded in the file's attributes under
``polystore.json`` unless it is ``json.dumps``'s default layout. A JSON file
that no ``json.dumps`` call reproduces (hand-aligned, duplicate keys) is kept
verbatim as text, and ``put`` says so. A TIFF keeps its pixels, not its tags.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from polystore.errors import SerializationError
from polystore.hashing import HashAlgorithm

if TYPE_CHECKING:
    from polystore.backends.base import StatResult
    from polystore.serializers import SerializerRegistry

__all__ = [
    "JSON_LAYOUT_ATTR",
    "LocalContent",
    "atomic_write",
    "describe_local",
    "local_matches",
    "local_name",
    "local_writer",
    "read_local",
    "stored_as_bytes",
    "write_local",
]

_P = TypeVar("_P", bound=PurePath)

#: The attribute that records a JSON file's layout when it is not the default one.
JSON_LAYOUT_ATTR = "polystore.json"

_DEFAULT_LAYOUT: dict[str, Any] = {
    "indent": None,
    "separators": [", ", ": "],
    "ensure_ascii": True,
    "newline": False,
}
_TIFF = (".tif", ".tiff")


def _tifffile() -> Any:
    try:
        import tifffile
    except ImportError:
        return None
    return tifffile


def read_local(path: Path, *, raw: bool = False) -> tuple[Any, dict[str, Any], str | None]:
    """``(value, attributes, note)`` for local file ``path``.

    ``attributes`` holds what ``get`` needs to write the file back exactly;
    ``note`` is a remark for the user, or None. A file whose content does not
    match its extension raises :class:`~polystore.errors.SerializationError`.
    """
    suffix = path.suffix.lower()
    if raw:
        return path.read_bytes(), {}, None
    if suffix == ".npy":
        import numpy as np

        try:
            return np.load(path, allow_pickle=False), {}, None
        except ValueError as exc:
            raise _unreadable(path, "a .npy array", exc) from exc
    if suffix in _TIFF and (tifffile := _tifffile()) is not None:
        try:
            return tifffile.imread(path), {}, None
        except Exception as exc:  # tifffile raises a variety of errors on bad input
            raise _unreadable(path, "a TIFF image", exc) from exc
    if suffix == ".txt":
        try:
            return path.read_bytes().decode("utf-8"), {}, None
        except UnicodeDecodeError as exc:
            raise _unreadable(path, "UTF-8 text", exc) from exc
    if suffix == ".json":
        return _read_json(path)
    return path.read_bytes(), {}, None


def stored_as_bytes(path: PurePath, *, raw: bool = False) -> str | None:
    """``"bytes"`` or ``"str"`` when ``put`` stores the file's own bytes, else None.

    Such a file's content hash is the hash of the file, and it can be
    streamed (:meth:`polystore.SQLBackend.save_file`); the other kinds are
    parsed (an array, a JSON value) and stored re-encoded.
    """
    suffix = path.suffix.lower()
    if raw:
        return "bytes"
    if suffix == ".txt":
        return "str"
    if suffix in (".npy", ".json") or (suffix in _TIFF and _tifffile() is not None):
        return None
    return "bytes"


@dataclass
class LocalContent:
    """What ``put`` would store for a local file: its serializer, hash and kind."""

    serializer: str
    hash: str
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    #: Attributes ``put`` records to write the file back exactly (a JSON layout).
    attrs: dict[str, Any] = field(default_factory=dict)
    #: The parsed value (arrays, JSON), kept for the save; None for plain bytes.
    value: Any = None
    remark: str | None = None

    def same_as(self, st: StatResult, user_attrs: dict[str, Any]) -> bool:
        """Whether ``st`` (a catalog file) already holds exactly this, with these attributes."""
        if st.kind != "file" or st.serializer != self.serializer or st.hash != self.hash:
            return False
        if st.dtype != self.dtype or st.shape != self.shape:
            return False
        if st.attrs.get(JSON_LAYOUT_ATTR) != self.attrs.get(JSON_LAYOUT_ATTR):
            return False
        return all(st.attrs.get(key, _MISSING) == value for key, value in user_attrs.items())


_MISSING = object()


def describe_local(
    path: Path, serializers: SerializerRegistry, algorithm: HashAlgorithm, *, raw: bool
) -> LocalContent:
    """What ``put`` would store for ``path``, hashed by the catalog's ``algorithm``
    (a chunk at a time when it is bytes)."""
    as_bytes = stored_as_bytes(path, raw=raw)
    if as_bytes is not None:
        return LocalContent(as_bytes, algorithm.of_file(path)[1])
    value, extra, remark = read_local(path, raw=raw)
    encoded = serializers.encode(value)
    shape = tuple(encoded.shape) if encoded.shape is not None else None
    return LocalContent(
        encoded.serializer,
        algorithm.of(encoded.data),
        encoded.dtype,
        shape,
        extra,
        value,
        remark,
    )


def local_name(st: StatResult, target: Path) -> Path:
    """The local file ``get`` writes for catalog file ``st`` at ``target`` (see :func:`write_local`)."""
    if st.serializer == "ndarray":
        suffix = target.suffix.lower()
        if suffix != ".npy" and not (suffix in _TIFF and _tifffile() is not None):
            return target.with_name(target.name + ".npy")
    return target


def local_matches(
    st: StatResult, local: Path, serializers: SerializerRegistry, algorithm: HashAlgorithm
) -> bool:
    """Whether local file ``local`` already holds what ``get`` would write for ``st``
    (a file of a catalog whose content ``algorithm`` names)."""
    try:
        if not local.is_file():
            return False
        if st.serializer in ("bytes", "str"):
            return local.stat().st_size == st.size and algorithm.of_file(local)[1] == st.hash
        if st.serializer not in ("ndarray", "json"):
            return False
        described = describe_local(local, serializers, algorithm, raw=False)
    except (OSError, SerializationError, ValueError):
        return False
    return described.same_as(st, {})


def _unreadable(path: Path, what: str, exc: Exception) -> SerializationError:
    return SerializationError(
        f"{path} is not {what} ({exc}); use --raw to store files as plain bytes"
    )


def _read_json(path: Path) -> tuple[Any, dict[str, Any], str | None]:
    try:
        text = path.read_bytes().decode("utf-8")
        value = json.loads(text)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise _unreadable(path, "JSON", exc) from exc
    layout = None if isinstance(value, str) else _json_layout(text, value)
    if layout is None:
        return text, {}, f"{path}: JSON layout not reproducible by json.dumps; stored as text"
    changed = {key: val for key, val in layout.items() if _DEFAULT_LAYOUT[key] != val}
    return value, ({JSON_LAYOUT_ATTR: changed} if changed else {}), None


def _json_layout(text: str, value: Any) -> dict[str, Any] | None:
    """The ``json.dumps`` layout that turns ``value`` into exactly ``text``, or None."""
    newline = text.endswith("\n")
    body = text[:-1] if newline else text
    # ASCII-only text: escaping or not gives the same bytes if the value is ASCII,
    # and only escaping explains it otherwise.
    ensure_ascii = body.isascii()
    indents: list[Any]
    if "\n" in body:
        second = body.split("\n", 2)[1]
        space = second[: len(second) - len(second.lstrip(" \t"))]
        indents = [len(space) if space.strip(" ") == "" else space]
    else:
        indents = [None]
    for indent in indents:
        for separators in ([", ", ": "], [",", ": "], [",", ":"], [", ", ":"]):
            candidate = json.dumps(
                value,
                indent=indent,
                separators=(separators[0], separators[1]),
                ensure_ascii=ensure_ascii,
            )
            if candidate == body:
                return {
                    "indent": indent,
                    "separators": separators,
                    "ensure_ascii": ensure_ascii,
                    "newline": newline,
                }
    return None


def json_text(value: Any, layout: Any = None) -> str:
    """``value`` as JSON in ``layout`` (a recorded ``polystore.json`` attribute)."""
    options = dict(_DEFAULT_LAYOUT)
    if isinstance(layout, dict):
        options.update({key: val for key, val in layout.items() if key in options})
    try:
        text = json.dumps(
            value,
            indent=options["indent"],
            separators=(str(options["separators"][0]), str(options["separators"][1])),
            ensure_ascii=bool(options["ensure_ascii"]),
        )
    except (TypeError, ValueError, IndexError, KeyError):
        # An attribute edited by hand into nonsense: fall back to the default layout.
        text, options["newline"] = json.dumps(value), False
    return text + ("\n" if options["newline"] else "")


def write_local(value: Any, target: Path, attrs: dict[str, Any] | None = None) -> Path:
    """Write ``value`` to ``target`` atomically; return the path written.

    An array goes to ``target`` plus ``.npy`` when the name does not already
    end in ``.npy`` (or ``.tif``/``.tiff`` with tifffile installed), as
    ``np.save`` would name it.
    """
    final, write = local_writer(value, target, attrs)
    return atomic_write(final, write)


def local_writer(
    value: Any, target: _P, attrs: dict[str, Any] | None = None
) -> tuple[_P, Callable[[BinaryIO], object]]:
    """Where :func:`write_local` puts ``value`` for ``target``, and what writes its bytes.

    ``polystore.fsspec`` renders a file with this too, so ``cat_file`` gives the
    bytes that ``get`` writes.
    """
    import numpy as np

    if isinstance(value, np.ndarray | np.generic):
        array = np.asarray(value)
        tifffile = _tifffile() if target.suffix.lower() in _TIFF else None
        if tifffile is not None:
            return target, lambda fh: tifffile.imwrite(fh, array)
        if target.suffix.lower() != ".npy":
            target = target.with_name(target.name + ".npy")
        return target, lambda fh: np.save(fh, array, allow_pickle=False)
    if isinstance(value, bytes | bytearray | memoryview):
        content = bytes(value)
    elif isinstance(value, str):
        content = value.encode("utf-8")
    elif value is None or isinstance(value, dict | list | int | float | bool):
        layout = (attrs or {}).get(JSON_LAYOUT_ATTR)
        content = json_text(value, layout).encode("utf-8")
    else:
        raise SerializationError(
            f"cannot write a {type(value).__name__} to {target}: not an array, bytes, text or JSON"
        )
    return target, lambda fh: fh.write(content)


def atomic_write(target: Path, write: Any) -> Path:
    # A temporary file beside the target, then os.replace: a reader never sees a
    # half-written file, and an error leaves the old one in place.
    try:
        fd, tmp = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name[:100]}.", suffix=".part"
        )
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(target)) from exc
    try:
        os.close(fd)
        # Opened by name: writers such as tifffile read the file object's name.
        with open(tmp, "wb") as fh:
            write(fh)
        # mkstemp creates the file private (0600); give it the mode open() would.
        os.chmod(tmp, _new_file_mode())
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    return target


def _new_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask
