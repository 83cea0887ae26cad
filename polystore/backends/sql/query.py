"""``SQLBackend.query``: the common catalog filters, compiled to one SQL statement."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from polystore.backends._common import strict_json
from polystore.backends.sql.tree import NODE_COLUMNS, subtree_sql
from polystore.errors import SerializationError

__all__ = ["attrs_filter", "run_query"]

_SCALARS = (str, int, float, bool, type(None))
#: What an attrs filter's values may be.
Scalar = str | int | float | bool | None

#: The node columns a query returns: all but the kind id.
_NODE = [c.key for c in NODE_COLUMNS if c.key != "kind_id"]
_JSON = ("shape", "meta", "attrs")
_TIMES = ("created_at", "modified_at")
# The JSON columns come as text, parsed by the caller, which knows each row's
# full path: a row another program damaged is then named.
_SELECT = ", ".join(
    [
        "sub.path AS path",
        *(f"CAST(n.{key} AS TEXT) AS {key}" if key in _JSON else f"n.{key}" for key in _NODE),
        "b.store AS store",
    ]
)
#: The columns of :data:`_SELECT`, the timestamps typed (SQLite returns text).
_RESULT_COLUMNS = (
    sa.column("path"),
    *(
        sa.column(key, sa.DateTime(timezone=True)) if key in _TIMES else sa.column(key)
        for key in _NODE
    ),
    sa.column("store"),
)


def attrs_filter(attrs: Mapping[str, object] | None) -> dict[str, Scalar]:
    """``attrs`` as a filter, checked: str keys, and scalar values a file can hold.

    What ``save(attrs=...)`` refuses (NaN, infinities, NUL characters, lone
    surrogates) no file holds, and neither database's JSON can even parse:
    such a filter raises :class:`~polystore.errors.SerializationError`.
    """
    wanted: dict[str, Scalar] = {}
    for key, value in (attrs or {}).items():
        if not isinstance(key, str) or not isinstance(value, _SCALARS):
            raise SerializationError(
                f"attrs filters take str keys and scalar values, not {key!r}: {value!r}"
            )
        strict_json({key: value}, f"attrs filter {key!r}")
        wanted[key] = value
    return wanted


def run_query(
    conn: Connection,
    root_id: int,
    *,
    kind: str | None,
    serializer: str | None,
    dtype: str | None,
    attrs: Mapping[str, object] | None,
    limit: int | None,
) -> list[sa.Row[Any]]:
    """Rows (``path`` relative to the root, node columns, ``store``) under ``root_id``.

    ``shape``, ``meta`` and ``attrs`` are JSON text (or None).
    """
    params: dict[str, object] = {"root": root_id}
    clauses = _column_clauses(kind, serializer, dtype, params)
    clauses += _attrs_clauses(conn.dialect.name, attrs_filter(attrs), params)
    where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
    where += " ORDER BY sub.path"
    if limit is not None:
        where += " LIMIT :limit"
        params["limit"] = int(limit)
    sql = subtree_sql(conn.dialect.name, select=_SELECT, where=where)
    return list(conn.execute(sa.text(sql).columns(*_RESULT_COLUMNS), params))


def _column_clauses(
    kind: str | None, serializer: str | None, dtype: str | None, params: dict[str, object]
) -> list[str]:
    """The clauses of the filters on plain columns, their values put in ``params``."""
    clauses: list[str] = []
    if kind is not None:
        if kind not in ("file", "dir"):
            raise ValueError(f"kind must be 'file' or 'dir', not {kind!r}")
        clauses.append("sub.kind = :kind")
        params["kind"] = kind
    if serializer is not None:
        clauses.append("n.serializer = :serializer")
        params["serializer"] = serializer
    if dtype is not None:
        clauses.append("n.dtype = :dtype")
        params["dtype"] = str(dtype)
    return clauses


def _attrs_clauses(dialect: str, wanted: dict[str, Scalar], params: dict[str, object]) -> list[str]:
    """The clauses matching each of ``wanted`` (checked), their values put in ``params``."""
    clauses: list[str] = []
    for i, (key, value) in enumerate(wanted.items()):
        if dialect == "postgresql":
            # Containment compares JSON types exactly: 1, 1.0, true and "1" differ.
            clauses.append(f"n.attrs @> CAST(:attr{i} AS JSONB)")
            params[f"attr{i}"] = strict_json({key: value}, f"attrs filter {key!r}")
        else:
            # json_each yields decoded keys, so any key matches as written
            # (a JSON path would need quoting rules SQLite does not offer);
            # the type check keeps 1, 1.0, true and "1" apart.
            clauses.append(
                f"EXISTS (SELECT 1 FROM json_each(n.attrs) AS a{i} WHERE a{i}.key = :key{i} "
                f"AND a{i}.type = json_type(:attr{i}, '$.v') "
                f"AND a{i}.atom IS json_extract(:attr{i}, '$.v'))"
            )
            params[f"key{i}"] = key
            params[f"attr{i}"] = json.dumps({"v": value})
    return clauses
