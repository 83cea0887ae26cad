"""The shipped conformance suite, run with each external blob store.

A tiny ``inline_limit`` sends most of the suite's values to the external store
(a local directory, or S3 on a moto server), the smallest stay inline, so every
operation of the suite meets both placements. After each test the catalog and
its store must agree both ways (``fsck(verify=True)``) with no upload left
pending: every save, overwrite, copy, move, delete and rollback of the suite
kept its content exactly.

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

from polystore.backends.sql import SQLBackend
from polystore.blobs import BlobStore, LocalBlobStore
from polystore.testing import BackendTests

#: Values over 8 bytes go to the external store.
INLINE_LIMIT = 8


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

    schema = f"ps_conf_{uuid.uuid4().hex[:12]}"
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


class _WithBlobStore(BackendTests):
    supports_attrs = True

    def blob_store(self, request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
        raise NotImplementedError

    @pytest.fixture
    def backend(
        self,
        fresh_catalog: Callable[[Path], str],
        request: pytest.FixtureRequest,
        tmp_path: Path,
    ) -> Iterator[SQLBackend]:
        store = self.blob_store(request, tmp_path)
        backend = SQLBackend(fresh_catalog(tmp_path), blob_store=store, inline_limit=INLINE_LIMIT)
        yield backend
        report = backend.fsck(verify=True)
        backend.close()
        assert report.ok, str(report)
        assert report.pending_uploads == 0, str(report)


class TestSQLBackendWithLocalStore(_WithBlobStore):
    def blob_store(self, request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
        return LocalBlobStore(tmp_path / "blobs", fsync=False)  # speed; fsync is tested elsewhere


class TestSQLBackendWithS3Store(_WithBlobStore):
    def blob_store(self, request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
        store = request.getfixturevalue("s3_store")
        assert isinstance(store, BlobStore)
        return store
