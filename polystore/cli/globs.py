"""Catalog globs and ``--include``/``--exclude`` filters.

A catalog path given to ``ls``, ``get``, ``rm``, ``mv``, ``cp``, ``stat`` or
``cat`` may be a glob (``data/well1/img*``, ``plates/*/A01/*.npy``). It is
matched against the catalog, never the local file system: quote it, so the
shell leaves it alone. Matching follows :mod:`fnmatch`, one path segment at a
time: ``*`` and ``?`` never match ``/``, ``[abc]`` is a character class. Only
the segments that hold a wildcard list a directory; the others are looked up.

A path that exists as it is written is taken literally, even when it holds
``*``, ``?`` or ``[`` (a file may be called ``img[1].npy``). A glob that
matches nothing is an error, as a missing path is.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from polystore import paths
from polystore.errors import NotFoundError

if TYPE_CHECKING:
    from polystore.backends.sql import SQLBackend

__all__ = ["Filters", "expand", "expand_all", "has_magic"]

_MAGIC = frozenset("*?[")


def has_magic(path: str) -> bool:
    """Whether ``path`` holds a wildcard (``*``, ``?`` or ``[``)."""
    return not _MAGIC.isdisjoint(path)


def expand(backend: SQLBackend, pattern: str) -> list[str]:
    """The catalog paths ``pattern`` names, sorted: itself, or what the glob matches.

    Raises :class:`~polystore.errors.NotFoundError` when a glob matches nothing.
    A path without wildcards is returned normalized, whether or not it exists
    (the command reports a missing one as it always did).
    """
    if not has_magic(pattern):
        return [paths.normalize(pattern)]
    norm = paths.normalize(pattern)
    if backend.exists(norm):
        return [norm]
    found = sorted(_match(backend, paths.split_parts(norm)))
    if not found:
        raise NotFoundError(f"no catalog path matches {pattern!r}")
    return found


def expand_all(backend: SQLBackend, patterns: Iterable[str]) -> list[str]:
    """:func:`expand` of each pattern, in order, each path once."""
    seen: dict[str, None] = {}
    for pattern in patterns:
        seen.update(dict.fromkeys(expand(backend, pattern)))
    return list(seen)


def _match(backend: SQLBackend, parts: list[str]) -> Iterator[str]:
    candidates = [paths.ROOT]
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        following: list[str] = []
        for base in candidates:
            if not has_magic(part):
                path = paths.join(base, part)
                if backend.exists(path) if last else backend.is_dir(path):
                    following.append(path)
                continue
            if not backend.is_dir(base):
                continue
            for st in backend.scan_dir(base):
                name = paths.split(st.path)[1]
                if fnmatch.fnmatchcase(name, part) and (last or st.kind == "dir"):
                    following.append(st.path)
        candidates = following
        if not candidates:
            return
    yield from candidates


class Filters:
    """``--include GLOB`` / ``--exclude GLOB``, each repeatable, like rclone's.

    A pattern without ``/`` is matched against a file's name, one with ``/``
    against its path relative to the source (both with :mod:`fnmatch`). A file
    is kept when it matches no ``--exclude`` and, if any ``--include`` is
    given, at least one of them; an exclusion always wins.
    """

    def __init__(self, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> None:
        self.include = tuple(include)
        self.exclude = tuple(exclude)

    def __bool__(self) -> bool:
        return bool(self.include or self.exclude)

    @staticmethod
    def _hit(patterns: tuple[str, ...], relative: str) -> bool:
        name = relative.rpartition("/")[2]
        return any(
            fnmatch.fnmatchcase(relative if "/" in pattern else name, pattern.strip("/"))
            for pattern in patterns
        )

    def keep(self, relative: str) -> bool:
        """Whether the file at ``relative`` (a ``/``-separated path) passes the filters."""
        if self._hit(self.exclude, relative):
            return False
        return not self.include or self._hit(self.include, relative)
