"""Peak memory of saving and loading one large array stored inline, in the database itself.

    .venv/bin/python benchmarks/inline_memory.py                 # 256 MiB, SQLite and PostgreSQL
    .venv/bin/python benchmarks/inline_memory.py --mib 768 --no-postgres

The backend is opened with ``inline_limit`` above the array's size and no blob
store, so the content goes into ``polystore_blobs.data``. Each measurement runs
in a fresh subprocess and reads the process's peak resident set size
(``resource.getrusage``) before and after the operation, as
``benchmarks/blob_memory.py`` does for the blob store:

* save: the array exists first (part of the baseline); the growth is what
  ``save()`` holds beyond it;
* load: the baseline is taken before ``load()``; the growth includes the
  returned array itself (1.0x).

Issue 19's goal reads on the growth / array column: at most ~1.1 for both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import uuid
from typing import Any

from blob_memory import CHILD


def measure(url: str, mode: str, size: int) -> dict[str, float]:
    """blob_memory.py's child, its backend opened with ``inline_limit`` above ``size``."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            url,
            json.dumps({"inline_limit": size + (1 << 20)}),
            mode,
            str(size),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    data: dict[str, float] = json.loads(result.stdout)
    return data


def _pg_schema(url: str) -> tuple[str, Any]:
    """A fresh schema on the server at ``url``: its URL, and a function that drops it."""
    import psycopg
    from sqlalchemy.engine import make_url

    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"ps_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"')

    def drop() -> None:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{name}" CASCADE')

    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{name}", drop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="array size in MiB")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("POLYSTORE_BENCH_PG_URL")
        or os.environ.get("POLYSTORE_TEST_PG_URL")
        or "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    )
    args = parser.parse_args(argv)
    size = args.mib << 20
    print(
        "| database | operation | array | peak RSS before | peak RSS after | growth "
        "| growth / array | time |"
    )
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        catalogs: list[tuple[str, str, Any]] = [
            ("SQLite", f"sqlite:///{tmp}/catalog.db", lambda: None)
        ]
        if not args.no_postgres:
            catalogs.append(("PostgreSQL", *_pg_schema(args.pg_url)))
        for database, url, drop in catalogs:
            try:
                for mode in ("save", "load"):
                    m = measure(url, mode, size)
                    growth = m["after"] - m["before"]
                    print(
                        f"| {database} | {mode} | {args.mib} MiB "
                        f"| {m['before'] / (1 << 20):.0f} MiB | {m['after'] / (1 << 20):.0f} MiB "
                        f"| {growth / (1 << 20):.0f} MiB | {growth / size:.2f} "
                        f"| {m['seconds']:.2f} s |",
                        flush=True,
                    )
            finally:
                drop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
