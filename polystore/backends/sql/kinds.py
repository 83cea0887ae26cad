"""Kinds of files: what every file of one serializer, dtype, shape and meta shares.

A batch of 10,000 arrays of one dtype and shape records the same serializer,
version, dtype, shape and meta 10,000 times. Those columns stay on each node
(the view, ``query()`` and SQL users read them there), and each file also
records the id of its row in ``polystore_kinds``. A batch load then reads one
integer per file instead of four columns, and finds its decoder by that
integer: about a tenth less time for a batch load from SQLite.

A kind's id is derived from its values -- the first 63 bits of the SHA-256 of
their canonical JSON (:func:`kind_key`) -- not drawn from a sequence. So an id
means the same kind in every catalog and forever: a process may cache what it
learned of an id without ever checking that the catalog is still the one it
read (a file deleted and created again, a downgrade and upgrade), and writers
need no round trip to learn the id of a new kind. The key text is stored too:
two kinds whose ids collide (about one chance in 10**7 for a catalog of a
million distinct kinds) are refused, never confused. Kinds are only ever
added; the format of the key is part of the schema and never changes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.dialects import postgresql, sqlite

from polystore.backends.sql.engine import driver_fetch
from polystore.backends.sql.models import kinds_table
from polystore.errors import SerializationError

__all__ = ["Kind", "ensure_kinds", "key_id", "kind_key", "kinds_args", "kinds_sql", "same_json"]

kinds = kinds_table

#: ``(serializer, version, dtype, shape, meta)``: shape as a JSON list, meta a
#: JSON object or None.
Kind = tuple[str, int, str | None, list[int] | None, dict[str, Any] | None]

#: Kinds looked up or inserted per statement.
_CHUNK = 500


def kind_key(kind: Kind) -> tuple[int, str]:
    """``(id, key)`` of ``kind``: its canonical JSON text, and the id derived from it.

    The key is the kind as JSON encodes it (object keys as strings, tuples
    as lists), with sorted keys, no spaces and ASCII escapes; empty meta
    and no meta are one kind (a decoder is given ``{}`` for both). Raises
    :class:`~polystore.errors.SerializationError` for what JSON cannot hold.
    """
    serializer, version, dtype, shape, meta = kind
    try:
        stored = json.loads(json.dumps([serializer, version, dtype, shape, meta or None]))
        key = json.dumps(stored, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as error:
        raise SerializationError(f"the kind {kind!r} cannot be stored as JSON: {error}") from None
    return key_id(key), key


def key_id(key: str) -> int:
    """The id of the kind whose key is ``key``: 63 bits of its SHA-256."""
    return int.from_bytes(hashlib.sha256(key.encode("ascii")).digest()[:8], "big") >> 1


def same_json(a: Any, b: Any, *, loose_numbers: bool = False) -> bool:
    """Whether two parsed JSON values are the same, types included (a bool is never a number).

    With ``loose_numbers`` an integer also equals a float of the same value,
    as PostgreSQL's jsonb gives ``1e23`` back as an integer. A walk with a
    stack, not recursion: JSON nests deeper than Python recurses.
    """
    stack = [(a, b)]
    while stack:
        x, y = stack.pop()
        if type(x) is not type(y):
            if not (loose_numbers and {type(x), type(y)} == {int, float}):
                return False
            try:
                if float(x) != float(y):
                    return False
            except OverflowError:
                return False
        elif isinstance(x, dict):
            if x.keys() != y.keys():
                return False
            stack.extend((x[k], y[k]) for k in x)
        elif isinstance(x, list):
            if len(x) != len(y):
                return False
            stack.extend(zip(x, y, strict=True))
        elif x != y:
            return False
    return True


def ensure_kinds(conn: Connection, wanted: Mapping[int, tuple[str, Kind]]) -> None:
    """Make sure ``polystore_kinds`` holds every kind of ``wanted`` (``{id: (key, kind)}``).

    One indexed lookup per 500 kinds when they exist already, as they do for
    all but a catalog's first files of each kind; missing ones are inserted
    (``ON CONFLICT DO NOTHING``: a concurrent writer may add the same kind).
    Raises :class:`~polystore.errors.SerializationError` if an id is taken by
    another kind.
    """
    # In id order, so writers adding the same new kinds queue instead of deadlocking.
    ids = sorted(wanted)
    missing = _check(conn, wanted, ids)
    if not missing:
        return
    insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(kinds)
    rows = []
    for kind_id in missing:
        key, (serializer, version, dtype, shape, meta) = wanted[kind_id]
        rows.append(
            {
                "id": kind_id,
                "key": key,
                "serializer": serializer,
                "serializer_version": version,
                "dtype": dtype,
                "shape": shape,
                "meta": meta or None,
            }
        )
    conn.execute(insert.on_conflict_do_nothing(), rows)
    left = _check(conn, wanted, missing)  # (inserted, or by another writer)
    if left:  # pragma: no cover -- the insert above guarantees a row
        raise AssertionError(f"kinds {left} were neither found nor inserted")


def _check(conn: Connection, wanted: Mapping[int, tuple[str, Kind]], ids: list[int]) -> list[int]:
    """Refuse collisions among ``ids``; return those with no row yet."""
    dialect = conn.dialect.name
    found: dict[int, str] = {}
    for start in range(0, len(ids), _CHUNK):
        part = ids[start : start + _CHUNK]
        # On the driver's own cursor: this runs in every save, even of one file.
        sql = _select_kinds(dialect, "id, key", len(part))
        found.update(driver_fetch(conn, sql, kinds_args(dialect, part)))
    for kind_id, key in found.items():
        if key != wanted[kind_id][0]:
            raise SerializationError(
                f"the kind {wanted[kind_id][0]} has the id {kind_id} of another kind, {key}; "
                "this catalog cannot store it"
            )
    return [kind_id for kind_id in ids if kind_id not in found]


@lru_cache(maxsize=64)
def kinds_sql(dialect: str, count: int | None) -> str:
    """SQL for the kinds with ``count`` ids (None: every kind), as the fast path reads them.

    Rows are ``id, serializer, dtype, shape, meta``, with shape and meta as
    JSON text (on PostgreSQL cast in SQL: psycopg's JSONB loader is Python
    code), as the decoder cache parses each once.
    """
    if dialect == "postgresql":
        columns = "id, serializer, dtype, CAST(shape AS TEXT), CAST(meta AS TEXT)"
    else:
        columns = "id, serializer, dtype, shape, meta"
    return _select_kinds(dialect, columns, count)


@lru_cache(maxsize=128)
def _select_kinds(dialect: str, columns: str, count: int | None) -> str:
    """``columns`` of the kinds with ``count`` ids (:func:`kinds_args`), or of every kind."""
    sql = f"SELECT {columns} FROM polystore_kinds"
    if count is None:
        return sql
    if dialect == "postgresql":
        return f"{sql} WHERE id = ANY(%s)"
    return f"{sql} WHERE id IN ({', '.join(['?'] * count)})"


def kinds_args(dialect: str, ids: Sequence[int]) -> list[Any]:
    """Parameters of :func:`kinds_sql` for ``ids``."""
    return [list(ids)] if dialect == "postgresql" else list(ids)
