"""Every example of the seed guide, custom-backends.rst, run as a user would paste it.

The seed code is kept verbatim in strings (its own style, not ours) and run with
``exec`` in a fresh namespace. Where the guide leaves a gap ("# Implement required
methods..."), a second string fills it in the way a user would, keeping the seed
lines as they are. The HTTP example talks to a local ``http.server``.
"""

from __future__ import annotations

import gzip
import http.server
import importlib
import sys
import textwrap
import threading
import tomllib
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import polystore
from polystore import (
    BackendConfigError,
    BackendNotFoundError,
    BackendRegistry,
    FileManager,
    MemoryBackend,
    ReadOnlyError,
    StorageBackend,
    paths,
)
from polystore.backends.base import registered_backend_classes
from polystore.errors import NotADirectoryError as PolystoreNotADirectoryError
from polystore.errors import NotFoundError, SerializationError
from polystore.testing import BackendTests

# Classes a test defines register globally; the conftest fixture forgets them.
pytestmark = pytest.mark.usefixtures("isolated_backend_classes")


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Seed backends write relative to the working directory: make that a temp dir."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_seed(code: str, **names: Any) -> dict[str, Any]:
    """Run a seed code block as a user's script would; return its namespace."""
    namespace: dict[str, Any] = {"__name__": "seed_example", **names}
    exec(textwrap.dedent(code), namespace)  # noqa: S102 -- running the guide's examples is the point
    return namespace


# -- Basic Backend ----------------------------------------------------------------------

SEED_JSON_BACKEND = """
from polystore import StorageBackend
import json
from pathlib import Path

class JSONStorageBackend(StorageBackend):
    \"\"\"Backend that stores everything as JSON.\"\"\"
    
    _backend_type = 'json_storage'  # Auto-registration key
    
    def __init__(self, base_dir="./json_storage"):
        self.base_dir = Path(base_dir)
        self.base_dir.mkdir(parents=True, exist_ok=True)
    
    def save(self, data, file_path, **kwargs):
        \"\"\"Save data as JSON.\"\"\"
        full_path = self.base_dir / file_path
        full_path.parent.mkdir(parents=True, exist_ok=True)
        
        with open(full_path, 'w') as f:
            json.dump(data, f, indent=2)
    
    def load(self, file_path, **kwargs):
        \"\"\"Load data from JSON.\"\"\"
        full_path = self.base_dir / file_path
        
        if not full_path.exists():
            raise FileNotFoundError(f"File not found: {file_path}")
        
        with open(full_path, 'r') as f:
            return json.load(f)
    
    def save_batch(self, data_list, output_paths, **kwargs):
        \"\"\"Save multiple files.\"\"\"
        for data, path in zip(data_list, output_paths):
            self.save(data, path, **kwargs)
    
    def load_batch(self, file_paths, **kwargs):
        \"\"\"Load multiple files.\"\"\"
        return [self.load(path, **kwargs) for path in file_paths]
    
    def list_files(self, directory, pattern=None, 
                  extensions=None, recursive=False, **kwargs):
        \"\"\"List files in directory.\"\"\"
        dir_path = self.base_dir / directory
        
        if not dir_path.exists():
            return []
        
        if recursive:
            files = dir_path.rglob("*.json")
        else:
            files = dir_path.glob("*.json")
        
        return [str(f.relative_to(self.base_dir)) for f in files]
    
    def exists(self, path):
        \"\"\"Check if path exists.\"\"\"
        return (self.base_dir / path).exists()
    
    def is_file(self, path):
        \"\"\"Check if path is a file.\"\"\"
        return (self.base_dir / path).is_file()
    
    def is_dir(self, path):
        \"\"\"Check if path is a directory.\"\"\"
        return (self.base_dir / path).is_dir()
    
    def list_dir(self, path):
        \"\"\"List directory entries.\"\"\"
        dir_path = self.base_dir / path
        if not dir_path.is_dir():
            raise NotADirectoryError(f"Not a directory: {path}")
        return [f.name for f in dir_path.iterdir()]
"""

SEED_JSON_USAGE = """
from polystore import BackendRegistry, FileManager

# Backend is auto-registered
registry = BackendRegistry()
fm = FileManager(registry)

# Use the custom backend
data = {"key": "value", "count": 42}
fm.save(data, "config.json", backend="json_storage")

loaded = fm.load("config.json", backend="json_storage")
print(loaded)  # {'key': 'value', 'count': 42}
"""


def test_json_storage_backend(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ns = run_seed(SEED_JSON_BACKEND)
    assert registered_backend_classes()["json_storage"] is ns["JSONStorageBackend"]
    usage = run_seed(SEED_JSON_USAGE)
    assert capsys.readouterr().out == "{'key': 'value', 'count': 42}\n"
    assert (in_tmp / "json_storage" / "config.json").is_file()
    fm = usage["fm"]
    assert isinstance(fm.registry["json_storage"], ns["JSONStorageBackend"])
    fm.save([1, 2], "/nested/./list.json", backend="json_storage")
    assert fm.list_files("nested", backend="json_storage") == ["nested/list.json"]
    assert fm.list_dir("", backend="json_storage") == ["config.json", "nested"]
    with pytest.raises(FileNotFoundError):
        fm.load("missing.json", backend="json_storage")


# -- Read-Only Backend ------------------------------------------------------------------

SEED_HTTP_BACKEND = """
from polystore import ReadOnlyBackend
import requests

class HTTPBackend(ReadOnlyBackend):
    \"\"\"Read-only backend for HTTP resources.\"\"\"
    
    _backend_type = 'http'
    
    def __init__(self, base_url):
        self.base_url = base_url.rstrip('/')
    
    def load(self, file_path, **kwargs):
        \"\"\"Load data from HTTP.\"\"\"
        url = f"{self.base_url}/{file_path}"
        response = requests.get(url)
        response.raise_for_status()
        return response.content
    
    def load_batch(self, file_paths, **kwargs):
        \"\"\"Load multiple files.\"\"\"
        return [self.load(path, **kwargs) for path in file_paths]
    
    def list_files(self, directory, **kwargs):
        \"\"\"List files (not implemented for HTTP).\"\"\"
        raise NotImplementedError("HTTP backend doesn't support listing")
    
    def exists(self, path):
        \"\"\"Check if resource exists.\"\"\"
        url = f"{self.base_url}/{path}"
        response = requests.head(url)
        return response.status_code == 200
    
    def is_file(self, path):
        \"\"\"Always true for HTTP resources.\"\"\"
        return self.exists(path)
    
    def is_dir(self, path):
        \"\"\"Always false for HTTP.\"\"\"
        return False
    
    def list_dir(self, path):
        \"\"\"Not supported.\"\"\"
        raise NotImplementedError()
"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 -- the base's name
        pass


@pytest.fixture
def http_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A local HTTP server on 127.0.0.1 serving a temp directory: (base URL, directory)."""
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    served = tmp_path / "served"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(_QuietHandler, directory=str(served))
    )
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_http_read_only_backend(http_root: tuple[str, Path]) -> None:
    import requests

    url, served = http_root
    (served / "data").mkdir()
    (served / "data" / "hello.bin").write_bytes(b"hello")
    (served / "data" / "img.npy").write_bytes(b"\x93NUMPY fake")
    ns = run_seed(SEED_HTTP_BACKEND)
    HTTPBackend = ns["HTTPBackend"]
    assert registered_backend_classes()["http"] is HTTPBackend

    registry = BackendRegistry()
    assert "http" in registry
    with pytest.raises(BackendConfigError, match=r"registry\['http'\] = HTTPBackend\(\.\.\.\)"):
        registry["http"]
    registry["http"] = HTTPBackend(url)
    fm = FileManager(registry, default_backend="http")

    assert fm.load("/data/hello.bin") == b"hello"
    assert fm.load_batch(["data/hello.bin", "data/img.npy"]) == [b"hello", b"\x93NUMPY fake"]
    assert fm.exists("data/hello.bin")
    assert fm.is_file("data/hello.bin")
    assert not fm.exists("data/missing.bin")
    assert not fm.is_dir("data")
    with pytest.raises(requests.HTTPError, match="404"):
        fm.load("data/missing.bin")  # the user's own error passes through unchanged
    with pytest.raises(NotImplementedError, match="doesn't support listing"):
        fm.list_files("data")
    for write in (
        lambda: fm.save(b"x", "data/new.bin"),
        lambda: fm.save_batch([b"x"], ["data/new.bin"]),
        lambda: fm.delete("data/hello.bin"),
        lambda: fm.move("data/hello.bin", "data/moved.bin"),
        lambda: fm.copy("data/hello.bin", "data/copy.bin"),
        lambda: fm.ensure_directory("data/sub"),
    ):
        with pytest.raises(ReadOnlyError, match="HTTPBackend is read-only"):
            write()
    assert sorted(p.name for p in (served / "data").iterdir()) == ["hello.bin", "img.npy"]


# -- Context Manager Support ------------------------------------------------------------

SEED_TEMPORARY_BACKEND = """
from polystore import StorageBackend
import tempfile
import shutil

class TemporaryBackend(StorageBackend):
    \"\"\"Backend with automatic cleanup.\"\"\"
    
    _backend_type = 'temporary'
    
    def __init__(self):
        self.temp_dir = None
    
    def __enter__(self):
        self.temp_dir = tempfile.mkdtemp()
        return self
    
    def __exit__(self, exc_type, exc_val, exc_tb):
        if self.temp_dir:
            shutil.rmtree(self.temp_dir)
    
    # Implement required methods...
"""

# The user's completed copy: the seed lines, then the required methods, which
# hand the work to a DiskBackend rooted in the temporary directory.
TEMPORARY_BACKEND_COMPLETED = (
    SEED_TEMPORARY_BACKEND
    + """
    def _disk(self):
        from polystore import DiskBackend
        return DiskBackend(self.temp_dir)

    def save(self, data, file_path, **kwargs):
        self._disk().save(data, file_path, **kwargs)

    def load(self, file_path, **kwargs):
        return self._disk().load(file_path, **kwargs)

    def list_files(self, directory, **kwargs):
        return self._disk().list_files(directory, **kwargs)

    def exists(self, path):
        return self._disk().exists(path)

    def is_file(self, path):
        return self._disk().is_file(path)

    def is_dir(self, path):
        return self._disk().is_dir(path)

    def list_dir(self, path):
        return self._disk().list_dir(path)
"""
)

SEED_TEMPORARY_USAGE = """
with TemporaryBackend() as backend:
    registry = {'temp': backend}
    fm = FileManager(registry)
    
    fm.save(data, "temp_file.npy", backend="temp")
    # Files automatically cleaned up on exit
"""


def test_temporary_backend_as_written_is_abstract() -> None:
    ns = run_seed(SEED_TEMPORARY_BACKEND)
    assert "temporary" not in registered_backend_classes()
    assert "temporary" not in BackendRegistry()
    with pytest.raises(TypeError, match="abstract"):
        ns["TemporaryBackend"]()


def test_temporary_backend_completed() -> None:
    data = np.arange(10.0)
    ns = run_seed(TEMPORARY_BACKEND_COMPLETED)
    TemporaryBackend = ns["TemporaryBackend"]
    assert registered_backend_classes()["temporary"] is TemporaryBackend
    usage = run_seed(
        SEED_TEMPORARY_USAGE + "    seen = fm.load('temp_file.npy', backend='temp')\n",
        TemporaryBackend=TemporaryBackend,
        FileManager=FileManager,
        data=data,
    )
    np.testing.assert_array_equal(usage["seen"], data)
    temp_dir = Path(usage["backend"].temp_dir)
    assert not temp_dir.exists(), "files were not cleaned up on exit"


# -- Compression Support ----------------------------------------------------------------

SEED_COMPRESSED_BACKEND = """
from polystore import StorageBackend
import gzip
import pickle

class CompressedBackend(StorageBackend):
    \"\"\"Backend with automatic compression.\"\"\"
    
    _backend_type = 'compressed'
    
    def save(self, data, file_path, **kwargs):
        \"\"\"Save with compression.\"\"\"
        with gzip.open(file_path, 'wb') as f:
            pickle.dump(data, f)
    
    def load(self, file_path, **kwargs):
        \"\"\"Load with decompression.\"\"\"
        with gzip.open(file_path, 'rb') as f:
            return pickle.load(f)
    
    # Implement other required methods...
"""

COMPRESSED_BACKEND_COMPLETED = (
    SEED_COMPRESSED_BACKEND
    + """
    def list_files(self, directory, pattern=None, extensions=None, recursive=False, **kwargs):
        import os
        from polystore.paths import match_name
        root = directory or "."
        return sorted(
            os.path.join(directory, name) if directory else name
            for name in os.listdir(root)
            if os.path.isfile(os.path.join(root, name)) and match_name(name, pattern, extensions)
        )

    def exists(self, path):
        import os
        return os.path.exists(path or ".")

    def is_file(self, path):
        import os
        return os.path.isfile(path or ".")

    def is_dir(self, path):
        import os
        return os.path.isdir(path or ".")

    def list_dir(self, path):
        import os
        return sorted(os.listdir(path or "."))
"""
)


def test_compressed_backend(in_tmp: Path) -> None:
    ns = run_seed(SEED_COMPRESSED_BACKEND)
    assert "compressed" not in registered_backend_classes()
    with pytest.raises(BackendNotFoundError):
        BackendRegistry()["compressed"]

    ns = run_seed(COMPRESSED_BACKEND_COMPLETED)
    registry = BackendRegistry()
    assert isinstance(registry["compressed"], ns["CompressedBackend"])
    fm = FileManager(registry, default_backend="compressed")
    array = np.arange(1000) % 7
    fm.save(array, "arr.pkl.gz")
    raw = (in_tmp / "arr.pkl.gz").read_bytes()
    assert raw[:2] == b"\x1f\x8b", "not gzip"
    assert len(raw) < array.nbytes
    np.testing.assert_array_equal(fm.load("arr.pkl.gz"), array)
    with gzip.open(in_tmp / "arr.pkl.gz") as fh:  # plain gzip + pickle, readable elsewhere
        np.testing.assert_array_equal(np.load(fh, allow_pickle=True), array)
    assert fm.list_files(extensions={".GZ"}) == ["arr.pkl.gz"]


# -- Caching Layer ----------------------------------------------------------------------

SEED_CACHED_BACKEND = """
from polystore import StorageBackend
from functools import lru_cache

class CachedBackend(StorageBackend):
    \"\"\"Backend with LRU cache.\"\"\"
    
    _backend_type = 'cached'
    
    def __init__(self, wrapped_backend, cache_size=128):
        self.backend = wrapped_backend
        self._cached_load = lru_cache(maxsize=cache_size)(
            self._do_load
        )
    
    def _do_load(self, file_path):
        \"\"\"Actual load operation.\"\"\"
        return self.backend.load(file_path)
    
    def load(self, file_path, **kwargs):
        \"\"\"Load with caching.\"\"\"
        return self._cached_load(file_path)
    
    def save(self, data, file_path, **kwargs):
        \"\"\"Save (invalidates cache).\"\"\"
        self.backend.save(data, file_path, **kwargs)
        # Clear cache entry if it exists
        try:
            self._cached_load.cache_clear()
        except AttributeError:
            pass
    
    # Delegate other methods to wrapped backend...
"""

CACHED_BACKEND_COMPLETED = (
    SEED_CACHED_BACKEND
    + """
    def list_files(self, directory, **kwargs):
        return self.backend.list_files(directory, **kwargs)

    def exists(self, path):
        return self.backend.exists(path)

    def is_file(self, path):
        return self.backend.is_file(path)

    def is_dir(self, path):
        return self.backend.is_dir(path)

    def list_dir(self, path):
        return self.backend.list_dir(path)
"""
)


def test_cached_backend() -> None:
    run_seed(SEED_CACHED_BACKEND)
    assert "cached" not in registered_backend_classes()

    CachedBackend = run_seed(CACHED_BACKEND_COMPLETED)["CachedBackend"]
    registry = BackendRegistry()
    assert "cached" in registry
    with pytest.raises(BackendConfigError) as info:
        registry["cached"]
    assert "registry['cached'] = CachedBackend(...)" in str(info.value)
    assert "registry.register('cached', backend)" in str(info.value)

    wrapped = MemoryBackend()
    registry.register("cached", CachedBackend(wrapped, cache_size=4))
    fm = FileManager(registry, default_backend="cached")
    fm.save(b"v1", "k.bin")
    assert fm.load("k.bin") == b"v1"
    wrapped.save(b"v2", "k.bin")  # behind the cache's back
    assert fm.load("k.bin") == b"v1", "served from the cache"
    fm.save(b"v3", "k.bin")  # through the cache: invalidates it
    assert fm.load("k.bin") == b"v3"
    assert fm.list_files("") == ["k.bin"]
    assert fm.is_dir("")


# -- Database Backend Example -----------------------------------------------------------

SEED_SQLITE_BACKEND = """
from polystore import StorageBackend
import sqlite3
import pickle
from pathlib import Path

class SQLiteBackend(StorageBackend):
    \"\"\"Backend using SQLite for storage.\"\"\"
    
    _backend_type = 'sqlite'
    
    def __init__(self, db_path="polystore.db"):
        self.db_path = db_path
        self._init_db()
    
    def _init_db(self):
        \"\"\"Initialize database schema.\"\"\"
        conn = sqlite3.connect(self.db_path)
        conn.execute('''
            CREATE TABLE IF NOT EXISTS files (
                path TEXT PRIMARY KEY,
                data BLOB NOT NULL,
                created TIMESTAMP DEFAULT CURRENT_TIMESTAMP
            )
        ''')
        conn.commit()
        conn.close()
    
    def save(self, data, file_path, **kwargs):
        \"\"\"Save data to database.\"\"\"
        conn = sqlite3.connect(self.db_path)
        serialized = pickle.dumps(data)
        
        conn.execute(
            'INSERT OR REPLACE INTO files (path, data) VALUES (?, ?)',
            (str(file_path), serialized)
        )
        conn.commit()
        conn.close()
    
    def load(self, file_path, **kwargs):
        \"\"\"Load data from database.\"\"\"
        conn = sqlite3.connect(self.db_path)
        cursor = conn.execute(
            'SELECT data FROM files WHERE path = ?',
            (str(file_path),)
        )
        row = cursor.fetchone()
        conn.close()
        
        if not row:
            raise FileNotFoundError(f"File not found: {file_path}")
        
        return pickle.loads(row[0])
    
    def save_batch(self, data_list, output_paths, **kwargs):
        \"\"\"Batch save.\"\"\"
        conn = sqlite3.connect(self.db_path)
        for data, path in zip(data_list, output_paths):
            serialized = pickle.dumps(data)
            conn.execute(
                'INSERT OR REPLACE INTO files (path, data) VALUES (?, ?)',
                (str(path), serialized)
            )
        conn.commit()
        conn.close()
    
    def load_batch(self, file_paths, **kwargs):
        \"\"\"Batch load.\"\"\"
        conn = sqlite3.connect(self.db_path)
        results = []
        for path in file_paths:
            cursor = conn.execute(
                'SELECT data FROM files WHERE path = ?',
                (str(path),)
            )
            row = cursor.fetchone()
            if not row:
                raise FileNotFoundError(f"File not found: {path}")
            results.append(pickle.loads(row[0]))
        conn.close()
        return results
    
    def list_files(self, directory, **kwargs):
        \"\"\"List files in directory.\"\"\"
        conn = sqlite3.connect(self.db_path)
        pattern = f"{directory}/%"
        cursor = conn.execute(
            'SELECT path FROM files WHERE path LIKE ?',
            (pattern,)
        )
        files = [row[0] for row in cursor.fetchall()]
        conn.close()
        return files
    
    def exists(self, path):
        \"\"\"Check if path exists.\"\"\"
        conn = sqlite3.connect(self.db_path)
        cursor = conn.execute(
            'SELECT 1 FROM files WHERE path = ?',
            (str(path),)
        )
        exists = cursor.fetchone() is not None
        conn.close()
        return exists
    
    def is_file(self, path):
        \"\"\"Check if path is a file.\"\"\"
        return self.exists(path)
    
    def is_dir(self, path):
        \"\"\"Directories don't exist in flat database.\"\"\"
        return False
    
    def list_dir(self, path):
        \"\"\"List directory entries.\"\"\"
        return self.list_files(path)
"""


def test_user_sqlite_backend(in_tmp: Path) -> None:
    SQLiteBackend = run_seed(SEED_SQLITE_BACKEND)["SQLiteBackend"]
    registry = BackendRegistry()
    assert "sqlite" in registry, "'sqlite' is the user's key; polystore's are memory, disk, sql"
    fm = FileManager(registry, default_backend="sqlite")
    assert isinstance(fm.get_backend(), SQLiteBackend)
    fm.save({"a": np.arange(3)}, "plate/x.pkl")
    fm.save_batch(["one", "two"], ["plate/1.pkl", "other/2.pkl"])
    loaded = fm.load("plate/x.pkl")
    np.testing.assert_array_equal(loaded["a"], np.arange(3))
    assert fm.load_batch(["plate/1.pkl", "other/2.pkl"]) == ["one", "two"]
    assert fm.list_files("plate") == ["plate/1.pkl", "plate/x.pkl"]
    assert fm.exists("plate/x.pkl")
    assert not fm.exists("plate/missing.pkl")
    with pytest.raises(FileNotFoundError, match=r"File not found: plate/missing\.pkl"):
        fm.load("plate/missing.pkl")
    assert (in_tmp / "polystore.db").is_file()

    # A database URL is a different key: it opens polystore's own catalog backend.
    catalog = registry[f"sqlite:///{in_tmp}/catalog.db"]
    assert isinstance(catalog, polystore.SQLBackend)
    assert catalog is not fm.get_backend()
    registry.close()


# -- Testing Your Backend, Publishing Your Backend --------------------------------------

# my_package/__init__.py: the guide's publishing example, "# Implementation..."
# filled in, plus the MyCustomBackend that the testing example imports.
MY_PACKAGE = """
# my_package/__init__.py
from polystore import StorageBackend

class MyBackend(StorageBackend):
    _backend_type = 'mybackend'
    # Implementation...
    def __init__(self):
        self._files = {}

    def save(self, data, file_path, **kwargs):
        import copy
        self._files[file_path] = copy.deepcopy(data)

    def load(self, file_path, **kwargs):
        import copy
        if file_path not in self._files:
            raise FileNotFoundError(f"File not found: {file_path}")
        return copy.deepcopy(self._files[file_path])

    def list_files(self, directory, **kwargs):
        prefix = f"{directory}/" if directory else ""
        return sorted(p for p in self._files if p.startswith(prefix))

    def exists(self, path):
        return path in self._files

    def is_file(self, path):
        return path in self._files

    def is_dir(self, path):
        return False

    def list_dir(self, path):
        return [p.rsplit("/", 1)[-1] for p in self.list_files(path)]


class MyCustomBackend(MyBackend):
    \"\"\"The name the testing guide imports (no key of its own: not registered).\"\"\"

__all__ = ['MyBackend']
"""

SEED_PYPROJECT = """
[project]
name = "polystore-mybackend"
version = "0.1.0"
dependencies = [
    "polystore>=0.1.0",
    # Your backend's dependencies
]
"""

SEED_PUBLISHED_USAGE = """
import my_package  # Imports and registers backend
from polystore import BackendRegistry, FileManager

registry = BackendRegistry()
assert 'mybackend' in registry  # Auto-registered!
"""

SEED_TESTING = """
import pytest
import numpy as np
from my_package import MyCustomBackend

class TestMyCustomBackend:
    def setup_method(self):
        self.backend = MyCustomBackend()
    
    def test_save_and_load(self):
        data = np.array([1, 2, 3])
        self.backend.save(data, "test.npy")
        loaded = self.backend.load("test.npy")
        np.testing.assert_array_equal(data, loaded)
    
    def test_batch_operations(self):
        data_list = [np.array([i]) for i in range(3)]
        paths = [f"test{i}.npy" for i in range(3)]
        
        self.backend.save_batch(data_list, paths)
        loaded_list = self.backend.load_batch(paths)
        
        for original, loaded in zip(data_list, loaded_list):
            np.testing.assert_array_equal(original, loaded)
    
    def test_file_not_found(self):
        with pytest.raises(FileNotFoundError):
            self.backend.load("nonexistent.npy")
"""


@pytest.fixture
def my_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    package = tmp_path / "site" / "my_package"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(MY_PACKAGE, "utf-8")
    monkeypatch.syspath_prepend(str(package.parent))
    importlib.invalidate_caches()
    yield package
    sys.modules.pop("my_package", None)


def test_published_backend_registers_on_import(my_package: Path) -> None:
    assert "mybackend" not in registered_backend_classes()
    ns = run_seed(SEED_PUBLISHED_USAGE)
    assert ns["registry"]["mybackend"].__class__.__name__ == "MyBackend"
    assert "MyCustomBackend" not in {c.__name__ for c in registered_backend_classes().values()}
    from packaging.requirements import Requirement

    project = tomllib.loads(SEED_PYPROJECT)["project"]
    (requirement,) = map(Requirement, project["dependencies"])
    assert requirement.name == "polystore"
    assert requirement.specifier.contains(polystore.__version__)


def test_testing_guide_runs(my_package: Path) -> None:
    TestMyCustomBackend = run_seed(SEED_TESTING)["TestMyCustomBackend"]
    tests = [name for name in vars(TestMyCustomBackend) if name.startswith("test_")]
    assert tests == ["test_save_and_load", "test_batch_operations", "test_file_not_found"]
    for name in tests:
        case = TestMyCustomBackend()
        case.setup_method()
        getattr(case, name)()


# The form the guide should recommend: polystore's shipped conformance suite, run
# against a small user backend (flat, object-store-like: directories exist only
# through the files under them), with the suite's knobs set to what it offers.


class FlatUserBackend(StorageBackend):
    """A user's backend over a dict, with implicit directories."""

    def __init__(self) -> None:
        self.files: dict[str, Any] = {}

    def _no_file_above(self, path: str) -> None:
        parts = path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in self.files:
                raise PolystoreNotADirectoryError(f"not a directory: {'/'.join(parts[:i])}")

    def save(self, data: Any, file_path: str, **kwargs: Any) -> None:
        import copy

        path = paths.normalize_file(file_path)
        self._no_file_above(path)
        try:
            self.files[path] = copy.deepcopy(data)
        except TypeError as exc:
            raise SerializationError(str(exc)) from exc

    def load(self, file_path: str, **kwargs: Any) -> Any:
        import copy

        path = paths.normalize_file(file_path)
        if path not in self.files:
            raise NotFoundError(f"no such file: {path}")
        return copy.deepcopy(self.files[path])

    def list_files(
        self,
        directory: str,
        pattern: str | None = None,
        extensions: Any = None,
        recursive: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        d = paths.normalize(directory)
        if d in self.files:
            raise PolystoreNotADirectoryError(f"not a directory: {d}")
        prefix = f"{d}/" if d else ""
        under = [p for p in self.files if p.startswith(prefix)]
        if d and not under:
            raise NotFoundError(f"no such directory: {d}")
        exts = paths.normalize_extensions(extensions)
        return sorted(
            p
            for p in under
            if (recursive or "/" not in p[len(prefix) :])
            and paths.match_name(paths.split(p)[1], pattern, exts)
        )

    def exists(self, path: str) -> bool:
        return self.is_file(path) or self.is_dir(path)

    def is_file(self, path: str) -> bool:
        return paths.normalize(path) in self.files

    def is_dir(self, path: str) -> bool:
        d = paths.normalize(path)
        return d == "" or any(p.startswith(f"{d}/") for p in self.files)

    def list_dir(self, path: str) -> list[str]:
        d = paths.normalize(path)
        prefix = f"{d}/" if d else ""
        return sorted({p[len(prefix) :].split("/")[0] for p in self.list_files(d, recursive=True)})


class TestSuiteOnAFlatUserBackend(BackendTests):
    supports_directories = False
    optional_operations = frozenset()
    supports_overwrite_false = False

    @pytest.fixture
    def backend(self) -> StorageBackend:
        return FlatUserBackend()
