"""A Hypothesis state machine: random operation sequences against a dict model.

Every built-in backend (memory, disk, SQL on SQLite, SQL on PostgreSQL) is driven
through random sequences of ``save``, ``save_batch``, ``load``, ``load_batch``,
``delete`` (recursive or not), ``move``, ``copy``, ``ensure_directory``,
listings, invalid paths and, where the backend has them, transactions that
commit or roll back (nested ones too). A plain model (a dict of path -> value
and a set of directories) predicts the outcome of each step: the new state, or
the exact error type with nothing changed. After every step the whole backend
is compared with the model: ``list_files``, ``list_dir`` of every directory,
``exists``/``is_file``/``is_dir`` of every known path and of paths that must
not exist, and the content of every file. On SQL, every blob's reference count
must equal the number of file rows pointing at it, and the catalog must hold
exactly the model's nodes (a failed save may not leave a directory behind).

The CI budget is fixed and small (derandomized, so every run tries the same
sequences). A longer run, with the same seed discipline::

    POLYSTORE_LONG=1 .venv/bin/pytest tests/test_stateful.py

``POLYSTORE_STATEFUL_EXAMPLES`` and ``POLYSTORE_STATEFUL_STEPS`` set the budget
explicitly; ``POLYSTORE_STATEFUL_SEED`` picks another fixed seed (instead of
Hypothesis' derandomized default), to explore different sequences.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from catalog_checks import refcounts
from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from polystore import DiskBackend, MemoryBackend, StorageBackend, errors
from polystore.backends.sql import SQLBackend
from polystore.testing import assert_values_equal

# -- budget -----------------------------------------------------------------------


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


LONG = os.environ.get("POLYSTORE_LONG", "").lower() in ("1", "true", "yes")
EXAMPLES = _env_int("POLYSTORE_STATEFUL_EXAMPLES", 2000 if LONG else 20)
STEPS = _env_int("POLYSTORE_STATEFUL_STEPS", 50 if LONG else 25)
SEED = os.environ.get("POLYSTORE_STATEFUL_SEED", "").strip()

SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    # A fixed seed: CI tries the same sequences every run, and a failure
    # reproduces with the same command.
    derandomize=not SEED,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)

# -- the model --------------------------------------------------------------------

#: Few names, so operations collide often. ``%``, ``_`` and ``[x]`` are SQL LIKE
#: and glob characters that must stay literal; the extensions pick the disk
#: backend's format, and with it the kind of value saved there.
NAMES = ("a", "b", "c.npy", "d.json", "e.txt", "%_", "[x]")

BYTES_VALUES = (b"", b"x", b"y", b"xy\x00\xff")  # few, so content is shared (dedup, refcounts)
STR_VALUES = ("", "s", "ü 🚀")
JSON_VALUES = ({}, [1, "two"], {"k": [None, True, 1.5]}, None)


def _array(code: int) -> np.ndarray:
    dtype = ("<i4", ">f8", "u1", "bool")[code % 4]
    return np.arange(code % 3, dtype=dtype)


def value_strategy(path: str) -> st.SearchStrategy[Any]:
    """A value the path's extension can hold on every backend (disk is the strict one)."""
    name = path.rpartition("/")[2]
    if name.endswith(".npy"):
        return st.integers(0, 11).map(_array)
    if name.endswith(".json"):
        return st.sampled_from(JSON_VALUES).map(copy.deepcopy)
    if name.endswith(".txt"):
        return st.sampled_from(STR_VALUES)
    return st.sampled_from(BYTES_VALUES)


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + "/")


# The model raises the same error classes the backends must raise.
@dataclass
class Model:
    files: dict[str, Any] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=lambda: {""})

    def clone(self) -> Model:
        return Model(dict(self.files), set(self.dirs))

    def _check_chain(self, path: str) -> None:
        for parent in _ancestors(path):
            if parent in self.files:
                raise errors.NotADirectoryError(parent)

    def _make_dirs(self, path: str) -> None:
        for d in [*_ancestors(path), path]:
            self.dirs.add(d)

    def exists(self, path: str) -> bool:
        return path in self.files or path in self.dirs

    def children(self, directory: str) -> list[str]:
        prefix = directory + "/" if directory else ""
        names = {
            p[len(prefix) :].split("/", 1)[0]
            for p in (*self.files, *self.dirs)
            if p and p.startswith(prefix) and p != directory
        }
        return sorted(names)

    def list_files(self, directory: str, recursive: bool) -> list[str]:
        prefix = directory + "/" if directory else ""
        return sorted(
            p
            for p in self.files
            if p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :])
        )

    def check_listable(self, directory: str) -> None:
        if directory in self.files:
            raise errors.NotADirectoryError(directory)
        if directory not in self.dirs:
            raise errors.NotFoundError(directory)

    # -- operations: mutate self, or raise before changing anything ------------------

    def save(self, path: str, value: Any, overwrite: bool = True) -> None:
        if path in self.dirs:
            raise errors.IsADirectoryError(path)
        self._check_chain(path)
        if path in self.files and not overwrite:
            raise errors.AlreadyExistsError(path)
        self._make_dirs(path.rpartition("/")[0])
        self.files[path] = value

    def load(self, path: str) -> Any:
        if path in self.files:
            return self.files[path]
        if path in self.dirs:
            raise errors.IsADirectoryError(path)
        raise errors.NotFoundError(path)

    def ensure_directory(self, path: str) -> None:
        self._check_chain(path)
        if path in self.files:
            raise errors.NotADirectoryError(path)
        self._make_dirs(path)

    def delete(self, path: str, recursive: bool) -> None:
        if path in self.files:
            del self.files[path]
            return
        if path not in self.dirs:
            raise errors.NotFoundError(path)
        if self.children(path) and not recursive:
            raise errors.IsADirectoryError(path)
        self.files = {p: v for p, v in self.files.items() if not _under(p, path)}
        self.dirs = {d for d in self.dirs if not _under(d, path)}

    def _check_transfer(self, src: str, dst: str) -> None:
        if not self.exists(src):
            raise errors.NotFoundError(src)
        if src in self.dirs and _under(dst, src):
            raise errors.InvalidPathError(dst)
        if self.exists(dst):
            raise errors.AlreadyExistsError(dst)
        self._check_chain(dst)

    def copy(self, src: str, dst: str) -> None:
        self._check_transfer(src, dst)
        self._make_dirs(dst.rpartition("/")[0])
        if src in self.files:
            self.files[dst] = self.files[src]
            return
        for p in [p for p in self.files if _under(p, src)]:
            self.files[dst + p[len(src) :]] = self.files[p]
        for d in [d for d in self.dirs if _under(d, src)]:
            self.dirs.add(dst + d[len(src) :])

    def move(self, src: str, dst: str) -> None:
        self.copy(src, dst)
        self.delete(src, recursive=True)


# -- backends -----------------------------------------------------------------------


def clear_catalog(backend: SQLBackend) -> None:
    """Empty a catalog and its blob store between examples (cheaper than a new one)."""
    with backend.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM polystore_nodes WHERE id <> 0"))
        # Directories deleted: raise the tree version as polystore's own deletes
        # do, or a reader's cache of directory ids (SQLite reuses ids) would
        # take a new directory for the old one of that path.
        conn.execute(sa.text("UPDATE polystore_tree_version SET version = version + 1"))
        conn.execute(sa.text("DELETE FROM polystore_blobs"))
        conn.execute(sa.text("DELETE FROM polystore_upload_intents"))
    root = getattr(backend.blob_store, "root", None)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


def sql_consistency(backend: SQLBackend) -> tuple[dict[str, int], dict[str, int], int]:
    """(refcount of each live blob, file rows by blob, nodes but the root)."""
    stored, referenced = refcounts(backend)
    with backend.engine.connect() as conn:
        nodes = conn.execute(sa.text("SELECT COUNT(*) FROM polystore_nodes WHERE id <> 0"))
        return stored, referenced, int(nodes.scalar_one())


class _Rollback(Exception):
    """Raised inside a transaction to roll it back."""


#: Counters the figures in docs/reliability.rst come from.
STATS: dict[str, int] = {"examples": 0, "operations": 0, "checks": 0, "errors_expected": 0}

CONFLICTS = (errors.AlreadyExistsError, errors.IsADirectoryError, errors.NotADirectoryError)
INVALID_PATHS = (
    "../x",
    "a/../../b",
    "/..",
    "a/..",
    "..\\x",
    "a\\b",
    "nul\x00",
    "x" * 256,
    "é" * 128,
)


#: How often each kind of path is drawn (see ``BackendMachine.paths``).
SOURCES = {"file": 3, "dir": 2, "new": 1, "under_file": 1}  # load, delete, move/copy from
TARGETS = {"new": 3, "child": 3, "file": 3, "dir": 1, "under_file": 1}  # save
CLEAN_TARGETS = {"new": 2, "child": 3, "file": 3}  # most batches
DESTINATIONS = {"fresh": 3, "child": 3, "file": 1, "dir": 1}  # move/copy to
DIRECTORIES = {"dir": 4, "new": 1, "child": 1, "file": 1, "under_file": 1}  # listings
NEW_DIRECTORIES = {"new": 2, "child": 2, "dir": 1, "file": 1, "under_file": 1}  # ensure

INVALID_PATH_OPERATIONS = (
    *("save", "save_batch", "load", "delete", "move", "copy", "ensure", "list", "exists"),
    *("root: save", "root: delete", "root: move from", "root: move to", "root: copy to"),
)


class BackendMachine(RuleBasedStateMachine):
    """Drives one backend and a :class:`Model` in step. Subclasses set ``factory``."""

    factory: Callable[[], tuple[StorageBackend, Callable[[], None]]]
    #: Whether a failing ``save_batch`` raises exactly the model's error (the
    #: first failing path's). SQL checks a batch as a whole, so it may report
    #: another conflict of the same batch.
    exact_batch_errors = True
    #: The disk backend reads a file by its extension; a move may not change it.
    formats_by_extension = False

    def __init__(self) -> None:
        super().__init__()
        self.backend, self._cleanup = type(self).factory()
        self.model = Model()
        self.transactional = self.backend.supports_transactions
        self.is_sql = isinstance(self.backend, SQLBackend)
        self.rotation = 0
        STATS["examples"] += 1

    def teardown(self) -> None:
        self._cleanup()

    # -- drawing paths ----------------------------------------------------------------

    def paths(self, model: Model | None = None, **weights: int) -> st.SearchStrategy[str]:
        """Normal paths of the kinds weighted (default: the mix for sources).

        Kinds: ``new`` (any path of 1-3 names, most of them absent), ``fresh``
        (one that does not exist), ``child`` (a name inside an existing directory),
        ``file`` and ``dir`` (existing ones), ``under_file`` (a path through a file).
        """
        model = model or self.model
        weights = weights or SOURCES
        names = st.sampled_from(NAMES)
        anywhere = st.lists(names, min_size=1, max_size=3).map("/".join)
        files = sorted(model.files)
        dirs = sorted(model.dirs - {""})
        kinds: dict[str, st.SearchStrategy[str]] = {
            "new": anywhere,
            "fresh": anywhere.filter(lambda p: not model.exists(p)),
        }
        if dirs:
            kinds["child"] = st.tuples(st.sampled_from(dirs), names).map("/".join)
            kinds["dir"] = st.sampled_from(dirs)
        if files:
            kinds["file"] = st.sampled_from(files)
            kinds["under_file"] = st.tuples(st.sampled_from(files), names).map("/".join)
        # one_of picks among its branches evenly: a branch given n times weighs n.
        options = [kinds[k] for k, n in weights.items() if k in kinds for _ in range(n)]
        return st.one_of(options or [anywhere])

    @staticmethod
    def spell(data: st.DataObject, path: str) -> str:
        """Spell a normal path as a user might: leading, doubled or trailing slashes, ``.``."""
        how = data.draw(st.sampled_from(["plain", "plain", "lead", "trail", "double", "dot"]))
        if how == "lead":
            return "/" + path
        if how == "trail":
            return path + "/"
        if how == "double":
            return path.replace("/", "//")
        if how == "dot":
            return "./" + path.replace("/", "/./")
        return path

    # -- running one operation against backend and model ----------------------------

    def apply(
        self,
        model: Model,
        model_op: Callable[[Model], Any],
        backend_op: Callable[[], Any],
        *,
        errors_ok: tuple[type[BaseException], ...] | None = None,
        partial_on_error: bool = False,
    ) -> tuple[Model, Any]:
        """Run ``backend_op`` and ``model_op`` (on a copy of ``model``); return the new model.

        If the model raises, the backend must raise the same error class (or one
        of ``errors_ok``) and the state stays ``model`` -- unless
        ``partial_on_error``, for a non-atomic batch, where the state is what the
        model reached before failing.
        """
        STATS["operations"] += 1
        trial = model.clone()
        try:
            result = model_op(trial)
        except errors.PolystoreError as expected:
            STATS["errors_expected"] += 1
            allowed = errors_ok or (type(expected),)
            try:
                got = backend_op()
            except allowed:
                return (trial if partial_on_error else model), None
            except Exception as exc:
                raise AssertionError(
                    f"expected {[e.__name__ for e in allowed]}, backend raised {exc!r}"
                ) from exc
            raise AssertionError(
                f"expected {[e.__name__ for e in allowed]}, backend returned {got!r}"
            ) from expected
        got = backend_op()
        return trial, (result, got)

    def step(self, model_op: Callable[[Model], Any], backend_op: Callable[[], Any]) -> Any:
        self.model, out = self.apply(self.model, model_op, backend_op)
        return out

    # -- rules --------------------------------------------------------------------------

    @initialize(data=st.data())
    def populate(self, data: st.DataObject) -> None:
        """Start from a few files, so that the first steps have something to work on."""
        anywhere = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join)
        start = self.model.clone()
        for path in data.draw(st.lists(anywhere, min_size=2, max_size=8), label="initial"):
            try:
                start.save(path, data.draw(value_strategy(path), label="value"))
            except errors.PolystoreError:
                continue  # under a file or onto a directory: leave it out
        STATS["operations"] += 1
        self.backend.save_batch(list(start.files.values()), list(start.files))
        self.model = start

    @rule(data=st.data(), overwrite=st.sampled_from([True, True, False]))
    def save(self, data: st.DataObject, overwrite: bool) -> None:
        path = data.draw(self.paths(**TARGETS), label="path")
        value = data.draw(value_strategy(path), label="value")
        spelled = self.spell(data, path)
        self.step(
            lambda m: m.save(path, copy.deepcopy(value), overwrite),
            lambda: self.backend.save(value, spelled, overwrite=overwrite),
        )

    @rule(data=st.data(), overwrite=st.sampled_from([True, True, False]))
    def save_batch(self, data: st.DataObject, overwrite: bool) -> None:
        mix = TARGETS if data.draw(st.integers(0, 3), label="conflicts allowed") == 0 else None
        batch_paths = data.draw(
            st.lists(self.paths(**(mix or CLEAN_TARGETS)), max_size=5, unique=True),
            label="paths",
        )
        values = [data.draw(value_strategy(p), label="value") for p in batch_paths]

        def model_op(m: Model) -> None:
            for p, v in zip(batch_paths, values, strict=True):
                m.save(p, copy.deepcopy(v), overwrite)

        errors_ok = None if self.exact_batch_errors else CONFLICTS
        self.model, _ = self.apply(
            self.model,
            model_op,
            lambda: self.backend.save_batch(values, batch_paths, overwrite=overwrite),
            errors_ok=errors_ok,
            partial_on_error=not self.transactional,
        )

    @rule(data=st.data())
    def load(self, data: st.DataObject) -> None:
        path = data.draw(self.paths(), label="path")
        out = self.step(lambda m: m.load(path), lambda: self.backend.load(self.spell(data, path)))
        if out is not None:
            assert_values_equal(out[1], out[0], context=path)

    @rule(data=st.data())
    def load_batch(self, data: st.DataObject) -> None:
        batch = data.draw(st.lists(self.paths(), max_size=4), label="paths")
        out = self.step(
            lambda m: [m.load(p) for p in batch], lambda: self.backend.load_batch(batch)
        )
        if out is not None:
            for want, got, p in zip(out[0], out[1], batch, strict=True):
                assert_values_equal(got, want, context=p)

    @rule(data=st.data(), recursive=st.booleans())
    def delete(self, data: st.DataObject, recursive: bool) -> None:
        path = data.draw(self.paths(), label="path")
        spelled = self.spell(data, path)
        self.step(
            lambda m: m.delete(path, recursive),
            lambda: self.backend.delete(spelled, recursive=recursive),
        )

    def _transfer_paths(self, data: st.DataObject) -> tuple[str, str]:
        src = data.draw(self.paths(), label="src")
        dst = data.draw(self.paths(**DESTINATIONS), label="dst")
        return src, self.same_format(src, dst)

    def same_format(self, src: str, dst: str) -> str:
        """On disk a file's format follows its name: keep a moved file's extension."""
        if not self.formats_by_extension or src not in self.model.files:
            return dst
        src_name, dst_name = src.rpartition("/")[2], dst.rpartition("/")[2]
        if os.path.splitext(src_name)[1] == os.path.splitext(dst_name)[1]:
            return dst
        parent = dst.rpartition("/")[0]
        return f"{parent}/{src_name}" if parent else src_name

    @rule(data=st.data())
    def move(self, data: st.DataObject) -> None:
        src, dst = self._transfer_paths(data)
        ok = (
            (errors.InvalidPathError, errors.AlreadyExistsError)
            if src == dst in self.model.dirs
            else None
        )
        self.model, _ = self.apply(
            self.model,
            lambda m: m.move(src, dst),
            lambda: self.backend.move(self.spell(data, src), self.spell(data, dst)),
            errors_ok=ok,
        )

    @rule(data=st.data())
    def copy(self, data: st.DataObject) -> None:
        src, dst = self._transfer_paths(data)
        # A directory onto itself: "into itself" and "destination exists" are both true.
        ok = (
            (errors.InvalidPathError, errors.AlreadyExistsError)
            if src == dst in self.model.dirs
            else None
        )
        self.model, _ = self.apply(
            self.model,
            lambda m: m.copy(src, dst),
            lambda: self.backend.copy(self.spell(data, src), self.spell(data, dst)),
            errors_ok=ok,
        )

    @rule(data=st.data())
    def ensure_directory(self, data: st.DataObject) -> None:
        path = data.draw(st.one_of(st.just(""), self.paths(**NEW_DIRECTORIES)), label="path")
        spelled = self.spell(data, path) if path else data.draw(st.sampled_from(["", "/", "."]))
        self.step(
            lambda m: m.ensure_directory(path), lambda: self.backend.ensure_directory(spelled)
        )

    @rule(data=st.data(), recursive=st.booleans())
    def listing(self, data: st.DataObject, recursive: bool) -> None:
        path = data.draw(st.one_of(st.just(""), self.paths(**DIRECTORIES)), label="path")
        out = self.step(
            lambda m: (m.check_listable(path), m.list_files(path, recursive))[1],
            lambda: self.backend.list_files(path, recursive=recursive),
        )
        if out is not None:
            assert out[1] == out[0]
        out = self.step(
            lambda m: (m.check_listable(path), m.children(path))[1],
            lambda: self.backend.list_dir(path),
        )
        if out is not None:
            assert out[1] == out[0]

    @rule(
        bad=st.sampled_from(INVALID_PATHS),
        op=st.sampled_from(INVALID_PATH_OPERATIONS),
    )
    def invalid_path(self, bad: str, op: str) -> None:
        b = self.backend
        calls: dict[str, Callable[[], Any]] = {
            # The root is a directory, never a file: file operations refuse it.
            "root: save": lambda: b.save(b"x", "/"),
            "root: delete": lambda: b.delete("", recursive=True),
            "root: move from": lambda: b.move("", "elsewhere"),
            "root: move to": lambda: b.move("a", "/"),
            "root: copy to": lambda: b.copy("a", ""),
            "save": lambda: b.save(b"x", bad),
            "save_batch": lambda: b.save_batch([b"x", b"y"], ["fine", bad]),
            "load": lambda: b.load(bad),
            "delete": lambda: b.delete(bad, recursive=True),
            "move": lambda: b.move("a", bad),
            "copy": lambda: b.copy(bad, "a"),
            "ensure": lambda: b.ensure_directory(bad),
            "list": lambda: b.list_files(bad),
            "exists": lambda: b.exists(bad),
        }

        def model_op(m: Model) -> None:
            if op == "save_batch":
                m.save("fine", b"x")  # a loop (disk) saves what comes before the bad path
            raise errors.InvalidPathError(bad)

        self.model, _ = self.apply(
            self.model, model_op, calls[op], partial_on_error=not self.transactional
        )

    # -- transactions -------------------------------------------------------------------

    def _draw_op(self, data: st.DataObject, model: Model) -> tuple[str, Any, Any]:
        """One operation for inside a transaction: (kind, model_op, backend_op)."""
        kind = data.draw(st.sampled_from(["save", "save", "batch", "delete", "move", "copy"]))
        weights = TARGETS if kind in ("save", "batch") else SOURCES
        p = data.draw(self.paths(model, **weights), label=f"{kind} path")
        b = self.backend
        if kind == "save":
            v = data.draw(value_strategy(p), label="value")
            return kind, lambda m: m.save(p, copy.deepcopy(v)), lambda: b.save(v, p)
        if kind == "batch":
            more = st.lists(self.paths(model, **CLEAN_TARGETS), max_size=2)
            ps = [p, *data.draw(more, label="more")]
            ps = list(dict.fromkeys(ps))
            vs = [data.draw(value_strategy(x), label="value") for x in ps]

            def model_batch(m: Model) -> None:
                for x, v in zip(ps, vs, strict=True):
                    m.save(x, copy.deepcopy(v))

            return kind, model_batch, lambda: b.save_batch(vs, ps)
        if kind == "delete":
            return kind, lambda m: m.delete(p, True), lambda: b.delete(p, recursive=True)
        q = data.draw(self.paths(model, **DESTINATIONS), label="dst")
        if q == p:
            q = p + "/x" if p.count("/") < 3 else "zz"
        q = self.same_format(p, q) if p in model.files else q
        if kind == "move":
            return kind, lambda m: m.move(p, q), lambda: b.move(p, q)
        return kind, lambda m: m.copy(p, q), lambda: b.copy(p, q)

    def _run_ops(self, data: st.DataObject, model: Model, count: int) -> Model:
        for _ in range(count):
            kind, model_op, backend_op = self._draw_op(data, model)
            ok = CONFLICTS if kind == "batch" and not self.exact_batch_errors else None
            model, _ = self.apply(model, model_op, backend_op, errors_ok=ok)
        # Inside the transaction the backend sees its own writes.
        STATS["checks"] += 1
        assert self.backend.list_files("", recursive=True) == sorted(model.files)
        return model

    @precondition(lambda self: self.transactional)
    @rule(
        data=st.data(),
        count=st.integers(1, 4),
        commit=st.booleans(),
        nested=st.sampled_from(["none", "none", "commit", "rollback"]),
    )
    def transaction(self, data: st.DataObject, count: int, commit: bool, nested: str) -> None:
        STATS["operations"] += 1
        working = self.model
        try:
            with self.backend.transaction():
                working = self._run_ops(data, working, count)
                if nested != "none":
                    inner = working
                    try:
                        with self.backend.transaction():
                            inner = self._run_ops(data, inner, data.draw(st.integers(1, 3)))
                            if nested == "rollback":
                                raise _Rollback
                    except _Rollback:
                        inner = working
                    working = inner
                    assert self.backend.list_files("", recursive=True) == sorted(working.files)
                if not commit:
                    raise _Rollback
        except _Rollback:
            working = self.model
        self.model = working

    # -- the invariant: the backend looks exactly like the model ---------------------

    @invariant()
    def matches_model(self) -> None:
        b, m = self.backend, self.model
        STATS["checks"] += 1
        assert b.list_files("", recursive=True) == sorted(m.files)
        dirs = sorted(m.dirs)
        for d in dirs:
            assert b.list_dir(d) == m.children(d), d
        # Listing files of every directory at every step costs more than it
        # finds on PostgreSQL; a few directories, rotating, cover them all.
        self.rotation += 1
        for i in range(min(3, len(dirs))):
            d = dirs[(self.rotation + i) % len(dirs)]
            assert b.list_files(d, recursive=bool(i % 2)) == m.list_files(d, bool(i % 2)), d
        probes = {f"{p}/zz" for p in m.files} | {"zz", "a/zz/zz"}
        for p in sorted(set(m.files) | m.dirs | probes):
            want = (m.exists(p), p in m.files, p in m.dirs)
            assert (b.exists(p), b.is_file(p), b.is_dir(p)) == want, p
        files = sorted(m.files)
        for p, got in zip(files, b.load_batch(files), strict=True):
            assert_values_equal(got, m.files[p], context=p)
        if self.is_sql:
            assert isinstance(b, SQLBackend)
            stored, referenced, nodes = sql_consistency(b)
            assert stored == referenced, "reference counts differ from the file rows"
            report = b.fsck()
            assert report.ok and report.pending_uploads == 0, str(report)
            assert nodes == len(m.files) + len(m.dirs) - 1, "catalog holds other nodes"


# -- one test per backend -------------------------------------------------------------------


def _run(
    factory: Callable[[], tuple[StorageBackend, Callable[[], None]]],
    *,
    exact: bool = True,
    formats: bool = False,
) -> None:
    machine = type(
        "Machine",
        (BackendMachine,),
        {
            "factory": staticmethod(factory),
            "exact_batch_errors": exact,
            "formats_by_extension": formats,
        },
    )
    if SEED:
        machine = seed(int(SEED))(machine)
    before = dict(STATS)
    run_state_machine_as_test(machine, settings=SETTINGS)
    _record({k: STATS[k] - before[k] for k in STATS})


def _record(figures: dict[str, int]) -> None:
    """Append this run's figures to ``POLYSTORE_RELIABILITY_LOG`` when set."""
    log = os.environ.get("POLYSTORE_RELIABILITY_LOG")
    if log:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"test": test, **figures}) + "\n")


def test_memory() -> None:
    _run(lambda: (MemoryBackend(), lambda: None))


def test_disk() -> None:
    def factory() -> tuple[StorageBackend, Callable[[], None]]:
        root = tempfile.mkdtemp(prefix="polystore-stateful-")
        return DiskBackend(root), lambda: shutil.rmtree(root, ignore_errors=True)

    _run(factory, formats=True)


#: Content over this many bytes goes to the external store: with the values
#: above, some files are inline and some external, and they move between the two
#: as files are overwritten.
INLINE_LIMIT = 8


@pytest.fixture
def shared_sql(catalog_url: str, tmp_path: Path) -> Iterator[SQLBackend]:
    """One migrated catalog per database, emptied before each example."""
    backend = SQLBackend(
        catalog_url, blob_store=f"file://{tmp_path}/blobs", inline_limit=INLINE_LIMIT
    )
    yield backend
    backend.close()


def test_sql(shared_sql: SQLBackend) -> None:
    def factory() -> tuple[StorageBackend, Callable[[], None]]:
        clear_catalog(shared_sql)
        return shared_sql, lambda: None

    _run(factory, exact=False)
