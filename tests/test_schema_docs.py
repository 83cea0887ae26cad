"""docs/schema.rst is a tested contract.

Its column lists must match the models and the view, and every SQL example runs
against a real catalog on its own database (SQLite or PostgreSQL) and must
return exactly the rows the page promises.
"""

from __future__ import annotations

import json
import posixpath
import re
import textwrap
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from polystore.backends.sql import SQLBackend
from polystore.backends.sql.models import Base
from polystore.backends.sql.schema import VERSION_TABLE, VIEW_COLUMNS

DOC = Path(__file__).resolve().parents[1] / "docs" / "schema.rst"
DIALECTS = {"SQLite": "sqlite", "PostgreSQL": "postgresql"}
EXAMPLES = ("large-float32", "per-directory", "attribute", "duplicates")


# -- reading the page ----------------------------------------------------------------


@dataclass(frozen=True)
class SQLBlock:
    name: str
    caption: str
    sql: str


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def sql_blocks(text: str) -> list[SQLBlock]:
    """Every ``.. code-block:: sql`` with its ``:caption:`` and ``:name:`` options."""
    lines = text.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != ".. code-block:: sql":
            continue
        base = _indent(line)
        options: dict[str, str] = {}
        j = i + 1
        while j < len(lines) and lines[j].strip().startswith(":"):
            key, _, value = lines[j].strip()[1:].partition(":")
            options[key] = value.strip()
            j += 1
        body = []
        while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > base):
            body.append(lines[j])
            j += 1
        sql = "\n".join(body).strip()
        blocks.append(SQLBlock(options.get("name", ""), options.get("caption", ""), sql))
    return blocks


def documented_columns(text: str) -> dict[str, list[str]]:
    """``section title -> column names`` from each section's list-table."""
    lines = text.splitlines()
    columns: dict[str, list[str]] = defaultdict(list)
    section = ""
    for i, line in enumerate(lines):
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if line.strip() and re.fullmatch(r"([=~-])\1+", following) and len(following) >= len(line):
            section = line.strip()
            continue
        match = re.fullmatch(r"\s+\* - ``(\w+)``", line)
        if match:
            columns[section].append(match.group(1))
    return dict(columns)


@pytest.fixture(scope="module")
def page() -> str:
    return DOC.read_text(encoding="utf-8")


def test_view_columns_are_documented_in_order(page: str) -> None:
    (title,) = [t for t in documented_columns(page) if "polystore_catalog" in t]
    assert tuple(documented_columns(page)[title]) == VIEW_COLUMNS


def test_every_table_and_column_is_documented_in_order(page: str) -> None:
    documented = {
        t.strip("`"): cols for t, cols in documented_columns(page).items() if t.startswith("``")
    }
    expected = {
        name: [c.name for c in table.columns] for name, table in Base.metadata.tables.items()
    }
    expected[VERSION_TABLE] = ["version_num"]
    assert documented == expected


def test_every_example_comes_in_both_dialects(page: str) -> None:
    blocks = sql_blocks(page)
    names = sorted(block.name for block in blocks)
    assert names == sorted(f"query-{e}-{d}" for e in EXAMPLES for d in DIALECTS.values())
    for block in blocks:
        assert block.name.endswith("-" + DIALECTS[block.caption])
        assert block.sql.rstrip().endswith(";")


def test_the_application_filter_leaves_polystore_alone(page: str) -> None:
    (block,) = re.findall(r"\.\. code-block:: python\n\n((?:   .*\n|\n)+)", page)
    namespace: dict[str, Any] = {}
    exec(compile(textwrap.dedent(block), str(DOC), "exec"), namespace)  # noqa: S102 -- our own docs
    include_name = namespace["include_name"]
    for table in [*Base.metadata.tables, VERSION_TABLE, "polystore_catalog"]:
        assert include_name(table, "table", {}) is False
    assert include_name("app_items", "table", {}) is True
    assert include_name("alembic_version", "table", {}) is True
    assert include_name("ix_app_items_name", "index", {"table_name": "app_items"}) is True


# -- running the examples --------------------------------------------------------------

A01 = np.arange(300_000, dtype=np.float32).reshape(600, 500)  # 1.2 MB
# path -> (value, attrs). Each file is there to be found by one example, or to
# be left out by one for a reason given beside it.
FILES: dict[str, tuple[Any, dict[str, Any] | None]] = {
    "plate1/A01.npy": (A01, {"well": "A01", "plate": 1}),
    "plate1/A02.npy": (np.ones((100, 100), np.float32), {"well": "A02"}),  # 40 kB: too small
    "plate1/A03.npy": (A01.astype(np.float64), {"well": "A03"}),  # float64
    "plate1/sub/B01.npy": (np.ones((700, 500), np.float32), {"well": "A01"}),  # deeper, 1.4 MB
    "plate10/A01.npy": (A01.copy(), {"well": "A01"}),  # not under plate1/; a duplicate
    "Plate1/A01.npy": (A01.copy(), None),  # not under plate1/ (case); a duplicate
    "plate2/A01_copy.npy": (A01.copy(), {"well": ["A01"]}),  # a list, not "A01"
    "notes/readme.txt": ("hello", {"well": "a01"}),  # lowercase
    "notes/readme copy.txt": ("hello", None),  # a small duplicate
    "notes/meta.json": ({"well": "A01"}, None),  # content, not attributes
    "notes/numbered.txt": ("x", {"well": 1}),
    "top.bin": (b"\x00" * 10, None),  # in the root directory
}
EMPTY_DIRS = ("empty", "only_dirs/inner")


@pytest.fixture
def catalog(catalog_url: str) -> Iterator[SQLBackend]:
    # Everything inline, so the examples do not depend on an external blob store.
    with SQLBackend(catalog_url, inline_limit=16 << 20) as backend:
        for path, (value, attrs) in FILES.items():
            backend.save(value, path, attrs=attrs)
        for path in EMPTY_DIRS:
            backend.ensure_directory(path)
        yield backend


def expected_results(backend: SQLBackend) -> dict[str, tuple[list[str], list[tuple[Any, ...]]]]:
    stats = {path: backend.stat(path) for path in FILES}
    sizes = {path: stat.size for path, stat in stats.items()}

    per_directory: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for path, size in sizes.items():
        entry = per_directory[posixpath.dirname(path)]
        entry[0] += 1
        entry[1] += int(size or 0)

    by_hash: dict[str, list[str]] = defaultdict(list)
    for path, stat in stats.items():
        by_hash[str(stat.hash)].append(path)
    duplicates = sorted(
        (
            (h, sizes[paths[0]], len(paths), sorted(paths))
            for h, paths in by_hash.items()
            if len(paths) > 1
        ),
        key=lambda row: (-int(row[1] or 0), row[0]),
    )

    return {
        "large-float32": (
            ["path", "size"],
            [("plate1/A01.npy", 1_200_000), ("plate1/sub/B01.npy", 1_400_000)],
        ),
        "per-directory": (
            ["directory", "files", "bytes"],
            [(d, n, b) for d, (n, b) in sorted(per_directory.items())],
        ),
        "attribute": (
            ["path"],
            [("plate1/A01.npy",), ("plate1/sub/B01.npy",), ("plate10/A01.npy",)],
        ),
        "duplicates": (["hash", "size", "copies", "paths"], duplicates),
    }


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):  # PostgreSQL's sum() of bigint is numeric
        return int(value)
    if isinstance(value, str) and value.startswith("["):  # SQLite returns JSON as text
        value = json.loads(value)
    if isinstance(value, list):  # json_group_array has no order on SQLite
        return sorted(value)
    return value


def test_examples_return_what_the_page_promises(catalog: SQLBackend, page: str) -> None:
    dialect = catalog.engine.dialect.name
    expected = expected_results(catalog)
    # The data really exercises every example: each answer has rows to check.
    assert all(rows for _, rows in expected.values())
    assert len(expected["duplicates"][1]) == 2
    assert expected["duplicates"][1][0][2] == 4

    blocks = [b for b in sql_blocks(page) if DIALECTS[b.caption] == dialect]
    assert len(blocks) == len(EXAMPLES)
    with catalog.engine.connect() as conn:
        for block in blocks:
            example = block.name.removeprefix("query-").removesuffix(f"-{dialect}")
            result = conn.execute(sa.text(block.sql))
            rows = [tuple(_plain(v) for v in row) for row in result]
            columns, want = expected[example]
            assert list(result.keys()) == columns, block.name
            assert rows == want, block.name
