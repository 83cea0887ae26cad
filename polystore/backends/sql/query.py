"""``SQLBackend.query``: the common catalog filters, compiled to one SQL statement."""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from polystore.backends._common import strict_json
from polystore.backends.sql.tree import subtree_sql
from polystore.errors import SerializationError

__all__ = ["run_query"]

_SCALARS = (str, int, float, bool, type(None))


def run_query(
    conn: Connection,
    root_id: int,
    *,
    kind: str | None,
    serializer: str | None,
    dtype: str | None,
    attrs: dict[str, Any] | None,
    limit: int | None,
) -> list[sa.Row[Any]]:
    """Rows (``path`` relative to the root, node columns, ``store``) under ``root_id``.

    ``shape``, ``meta`` and ``attrs`` are JSON text (or None).
    """
    clauses: list[str] = []
    params: dict[str, Any] = {"root": root_id}
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
    for i, (key, value) in enumerate((attrs or {}).items()):
        if not isinstance(key, str) or not isinstance(value, _SCALARS):
            raise SerializationError(
                f"attrs filters take str keys and scalar values, not {key!r}: {value!r}"
            )
        # What save(attrs=...) refuses (NaN, infinities, NUL, lone surrogates)
        # no file holds, and neither database's JSON can even parse.
        doc = strict_json({key: value}, f"attrs filter {key!r}")
        if conn.dialect.name == "postgresql":
            # Containment compares JSON types exactly: 1, 1.0, true and "1" differ.
            clauses.append(f"n.attrs @> CAST(:attr{i} AS JSONB)")
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
            doc = json.dumps({"v": value})
        params[f"attr{i}"] = doc
    where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
    where += " ORDER BY sub.path"
    if limit is not None:
        where += " LIMIT :limit"
        params["limit"] = int(limit)
    # The JSON columns come as text, parsed by the caller, which knows each
    # row's full path: a row another program damaged is then named.
    select = (
        "sub.path AS path, n.id, n.parent_id, n.name, n.kind, n.size, n.serializer, "
        "n.serializer_version, n.dtype, CAST(n.shape AS TEXT) AS shape, "
        "CAST(n.meta AS TEXT) AS meta, CAST(n.attrs AS TEXT) AS attrs, n.blob_hash, "
        "n.created_at, n.modified_at, b.store AS store"
    )
    sql = subtree_sql(conn.dialect.name, select=select, where=where)
    stmt = sa.text(sql).columns(
        *[
            sa.column(c)
            for c in (
                "path",
                "id",
                "parent_id",
                "name",
                "kind",
                "size",
                "serializer",
                "serializer_version",
                "dtype",
                "shape",
                "meta",
                "attrs",
                "blob_hash",
            )
        ],
        sa.column("created_at", sa.DateTime(timezone=True)),
        sa.column("modified_at", sa.DateTime(timezone=True)),
        sa.column("store"),
    )
    return list(conn.execute(stmt, params))
