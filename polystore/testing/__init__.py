"""Conformance tests for storage backends, shipped for backend authors.

Subclass :class:`BackendTests` (read-write backends) or
:class:`ReadOnlyBackendTests` (read-only ones) in a pytest module, override the
``backend`` fixture, and tune the class attributes to what your backend offers::

    import pytest
    from polystore.testing import BackendTests

    class TestMyBackend(BackendTests):
        optional_operations = frozenset({"delete"})

        @pytest.fixture
        def backend(self, tmp_path):
            return MyBackend(tmp_path)

Every built-in backend runs this same suite. Importing this package needs
pytest and numpy; ``import polystore`` never imports it.
"""

from __future__ import annotations

from polystore.testing.read_only import ReadOnlyBackendTests
from polystore.testing.samples import (
    AWKWARD_NAMES,
    KIND_EXTENSIONS,
    assert_values_equal,
    long_names,
    samples,
)
from polystore.testing.suite import ALL_OPTIONAL_OPERATIONS, BackendTests

__all__ = [
    "ALL_OPTIONAL_OPERATIONS",
    "AWKWARD_NAMES",
    "KIND_EXTENSIONS",
    "BackendTests",
    "ReadOnlyBackendTests",
    "assert_values_equal",
    "long_names",
    "samples",
]
