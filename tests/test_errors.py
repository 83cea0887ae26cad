"""Every polystore error is a PolystoreError and, where one fits, its builtin twin."""

from __future__ import annotations

import builtins
import errno

import pytest

import polystore
from polystore import errors

TWINS = {
    errors.NotFoundError: FileNotFoundError,
    errors.AlreadyExistsError: FileExistsError,
    errors.IsADirectoryError: builtins.IsADirectoryError,
    errors.NotADirectoryError: builtins.NotADirectoryError,
    errors.ReadOnlyError: PermissionError,
    errors.InvalidPathError: ValueError,
    errors.SerializationError: TypeError,
    errors.StorageFullError: OSError,
    errors.BackendNotFoundError: KeyError,
    errors.BackendConfigError: TypeError,
    errors.BackendUnavailableError: ConnectionError,
    errors.UnsupportedOperationError: NotImplementedError,
}
WITHOUT_TWIN = [
    errors.ConflictError,
    errors.DuplicateBackendError,
    errors.IntegrityError,
    errors.SchemaVersionError,
]
#: Refinements of another polystore error (and so of its builtin twin, if any).
REFINEMENTS = {errors.CatalogDamagedError: errors.IntegrityError}


@pytest.mark.parametrize(("error", "twin"), TWINS.items(), ids=lambda e: e.__name__)
def test_subclasses_root_and_builtin_twin(error: type[Exception], twin: type[Exception]) -> None:
    assert issubclass(error, errors.PolystoreError)
    assert issubclass(error, twin)
    with pytest.raises(twin):
        raise error("message")


@pytest.mark.parametrize("error", WITHOUT_TWIN, ids=lambda e: e.__name__)
def test_errors_without_twin(error: type[Exception]) -> None:
    assert issubclass(error, errors.PolystoreError)
    assert error.__bases__ == (errors.PolystoreError,)


@pytest.mark.parametrize(("error", "parent"), REFINEMENTS.items(), ids=lambda e: e.__name__)
def test_refinements(error: type[Exception], parent: type[Exception]) -> None:
    assert error.__bases__ == (parent,)
    with pytest.raises(parent):
        raise error("message")


def test_every_error_is_covered_and_exported() -> None:
    classes = {getattr(errors, name) for name in errors.__all__} - {errors.PolystoreError}
    assert classes == set(TWINS) | set(WITHOUT_TWIN) | set(REFINEMENTS)
    for name in errors.__all__:
        assert getattr(polystore, name) is getattr(errors, name)
    assert issubclass(errors.PolystoreError, Exception)


def test_os_errors_carry_errno_and_filename() -> None:
    error = errors.NotFoundError(errno.ENOENT, "No such file or directory", "a/b.npy")
    assert (error.errno, error.filename) == (errno.ENOENT, "a/b.npy")
    assert str(error) == "[Errno 2] No such file or directory: 'a/b.npy'"


def test_backend_not_found_reads_as_a_message() -> None:
    # KeyError would show the repr, quotes and all.
    assert str(errors.BackendNotFoundError("no backend named 'x'")) == "no backend named 'x'"
    assert str(errors.BackendNotFoundError()) == ""
