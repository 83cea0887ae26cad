"""``put`` and ``get``: local files and directory trees into the catalog and back.

Both follow ``aws s3 cp --recursive`` rather than ``cp -r``, so that running
the same command again does the same thing: a directory's *contents* go under
the destination (``put ./screen data/screen`` makes ``data/screen/...``, the
first time and every time). A file goes *into* the destination, under its own
name, when the destination is an existing directory, ends with ``/`` or several
sources are given; otherwise the file is copied *to* the destination.

``put`` checks every catalog path before it reads a byte, then saves in
batches; each batch is one transaction (``save_batch``), and ``--atomic`` makes
the whole run one. How files are typed is in :mod:`polystore.cli.localfiles`.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from polystore import paths
from polystore.cli.app import State, main, pass_state, url_option
from polystore.cli.localfiles import read_local, write_local
from polystore.cli.output import human_size, info, note, progress

if TYPE_CHECKING:
    from polystore.backends.base import StatResult
    from polystore.backends.sql import SQLBackend

__all__ = ["get", "put"]

#: A batch is flushed at this many bytes read, whatever --batch-size says.
BATCH_BYTES = 64 << 20


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# -- put -------------------------------------------------------------------------------


@dataclass
class _PutPlan:
    files: list[tuple[Path, str]] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)

    def empty_dirs(self) -> list[str]:
        """Directories nothing else in the plan creates (empty ones)."""
        covered: set[str] = set()
        for path in [p for _, p in self.files] + self.dirs:
            parent = paths.split(path)[0]
            while parent and parent not in covered:
                covered.add(parent)
                parent = paths.split(parent)[0]
        return [d for d in self.dirs if d not in covered]


def _plan_put(backend: SQLBackend, sources: tuple[Path, ...], dest: str) -> _PutPlan:
    norm_dest = paths.normalize(dest)
    into = (
        len(sources) > 1
        or dest.endswith("/")
        or norm_dest == paths.ROOT
        or backend.is_dir(norm_dest)
    )
    plan = _PutPlan()
    for source in sources:
        if not source.exists():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(source))
        if not source.is_dir():
            target = paths.join(norm_dest, source.name) if into else norm_dest
            plan.files.append((source, paths.normalize_file(target)))
            continue
        for root, dirnames, filenames in os.walk(source):
            here = Path(root)
            rel = here.relative_to(source).as_posix()
            target = paths.normalize(paths.join(norm_dest, "" if rel == "." else rel))
            if target:
                plan.dirs.append(target)
            # os.walk lists symlinked directories but never enters them (no loops).
            plan.skipped += [here / d for d in dirnames if (here / d).is_symlink()]
            dirnames[:] = sorted(d for d in dirnames if not (here / d).is_symlink())
            for name in sorted(filenames):
                local = here / name
                if local.is_file():
                    plan.files.append((local, paths.normalize_file(paths.join(target, name))))
                else:
                    plan.skipped.append(local)  # sockets, FIFOs, broken links
    return plan


def _parse_attrs(pairs: tuple[str, ...]) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--attr")
        try:
            attrs[key] = json.loads(text)
        except ValueError:
            attrs[key] = text  # not JSON: a plain string
    return attrs


def _batches(files: list[tuple[Path, str]], batch_size: int) -> Iterator[list[tuple[Path, str]]]:
    batch: list[tuple[Path, str]] = []
    size = 0
    for local, target in files:
        batch.append((local, target))
        size += local.stat().st_size
        if len(batch) >= batch_size or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _save_batch(
    state: State,
    backend: SQLBackend,
    batch: list[tuple[Path, str]],
    raw: bool,
    user_attrs: dict[str, Any],
) -> int:
    """Read and save one batch in one transaction; return the bytes read."""
    plain: tuple[list[Any], list[str]] = ([], [])
    special: list[tuple[Any, str, dict[str, Any]]] = []
    nbytes = 0
    for local, target in batch:
        value, extra, remark = read_local(local, raw=raw)
        nbytes += local.stat().st_size
        if remark is not None:
            note(state, remark)
        if extra:
            special.append((value, target, {**user_attrs, **extra}))
        else:
            plain[0].append(value)
            plain[1].append(target)
    with backend.transaction():
        # save_batch gives every file of one call the same attributes, so files
        # that carry attributes of their own are saved one by one beside it.
        if plain[0]:
            backend.save_batch(plain[0], plain[1], attrs=user_attrs or None)
        for value, target, attrs in special:
            backend.save(value, target, attrs=attrs)
    return nbytes


@main.command()
@click.argument(
    "sources", metavar="LOCAL...", nargs=-1, required=True, type=click.Path(path_type=Path)
)
@click.argument("dest")
@click.option(
    "--raw", is_flag=True, help="Store every file as plain bytes, whatever its extension."
)
@click.option(
    "--attr",
    "attr_pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="An attribute for every file saved (VALUE is JSON, else text). Repeatable.",
)
@click.option(
    "--batch-size",
    default=500,
    show_default=True,
    type=click.IntRange(min=1),
    help="Files per transaction (a batch also ends at 64 MiB read).",
)
@click.option("--atomic", is_flag=True, help="All files in one transaction: all or nothing.")
@url_option
@pass_state
def put(
    state: State,
    sources: tuple[Path, ...],
    dest: str,
    raw: bool,
    attr_pairs: tuple[str, ...],
    batch_size: int,
    atomic: bool,
) -> None:
    """Copy local files and directory trees into the catalog at DEST.

    A directory's contents go under DEST; a file goes into DEST when DEST is
    a directory, ends with ``/`` or several sources are given, else to DEST.

    Files are typed by extension: ``.npy`` becomes an array, ``.json`` a JSON
    value, ``.txt`` text, ``.tif``/``.tiff`` an image array (with tifffile
    installed), anything else bytes; ``--raw`` stores bytes throughout.
    ``polystore get`` writes them back byte for byte. An existing file at a
    destination path is replaced.

    \b
    Examples:
      polystore put plate1.npy results/          # -> results/plate1.npy
      polystore put ./screen data/screen         # ./screen/a/b.npy -> data/screen/a/b.npy
      polystore put --attr project=demo *.json configs/
    """
    user_attrs = _parse_attrs(attr_pairs)
    backend = state.backend(create=True)
    plan = _plan_put(backend, sources, dest)
    for skipped in plan.skipped:
        note(state, f"skipped {skipped} (not a regular file or directory)")
    done = nbytes = 0
    try:
        with backend.transaction() if atomic else nullcontext():
            for path in plan.empty_dirs():
                backend.ensure_directory(path)
            with progress(state, len(plan.files), "put") as advance:
                for batch in _batches(plan.files, batch_size):
                    nbytes += _save_batch(state, backend, batch, raw, user_attrs)
                    done += len(batch)
                    advance(len(batch))
    except BaseException:
        if done and not atomic:
            note(state, f"{done} of {len(plan.files)} files were saved; run put again to finish")
        raise
    info(state, f"put {_plural(done, 'file')} ({human_size(nbytes)}) into {dest}")


# -- get -------------------------------------------------------------------------------


def _plan_get(
    backend: SQLBackend, sources: tuple[str, ...], dest: Path
) -> tuple[list[tuple[StatResult, Path]], list[Path]]:
    into = len(sources) > 1 or dest.is_dir() or str(dest).endswith(("/", os.sep))
    files: list[tuple[StatResult, Path]] = []
    dirs: list[Path] = []
    for source in sources:
        norm = paths.normalize(source)
        top = backend.stat(norm)
        if top.kind == "file":
            files.append((top, dest / paths.split(norm)[1] if into else dest))
            continue
        base = dest
        dirs.append(base)
        for st in backend.query(under=norm):
            rel = st.path[len(norm) + 1 :] if norm else st.path
            if not rel:
                continue
            local = base.joinpath(*paths.split_parts(rel))
            if st.kind == "dir":
                dirs.append(local)
            else:
                files.append((st, local))
    return files, dirs


def _load_batches(
    files: list[tuple[StatResult, Path]],
) -> Iterator[list[tuple[StatResult, Path]]]:
    batch: list[tuple[StatResult, Path]] = []
    size = 0
    for item in files:
        batch.append(item)
        size += item[0].size or 0
        if len(batch) >= 500 or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


@main.command()
@click.argument("sources", metavar="PATH...", nargs=-1, required=True)
@click.argument("dest", type=click.Path(path_type=Path))
@url_option
@pass_state
def get(state: State, sources: tuple[str, ...], dest: Path) -> None:
    """Copy files and directory trees from the catalog to local DEST.

    The same rules as ``put``, the other way: a directory's contents go under
    DEST; a file goes into DEST when it is a directory, else to DEST.

    Arrays are written with ``np.save`` (``.npy``), or as TIFF to a
    ``.tif``/``.tiff`` name; JSON values as JSON in the layout they were put
    in; text as UTF-8; bytes as they are. Existing local files are replaced.

    \b
    Examples:
      polystore get plate1/A01/site1.npy .
      polystore get plate1 ./plate1          # plate1/A01/... -> ./plate1/A01/...
    """
    backend = state.backend()
    if not dest.parent.is_dir():
        # Like cp: DEST itself may be new, the directory it goes in may not.
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(dest.parent))
    files, dirs = _plan_get(backend, sources, dest)
    for directory in dirs:
        directory.mkdir(parents=True, exist_ok=True)
    nbytes = 0
    with progress(state, len(files), "get") as advance:
        for batch in _load_batches(files):
            # One load_batch per batch: a consistent snapshot of its files.
            values = backend.load_batch([st.path for st, _ in batch])
            for (st, local), value in zip(batch, values, strict=True):
                local.parent.mkdir(parents=True, exist_ok=True)
                write_local(value, local, st.attrs)
                nbytes += st.size or 0
            advance(len(batch))
    info(state, f"got {_plural(len(files), 'file')} ({human_size(nbytes)}) into {dest}")
