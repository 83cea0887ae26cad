"""``BackendRegistry``: a mapping from backend names to backend instances.

Keys come from three places: classes that registered themselves through
``_backend_type`` (built lazily, with no arguments, on first access), instances
registered by hand (``registry["http"] = HTTPBackend(url)``), and database URLs
(``registry["sqlite:///catalog.db"]`` is an :class:`~polystore.SQLBackend`).
Each registry caches its own instances; nothing is shared between registries.
"""

from __future__ import annotations

import importlib
import inspect
import threading
from collections.abc import Iterator, MutableMapping
from typing import Any, Self

from polystore.backends import disk, memory  # noqa: F401 -- registers "disk" and "memory"
from polystore.backends.base import StorageBackend, registered_backend_classes
from polystore.errors import BackendConfigError, BackendNotFoundError

__all__ = ["ENTRY_POINT_GROUP", "BackendRegistry", "is_database_url"]

ENTRY_POINT_GROUP = "polystore.backends"

#: Built-in backends whose modules are heavy to import: key -> "module:Class".
_LAZY_BUILTINS = {"sql": "polystore.backends.sql:SQLBackend"}

#: SQLAlchemy dialects a URL key may name.
_DATABASE_DIALECTS = ("sqlite", "postgresql")


def is_database_url(key: object) -> bool:
    """Whether ``key`` is a SQLAlchemy URL of a supported database."""
    if not isinstance(key, str) or "://" not in key:
        return False
    dialect = key.split("://", 1)[0].split("+", 1)[0]
    return dialect in _DATABASE_DIALECTS


def _load_entry_points() -> None:
    """Import third-party backends advertised in the ``polystore.backends`` group.

    Importing a module that defines a ``_backend_type`` class registers it; an
    entry point may also name the class itself, which is registered here.
    """
    # Imported here: importlib.metadata costs ~30 ms, and most programs never
    # reach this (every key they use is already registered).
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        if inspect.isclass(obj) and issubclass(obj, StorageBackend):
            key = obj.__dict__.get("_backend_type") or ep.name
            if key not in registered_backend_classes():
                from polystore.backends.base import _register_class

                _register_class(key, obj)


class BackendRegistry(MutableMapping[str, StorageBackend]):
    """Backend name (or database URL) -> backend instance, built on first use."""

    def __init__(self, backends: dict[str, StorageBackend] | None = None) -> None:
        self._instances: dict[str, StorageBackend] = {}
        self._owned: set[str] = set()  # instances this registry built, so closes
        self._lock = threading.RLock()
        self._entry_points_loaded = False
        for name, backend in (backends or {}).items():
            self.register(name, backend)

    # -- class keys ------------------------------------------------------------

    def _classes(self) -> dict[str, type[StorageBackend] | str]:
        classes: dict[str, type[StorageBackend] | str] = dict(_LAZY_BUILTINS)
        classes.update(registered_backend_classes())
        return classes

    def _lookup(self, key: str) -> type[StorageBackend] | str | None:
        """The class for ``key``, or ``"module:Class"`` for a lazy built-in."""
        found = self._classes().get(key)
        if found is None and not self._entry_points_loaded:
            self._entry_points_loaded = True
            _load_entry_points()
            found = self._classes().get(key)
        return found

    def _find_class(self, key: str) -> type[StorageBackend] | None:
        found = self._lookup(key)
        if isinstance(found, str):
            module, _, name = found.partition(":")
            found = getattr(importlib.import_module(module), name)
        return found

    def available(self) -> list[str]:
        """Every key this registry can serve, sorted."""
        if not self._entry_points_loaded:
            self._entry_points_loaded = True
            _load_entry_points()
        return sorted(set(self._classes()) | set(self._instances))

    # -- mapping protocol ------------------------------------------------------

    def __getitem__(self, key: str) -> StorageBackend:
        with self._lock:
            backend = self._instances.get(key)
            if backend is not None:
                return backend
            backend = self._build(key)
            self._instances[key] = backend
            self._owned.add(key)
            return backend

    def _build(self, key: str) -> StorageBackend:
        if is_database_url(key):
            from polystore.backends.sql import SQLBackend

            return SQLBackend(key)
        cls = self._find_class(key) if isinstance(key, str) else None
        if cls is None:
            raise BackendNotFoundError(
                f"no backend named {key!r}; available: {', '.join(self.available()) or 'none'}"
                " (or a database URL such as 'sqlite:///catalog.db')"
            )
        try:
            inspect.signature(cls).bind()
        except TypeError:
            raise BackendConfigError(
                f"backend {key!r} ({cls.__qualname__}) needs constructor arguments; "
                f"build it yourself and register the instance: "
                f"registry[{key!r}] = {cls.__name__}(...) or "
                f"registry.register({key!r}, backend)"
            ) from None
        return cls()

    def __setitem__(self, key: str, backend: StorageBackend) -> None:
        self.register(key, backend)

    def __delitem__(self, key: str) -> None:
        with self._lock:
            if key not in self._instances:
                raise BackendNotFoundError(f"no backend instance named {key!r} to remove")
            del self._instances[key]
            self._owned.discard(key)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        if key in self._instances or is_database_url(key):
            return True
        # _lookup, not _find_class: a membership test must not import SQLAlchemy.
        return self._lookup(key) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.available())

    def __len__(self) -> int:
        return len(self.available())

    def __repr__(self) -> str:
        return f"BackendRegistry({self.available()!r})"

    # -- explicit API ------------------------------------------------------------

    def register(self, name: str, backend: StorageBackend) -> None:
        """Register an instance under ``name`` (replacing any earlier one)."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"backend name must be a non-empty str, not {name!r}")
        if inspect.isclass(backend):
            raise TypeError(
                f"register an instance, not the class {backend.__qualname__}: "
                f"registry.register({name!r}, {backend.__name__}(...))"
            )
        with self._lock:
            self._instances[name] = backend
            self._owned.discard(name)

    def close(self) -> None:
        """Close the instances this registry built (not those registered by hand)."""
        with self._lock:
            owned = [self._instances.pop(key) for key in sorted(self._owned)]
            self._owned.clear()
        for backend in owned:
            close = getattr(backend, "close", None)
            if callable(close):
                close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle the instances (each by its configuration) and which ones this registry built."""
        with self._lock:
            return (_unpickle_registry, (dict(self._instances), sorted(self._owned)))


def _unpickle_registry(instances: dict[str, StorageBackend], owned: list[str]) -> BackendRegistry:
    registry = BackendRegistry(instances)
    registry._owned.update(owned)
    return registry
