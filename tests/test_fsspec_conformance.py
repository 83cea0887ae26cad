"""fsspec's own conformance suite (``fsspec.tests.abstract``) on a polystore catalog.

Copy, get, put, open and pipe, each on SQLite and PostgreSQL, nothing skipped
(``docs/fsspec.rst`` says which of fsspec's suites do not apply, and why).
Each test gets a fresh, empty catalog, made cheaply: a copy of a migrated
SQLite file, or a PostgreSQL schema migrated once per module and emptied
before each test.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import PG_URL, _pg_conninfo, _require_pg
from fsspec.tests.abstract import (
    AbstractCopyTests,
    AbstractFixtures,
    AbstractGetTests,
    AbstractOpenTests,
    AbstractPipeTests,
    AbstractPutTests,
)

from polystore.backends.sql import SQLBackend
from polystore.fsspec import PolystoreFileSystem


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def fresh_catalog(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[Path], str]]:
    """``fresh_catalog(tmp_path)`` is the URL of an empty, migrated catalog."""
    if request.param == "sqlite":
        template = tmp_path_factory.mktemp("template") / "catalog.db"
        SQLBackend(f"sqlite:///{template}").close()

        def copy(tmp_path: Path) -> str:
            shutil.copyfile(template, tmp_path / "catalog.db")
            return f"sqlite:///{tmp_path}/catalog.db"

        yield copy
        return

    _require_pg()
    import psycopg

    schema = f"ps_fsspec_{uuid.uuid4().hex[:12]}"
    url = f"{PG_URL}{'&' if '?' in PG_URL else '?'}options=-csearch_path%3D{schema}"
    with psycopg.connect(_pg_conninfo(), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        SQLBackend(url).close()

        def empty(tmp_path: Path) -> str:
            with psycopg.connect(_pg_conninfo(), autocommit=True) as conn:
                conn.execute(f'SET search_path TO "{schema}"')
                conn.execute("DELETE FROM polystore_upload_intents")
                conn.execute("DELETE FROM polystore_nodes WHERE id <> 0")
                conn.execute("DELETE FROM polystore_blobs")
            return url

        yield empty
    finally:
        with psycopg.connect(_pg_conninfo(), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


class PolystoreFixtures(AbstractFixtures):  # type: ignore[misc]
    @pytest.fixture
    def fs(
        self, fresh_catalog: Callable[[Path], str], tmp_path: Path
    ) -> Iterator[PolystoreFileSystem]:
        with PolystoreFileSystem(fresh_catalog(tmp_path)) as fs:
            yield fs

    @pytest.fixture
    def fs_join(self) -> Callable[..., str]:
        return lambda *parts: "/".join(parts)

    @pytest.fixture
    def fs_path(self) -> str:
        return "abstract"

    @pytest.fixture
    def supports_empty_directories(self) -> bool:
        return True  # the catalog has real directories


class TestPolystoreCopy(PolystoreFixtures, AbstractCopyTests):  # type: ignore[misc]
    pass


class TestPolystoreGet(PolystoreFixtures, AbstractGetTests):  # type: ignore[misc]
    pass


class TestPolystorePut(PolystoreFixtures, AbstractPutTests):  # type: ignore[misc]
    pass


class TestPolystoreOpen(PolystoreFixtures, AbstractOpenTests):  # type: ignore[misc]
    pass


class TestPolystorePipe(PolystoreFixtures, AbstractPipeTests):  # type: ignore[misc]
    pass
