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

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from polystore.backends.sql import SQLBackend
from polystore.blobs import BlobStore, LocalBlobStore
from polystore.testing import BackendTests

#: Values over 8 bytes go to the external store.
INLINE_LIMIT = 8


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
