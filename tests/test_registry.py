"""Auto-registration of backend classes and the BackendRegistry mapping."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from polystore import (
    BackendConfigError,
    BackendNotFoundError,
    BackendRegistry,
    DiskBackend,
    DuplicateBackendError,
    MemoryBackend,
    StorageBackend,
)
from polystore.backends.base import registered_backend_classes

# Classes a test defines register globally; the conftest fixture forgets them.
pytestmark = pytest.mark.usefixtures("isolated_backend_classes")


class DictBackend(StorageBackend):
    """A minimal concrete backend (not registered: no _backend_type of its own)."""

    def __init__(self) -> None:
        self.files: dict[str, Any] = {}

    def save(self, data: Any, file_path: str, **kwargs: Any) -> None:
        self.files[file_path] = data

    def load(self, file_path: str, **kwargs: Any) -> Any:
        return self.files[file_path]

    def list_files(self, directory: str, **kwargs: Any) -> list[str]:
        return sorted(self.files)

    def exists(self, path: str) -> bool:
        return path in self.files

    def is_file(self, path: str) -> bool:
        return path in self.files

    def is_dir(self, path: str) -> bool:
        return False

    def list_dir(self, path: str) -> list[str]:
        return sorted(self.files)


# -- auto-registration ----------------------------------------------------------------


def test_builtins_are_registered() -> None:
    classes = registered_backend_classes()
    assert classes["memory"] is MemoryBackend
    assert classes["disk"] is DiskBackend
    assert "dict" not in classes
    assert DictBackend not in classes.values()


def test_concrete_class_registers_on_definition() -> None:
    class Concrete(DictBackend):
        _backend_type = "concrete"

    assert registered_backend_classes()["concrete"] is Concrete
    assert "concrete" in BackendRegistry()


def test_abstract_class_is_skipped() -> None:
    class Abstract(StorageBackend):
        _backend_type = "abstract"

        def save(self, data: Any, file_path: str, **kwargs: Any) -> None:
            pass

    assert "abstract" not in registered_backend_classes()
    assert "abstract" not in BackendRegistry()

    class Completed(DictBackend, Abstract):  # concrete, but the key is not its own
        pass

    assert "abstract" not in registered_backend_classes()

    class CompletedWithKey(DictBackend, Abstract):
        _backend_type = "abstract"

    assert registered_backend_classes()["abstract"] is CompletedWithKey


def test_subclass_without_its_own_key_does_not_take_over() -> None:
    class Custom(MemoryBackend):
        pass

    assert registered_backend_classes()["memory"] is MemoryBackend


def test_duplicate_key_from_a_different_class() -> None:
    class First(DictBackend):
        _backend_type = "dup"

    with pytest.raises(DuplicateBackendError, match=r"'dup' is already registered by .*First"):

        class Second(DictBackend):
            _backend_type = "dup"

    assert registered_backend_classes()["dup"] is First
    with pytest.raises(DuplicateBackendError):

        class NotMemory(DictBackend):
            _backend_type = "memory"


def test_redefinition_with_same_module_and_qualname_replaces() -> None:
    def define(marker: int) -> type[StorageBackend]:
        class Notebook(DictBackend):
            _backend_type = "notebook"
            version = marker

        return Notebook

    first = define(1)
    second = define(2)
    assert first is not second
    assert registered_backend_classes()["notebook"] is second


@pytest.mark.parametrize("key", ["", 3])
def test_backend_type_must_be_a_non_empty_str(key: object) -> None:
    with pytest.raises(TypeError, match="non-empty str"):
        type("Bad", (DictBackend,), {"_backend_type": key})


def test_url_like_backend_type_is_refused() -> None:
    with pytest.raises(ValueError, match="URL"):
        type("Bad", (DictBackend,), {"_backend_type": "my://thing"})


# -- the registry -------------------------------------------------------------------------


def test_building_a_registry_constructs_nothing() -> None:
    built: list[object] = []

    class Counted(DictBackend):
        _backend_type = "counted"

        def __init__(self) -> None:
            super().__init__()
            built.append(self)

    registry = BackendRegistry()
    assert "counted" in registry
    assert "counted" in list(registry)
    assert built == []
    first = registry["counted"]
    assert built == [first]
    assert registry["counted"] is first, "instances are cached"
    other = BackendRegistry()["counted"]
    assert other is not first, "each registry caches its own instances"
    assert len(built) == 2


def test_membership_does_not_import_the_sql_backend() -> None:
    code = textwrap.dedent(
        """
        import sys
        from polystore import BackendRegistry

        registry = BackendRegistry()
        assert "sql" in registry
        assert "sql" in registry.available()
        assert "sqlite:///anything.db" in registry
        assert "sqlalchemy" not in sys.modules, "membership imported SQLAlchemy"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_class_needing_arguments() -> None:
    class NeedsURL(DictBackend):
        _backend_type = "needs_url"

        def __init__(self, url: str) -> None:
            super().__init__()
            self.url = url

    registry = BackendRegistry()
    assert "needs_url" in registry
    with pytest.raises(BackendConfigError) as info:
        registry["needs_url"]
    message = str(info.value)
    assert "registry['needs_url'] = NeedsURL(...)" in message
    assert "registry.register('needs_url', backend)" in message
    assert isinstance(info.value, TypeError)
    registry["needs_url"] = NeedsURL("http://example.invalid")
    backend = registry["needs_url"]
    assert isinstance(backend, NeedsURL)
    assert backend.url == "http://example.invalid"


def test_unknown_key_lists_what_is_available() -> None:
    registry = BackendRegistry()
    registry.register("mine", DictBackend())
    with pytest.raises(BackendNotFoundError) as info:
        registry["nope"]
    message = str(info.value)
    assert "no backend named 'nope'" in message
    for key in ("disk", "memory", "mine", "sql"):
        assert key in message
    assert isinstance(info.value, KeyError)
    assert "nope" not in registry
    assert registry.get("nope") is None
    assert 3 not in registry


def test_register_setitem_delitem() -> None:
    registry = BackendRegistry({"a": DictBackend()})
    b = DictBackend()
    registry["b"] = b
    c = DictBackend()
    registry.register("c", c)
    assert registry["b"] is b
    assert registry["c"] is c
    assert {"a", "b", "c", "memory", "disk", "sql"} <= set(registry)
    assert len(registry) == len(registry.available())
    del registry["b"]
    assert "b" not in registry
    with pytest.raises(BackendNotFoundError):
        del registry["b"]
    replacement = MemoryBackend()
    registry["memory"] = replacement  # an instance shadows the class key
    assert registry["memory"] is replacement
    del registry["memory"]
    fresh = registry["memory"]
    assert isinstance(fresh, MemoryBackend)
    assert fresh is not replacement


def test_register_refuses_classes_and_bad_names() -> None:
    registry = BackendRegistry()
    with pytest.raises(TypeError, match=r"register an instance, not the class"):
        registry.register("m", MemoryBackend)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="non-empty str"):
        registry.register("", MemoryBackend())


def test_close_closes_only_what_the_registry_built() -> None:
    closed: list[str] = []

    class Closing(DictBackend):
        _backend_type = "closing"

        def close(self) -> None:
            closed.append("built")

    class ByHand(DictBackend):
        def close(self) -> None:
            closed.append("by hand")

    with BackendRegistry({"hand": ByHand()}) as registry:
        registry["closing"]
    assert closed == ["built"]


# -- entry points ---------------------------------------------------------------------------


def _entry_point(name: str, value: str) -> importlib.metadata.EntryPoint:
    return importlib.metadata.EntryPoint(name=name, value=value, group="polystore.backends")


@pytest.fixture
def plugin_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An importable module ``fake_plugin`` defining two backends."""
    (tmp_path / "fake_plugin.py").write_text(
        textwrap.dedent(
            """
            from polystore import MemoryBackend

            class SelfRegistering(MemoryBackend):
                _backend_type = "self_registering"

            class Unkeyed(MemoryBackend):
                '''No _backend_type: the entry point's name becomes its key.'''
            """
        ),
        "utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("fake_plugin", None)


def test_entry_points_are_loaded_on_a_miss(
    plugin_module: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def fake_entry_points(*, group: str) -> list[importlib.metadata.EntryPoint]:
        calls.append(group)
        return [
            _entry_point("whatever", "fake_plugin"),
            _entry_point("unkeyed", "fake_plugin:Unkeyed"),
        ]

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    registry = BackendRegistry()
    assert isinstance(registry["memory"], MemoryBackend)
    assert calls == [], "entry points are not read while every key is known"
    assert "self_registering" in registry
    assert calls == ["polystore.backends"]
    assert type(registry["self_registering"]).__name__ == "SelfRegistering"
    assert type(registry["unkeyed"]).__name__ == "Unkeyed"
    assert "nope" not in registry
    assert calls == ["polystore.backends"], "entry points are read once per registry"


def test_entry_points_from_an_installed_distribution(plugin_module: Path) -> None:
    """A real (fake) distribution on sys.path, found by importlib.metadata itself."""
    dist = plugin_module / "polystore_fake_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: polystore-fake-plugin\nVersion: 1.0\n", "utf-8"
    )
    (dist / "entry_points.txt").write_text(
        "[polystore.backends]\nfake_unkeyed = fake_plugin:Unkeyed\n", "utf-8"
    )
    registry = BackendRegistry()
    assert "fake_unkeyed" in registry.available()
    assert type(registry["fake_unkeyed"]).__name__ == "Unkeyed"
    assert "self_registering" in registry  # importing the module registered it too
