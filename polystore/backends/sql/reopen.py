"""Pickling an :class:`SQLBackend` by configuration; the copy opens on first use.

A backend holds an engine, pooled connections and caches, none of which can
cross a process boundary. What crosses is its configuration
(:class:`Config`): the database URL, the blob store (which pickles by its own
configuration: a directory, or a bucket, prefix and client settings), the inline
limit, ``allow_pickle``, ``verify_inline``, and the serializers and engine
options when they are not the defaults.

Unpickling makes an :class:`UnopenedSQLBackend`: an ``SQLBackend`` that has not
touched the database yet. The first attribute it lacks -- which every operation
reads at once -- opens the catalog (engine, schema check, blob store) under a
lock, and the object becomes a plain ``SQLBackend``. Opening costs about 4 ms on
SQLite and 20-40 ms on PostgreSQL (connecting, then one query for the schema
revision); dask's processes scheduler unpickles a graph's objects for every
task, so a copy that a task carries but never uses costs nothing. An opening
that fails (the server is down) leaves the copy unopened: the next operation
tries again.

What a copy does *not* share with its original: the caller's
:meth:`~SQLBackend.transaction` (the copy runs its own), and the caches.
"""

from __future__ import annotations

import os
import pickle
import threading
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import make_url

from polystore.backends.sql.backend import SQLBackend
from polystore.backends.sql.engine import parse_url
from polystore.blobs.base import BlobStore
from polystore.serializers import (
    BytesSerializer,
    JSONSerializer,
    NDArraySerializer,
    PickleSerializer,
    SerializerRegistry,
    StrSerializer,
)

__all__ = [
    "Config",
    "UnopenedSQLBackend",
    "absolute_url",
    "configuration",
    "reduce_backend",
    "reopen",
]

_BUILT_IN = [NDArraySerializer, BytesSerializer, StrSerializer, JSONSerializer, PickleSerializer]
# What an unopened copy keeps in its __dict__ (everything else is the open backend's).
_UNOPENED_STATE = ("_reopen", "_opening", "url")


@dataclass(frozen=True)
class Config:
    """Everything a copy needs to open the same catalog the same way."""

    url: str
    #: The store the original resolved (None: content stays inline).
    blob_store: BlobStore | None
    inline_limit: int
    allow_pickle: bool
    verify_inline: bool
    #: None for the built-in serializers.
    serializers: SerializerRegistry | None
    engine_options: dict[str, Any] | None


def absolute_url(url: str) -> str:
    """``url`` with a relative SQLite file path made absolute.

    A copy may run with another working directory (a dask worker); it must
    open the file the original opened.
    """
    parsed = parse_url(url)
    if parsed.get_backend_name() != "sqlite":
        return url
    database = parsed.database or ""
    if database in ("", ":memory:") or parsed.query.get("mode") == "memory":
        raise TypeError(
            f"an SQLBackend on an in-memory SQLite database ({url!r}) cannot be shared "
            "between processes: each process would see a database of its own; "
            "use a SQLite file or PostgreSQL"
        )
    if database.startswith("file:") or os.path.isabs(database):
        return url  # (a URI filename is the user's to get right)
    absolute = parsed.set(database=os.path.abspath(database))
    return absolute.render_as_string(hide_password=False)


def _is_built_in(serializers: SerializerRegistry) -> bool:
    return [type(s) for s in serializers] == _BUILT_IN


def _check_picklable(value: Any, what: str) -> None:
    try:
        pickle.dumps(value)
    except Exception as exc:
        raise TypeError(
            f"this SQLBackend cannot be pickled: its {what} cannot be ({exc}); "
            "define serializers at module level and pass engine options that pickle, "
            "or open the backend in each process"
        ) from exc


def configuration(backend: SQLBackend) -> Config:
    """The :class:`Config` of an open (or still unopened) backend."""
    unopened: Config | None = backend.__dict__.get("_reopen")
    if unopened is not None:
        return unopened
    serializers = None if _is_built_in(backend.serializers) else backend.serializers
    if serializers is not None:
        _check_picklable(serializers, "serializers= registry")
    engine_options = backend.__dict__.get("_engine_options") or None
    if engine_options is not None:
        _check_picklable(engine_options, "engine_options")
    return Config(
        url=absolute_url(backend.url),
        blob_store=backend.blob_store,
        inline_limit=backend.inline_limit,
        allow_pickle=backend.allow_pickle,
        verify_inline=backend._reader.verify_inline,
        serializers=serializers,
        engine_options=engine_options,
    )


def reduce_backend(backend: SQLBackend) -> tuple[Any, ...]:
    """``SQLBackend.__reduce__``: rebuild through :func:`reopen` from the configuration."""
    if type(backend) not in (SQLBackend, UnopenedSQLBackend):
        raise TypeError(
            f"{type(backend).__qualname__} subclasses SQLBackend; pickling it would lose "
            "what it adds: give it a __reduce__ of its own"
        )
    return (reopen, (configuration(backend),))


def reopen(config: Config) -> SQLBackend:
    """A copy of the backend ``config`` describes; it opens the catalog on first use."""
    return UnopenedSQLBackend(config)


class UnopenedSQLBackend(SQLBackend):
    """An :class:`SQLBackend` made by unpickling, that opens its catalog on first use.

    It becomes a plain ``SQLBackend`` (its class changes) once open. ``url``
    is there before; :meth:`close` on a copy never opened has nothing to close.
    """

    def __init__(self, config: Config) -> None:  # (no super().__init__: that opens)
        self._reopen = config
        self._opening = threading.RLock()
        self.url = config.url

    def __repr__(self) -> str:
        shown = make_url(self.url).render_as_string(hide_password=True)
        return f"SQLBackend({shown!r}, unopened)"

    def __getattr__(self, name: str) -> Any:
        # Only attributes the object lacks get here: the open backend's state.
        if name.startswith("__") or self.__dict__.get("_opener") == threading.get_ident():
            # (read by the opening itself: simply missing, as on any object)
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        self._open()
        return object.__getattribute__(self, name)

    def _open(self) -> None:
        lock = self.__dict__.get("_opening")
        if lock is None:  # opened by another thread meanwhile
            return
        with lock:
            config: Config | None = self.__dict__.get("_reopen")
            if config is None:
                return
            self.__dict__["_opener"] = threading.get_ident()
            try:
                SQLBackend.__init__(
                    self,
                    config.url,
                    blob_store=config.blob_store,
                    inline_limit=config.inline_limit,
                    allow_pickle=config.allow_pickle,
                    verify_inline=config.verify_inline,
                    serializers=config.serializers,
                    engine_options=config.engine_options,
                )
                if config.blob_store is None and self.blob_store is not None:
                    # The original had no store; this process's POLYSTORE_BLOB_STORE
                    # must not give the copy one.
                    self.blob_store.close()
                    self.blob_store = None
                    self._placement.store = None
            except BaseException:
                # Back to unopened, so that the next operation tries again.
                for key in [k for k in self.__dict__ if k not in _UNOPENED_STATE]:
                    del self.__dict__[key]
                raise
            for key in ("_opener", "_reopen", "_opening"):
                del self.__dict__[key]
            self.__class__ = SQLBackend  # type: ignore[assignment]

    def close(self) -> None:
        # docstring inherited (never opened: nothing to release)
        return
