"""fsspec's own conformance suite (``fsspec.tests.abstract``) on a polystore catalog.

Copy, get, put, open and pipe, each on SQLite and PostgreSQL, nothing skipped
(``docs/ecosystem.rst`` says which of fsspec's suites do not apply, and why).
Each test gets a fresh, empty catalog, made cheaply: a copy of a migrated
SQLite file, or a PostgreSQL schema migrated once per module and emptied
before each test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fsspec.tests.abstract import (
    AbstractCopyTests,
    AbstractFixtures,
    AbstractGetTests,
    AbstractOpenTests,
    AbstractPipeTests,
    AbstractPutTests,
)

from polystore.fsspec import PolystoreFileSystem


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
