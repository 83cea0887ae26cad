"""Helpers the built-in backends share: error constructors and path checks.

The OSError-family errors carry ``errno`` and ``filename`` like the builtins
they refine, so ``str(exc)`` reads as Python's own
(``[Errno 2] No such file or directory: 'a/b.npy'``) and ``exc.filename`` is the
normal path the backend looked at.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
from collections.abc import Callable
from typing import Any

from polystore import errors, paths

#: User attributes are metadata, not content: their JSON is capped.
MAX_ATTRS_BYTES = 64 * 1024


class KindLookups:
    """``exists``, ``is_file`` and ``is_dir`` from one lookup, ``_kind(path)``:
    ``"file"``, ``"dir"`` or None. Listed before the backend base class."""

    def _kind(self, path: str) -> str | None:
        raise NotImplementedError

    def exists(self, path: str) -> bool:
        """Whether a file or directory exists at ``path``."""
        return self._kind(path) is not None

    def is_file(self, path: str) -> bool:
        """Whether ``path`` is a file."""
        return self._kind(path) == "file"

    def is_dir(self, path: str) -> bool:
        """Whether ``path`` is a directory."""
        return self._kind(path) == "dir"


def not_found(path: str) -> errors.NotFoundError:
    return errors.NotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)


def already_exists(path: str) -> errors.AlreadyExistsError:
    return errors.AlreadyExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)


def is_a_directory(path: str) -> errors.IsADirectoryError:
    return errors.IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)


def not_a_directory(path: str) -> errors.NotADirectoryError:
    return errors.NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)


def directory_not_empty(path: str) -> errors.IsADirectoryError:
    """``delete(path)`` of a non-empty directory without ``recursive=True``.

    An :class:`~polystore.errors.IsADirectoryError` (so an ``OSError``) whose
    ``errno`` is ``ENOTEMPTY``: the operation was given a directory it may not
    remove as asked.
    """
    return errors.IsADirectoryError(
        errno.ENOTEMPTY, "Directory not empty (pass recursive=True to delete it)", path
    )


def read_only_file_system(path: str) -> errors.ReadOnlyError:
    """A write refused by the operating system because the file system is read-only.

    A :class:`~polystore.errors.ReadOnlyError` (so a ``PermissionError``) that
    keeps ``errno.EROFS``, so code that looked at the ``OSError`` still works.
    """
    return errors.ReadOnlyError(errno.EROFS, os.strerror(errno.EROFS), path)


def attrs_json(attrs: Any) -> str:
    """The JSON text of user attributes, checked the same way on every backend.

    ``attrs`` must be a ``dict`` with ``str`` keys holding plain JSON (no NaN or
    infinities, no NUL character in a string, nothing ``json`` cannot encode,
    not nested too deep), at most
    :data:`MAX_ATTRS_BYTES` once encoded as UTF-8; anything else raises
    :class:`~polystore.errors.SerializationError`.
    """
    if not isinstance(attrs, dict) or not all(isinstance(k, str) for k in attrs):
        raise errors.SerializationError(
            f"attrs must be a dict with str keys, not {type(attrs).__name__}"
        )
    text = strict_json(attrs, "attrs")
    size = len(text.encode("utf-8"))
    if size > MAX_ATTRS_BYTES:
        raise errors.SerializationError(
            f"attrs are {size} bytes of JSON, more than {MAX_ATTRS_BYTES}; "
            "store large metadata as a file of its own"
        )
    return text


def strict_json(value: Any, what: str) -> str:
    """The JSON text of ``value``, which a catalog column on any database can hold.

    No NaN or infinities, nothing ``json`` cannot encode, no nesting too deep,
    no NUL character and no lone surrogate (``"\\ud800"``: not Unicode text,
    which UTF-8 cannot encode) in a string: PostgreSQL's JSON cannot store
    either, and both are refused everywhere so a catalog means the same on
    every database (and a memory backend behaves like the rest). Anything else
    raises :class:`~polystore.errors.SerializationError` naming ``what``.
    """
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:  # nesting too deep is bad input too
        raise errors.SerializationError(f"{what}: not plain JSON ({exc})") from exc
    if "\\u0000" in text and holds_nul(value):
        raise errors.SerializationError(f"{what}: a NUL character (\\x00) in a string")
    # (json escapes every character past U+FFFF as a surrogate pair, so "\ud"
    # is only a hint: the walk tells a pair from a lone one)
    if "\\ud" in text and _any_string(value, _not_text):
        raise errors.SerializationError(
            f"{what}: a lone surrogate in a string (not Unicode text, which UTF-8 cannot encode)"
        )
    return text


def holds_nul(value: Any) -> bool:
    """Whether a JSON value has a NUL character in any string (keys included)."""
    return _any_string(value, lambda text: "\x00" in text)


def _not_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _any_string(value: Any, test: Callable[[str], bool]) -> bool:
    """Whether ``test`` holds for any string in a JSON value (keys included).

    A walk with a stack, not recursion: JSON nests deeper than Python recurses.
    ``value`` must be free of cycles (``json.dumps`` checks that first).
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if test(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return False


def check_attrs(attrs: Any) -> dict[str, Any] | None:
    """``attrs`` itself once :func:`attrs_json` accepts it; ``None`` stays ``None``."""
    if attrs is None:
        return None
    attrs_json(attrs)
    return attrs  # type: ignore[no-any-return]


def ancestors(path: str) -> list[str]:
    """Proper ancestors of a normal path, nearest the root first, root excluded.

    >>> ancestors("a/b/c")
    ['a', 'a/b']
    """
    parts = paths.split_parts(path)
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def check_not_into_itself(src: str, dst: str) -> None:
    """Refuse to move or copy a directory into itself."""
    if dst == src or dst.startswith(src + "/"):
        raise errors.InvalidPathError(
            f"cannot move or copy directory {src!r} into itself ({dst!r})"
        )


def reject_kwargs(backend: object, method: str, kwargs: dict[str, Any]) -> None:
    """Unknown keywords are an error, not silently ignored (a typo must not pass)."""
    if kwargs:
        names = ", ".join(sorted(kwargs))
        raise TypeError(
            f"{type(backend).__name__}.{method}() got unexpected keyword arguments: {names}"
        )


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
