"""The shipped conformance suite, run on the SQL backend over SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from polystore.backends.sql import SQLBackend
from polystore.testing import BackendTests


class TestSQLBackend(BackendTests):
    supports_attrs = True

    @pytest.fixture
    def backend(self, catalog_url: str) -> Iterator[SQLBackend]:
        backend = SQLBackend(catalog_url)
        yield backend
        backend.close()
