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
import sys
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from polystore import paths
from polystore.cli.app import State, interrupted, main, pass_state, url_option
from polystore.cli.complete import complete_catalog_path
from polystore.cli.globs import Filters, expand_all, has_magic
from polystore.cli.localfiles import (
    LocalContent,
    atomic_write,
    describe_local,
    local_matches,
    local_name,
    read_local,
    stored_as_bytes,
    write_local,
)
from polystore.cli.output import Meter, echo_json, human_size, info, note, transfer_progress
from polystore.errors import NotFoundError
from polystore.hashing import named

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


def _plan_put(
    backend: SQLBackend | None, sources: tuple[Path, ...], dest: str, filters: Filters
) -> _PutPlan:
    norm_dest = paths.normalize(dest)
    into = (
        len(sources) > 1
        or dest.endswith("/")
        or norm_dest == paths.ROOT
        or (backend is not None and backend.is_dir(norm_dest))
    )
    plan = _PutPlan()
    for source in sources:
        if not source.exists():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(source))
        if not source.is_dir():
            target = paths.join(norm_dest, source.name) if into else norm_dest
            if filters.keep(source.name):
                plan.files.append((source, paths.normalize_file(target)))
            continue
        for root, dirnames, filenames in os.walk(source):
            here = Path(root)
            rel = here.relative_to(source).as_posix()
            target = paths.normalize(paths.join(norm_dest, "" if rel == "." else rel))
            if target and not filters:  # (filtered: no directories left empty by them)
                plan.dirs.append(target)
            # os.walk lists symlinked directories but never enters them (no loops).
            plan.skipped += [here / d for d in dirnames if (here / d).is_symlink()]
            dirnames[:] = sorted(d for d in dirnames if not (here / d).is_symlink())
            for name in sorted(filenames):
                local = here / name
                if not filters.keep(name if rel == "." else f"{rel}/{name}"):
                    continue
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


#: Options both transfers take.
def _transfer_options(command: Any) -> Any:
    for decorator in reversed(
        [
            click.option(
                "-n",
                "--dry-run",
                is_flag=True,
                help="Print what would be copied and skipped; change nothing.",
            ),
            click.option(
                "--include",
                multiple=True,
                metavar="GLOB",
                help="Only files whose name (or, with a /, relative path) matches. Repeatable.",
            ),
            click.option(
                "--exclude",
                multiple=True,
                metavar="GLOB",
                help="Leave out files whose name (or relative path) matches; wins over "
                "--include. Repeatable.",
            ),
            click.option(
                "--json",
                "as_json",
                is_flag=True,
                help="Print one JSON object: copied, skipped, bytes, files, dry_run.",
            ),
        ]
    ):
        command = decorator(command)
    return command


@dataclass
class _Tally:
    """What a transfer did: the summary ``--json`` prints."""

    files: int = 0
    copied: int = 0
    skipped: int = 0
    bytes: int = 0
    big_inline: int = 0  # files over the inline limit that stayed inline (put)

    def as_json(self, dry_run: bool) -> dict[str, Any]:
        return {
            "copied": self.copied,
            "skipped": self.skipped,
            "bytes": self.bytes,
            "files": self.files,
            "dry_run": dry_run,
        }

    def summary(self, verb: str, where: str, dry_run: bool) -> str:
        done = f"{verb} {_plural(self.copied, 'file')} ({human_size(self.bytes)}) {where}"
        if dry_run:
            done = "dry run: would have " + done
        if self.skipped:
            done += f", skipped {self.skipped} unchanged"
        return done + ("; nothing was changed" if dry_run else "")


class _Existing:
    """What the catalog holds at put's destinations, one directory listing at a time."""

    def __init__(self, backend: SQLBackend | None) -> None:
        self.backend = backend
        self._dirs: dict[str, dict[str, StatResult]] = {}

    def get(self, path: str) -> StatResult | None:
        parent, name = paths.split(path)
        if parent not in self._dirs:
            entries: dict[str, StatResult] = {}
            if self.backend is not None and self.backend.is_dir(parent):
                entries = {paths.split(st.path)[1]: st for st in self.backend.scan_dir(parent)}
            self._dirs[parent] = entries
        return self._dirs[parent].get(name)


def _put_one(
    backend: SQLBackend,
    local: Path,
    raw: bool,
    user_attrs: dict[str, Any],
    existing: StatResult | None,
    streamed: str | None,
) -> tuple[bool, LocalContent | None]:
    """Decide one file: ``(copy, described)``, with what was learnt reading it, if it was read.

    Only a file with a destination to compare is read here; a plain file
    whose size differs from the destination's is not even hashed.
    """
    if existing is None or existing.kind != "file":
        return True, None
    if streamed is not None and existing.size != local.stat().st_size:
        return True, None
    described = describe_local(local, backend.serializers, named(backend.hash_algorithm), raw=raw)
    if described.same_as(existing, user_attrs):
        return False, None
    return True, described


def _flush(
    state: State,
    backend: SQLBackend,
    pending: list[tuple[Any, str, dict[str, Any]]],
    user_attrs: dict[str, Any],
) -> None:
    """Save the parsed files of one batch in one transaction."""
    plain = [(value, target) for value, target, extra in pending if not extra]
    special = [(value, target, extra) for value, target, extra in pending if extra]
    with backend.transaction():
        # save_batch gives every file of one call the same attributes, so files
        # that carry attributes of their own are saved one by one beside it.
        if plain:
            backend.save_batch(
                [v for v, _ in plain], [t for _, t in plain], attrs=user_attrs or None
            )
        for value, target, extra in special:
            backend.save(value, target, attrs={**user_attrs, **extra})


@main.command()
@click.argument(
    "sources", metavar="LOCAL...", nargs=-1, required=True, type=click.Path(path_type=Path)
)
@click.argument("dest", shell_complete=complete_catalog_path)
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
@_transfer_options
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
    dry_run: bool,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    as_json: bool,
) -> None:
    """Copy local files and directory trees into the catalog at DEST.

    A directory's contents go under DEST; a file goes into DEST when DEST is
    a directory, ends with ``/`` or several sources are given, else to DEST.

    Files are typed by extension: ``.npy`` becomes an array, ``.json`` a JSON
    value, ``.txt`` text, ``.tif``/``.tiff`` an image array (with tifffile
    installed), anything else bytes; ``--raw`` stores bytes throughout.
    ``polystore get`` writes them back byte for byte.

    Like ``rclone copy``, a file whose content (its hash), type and attributes
    are already at its destination is skipped, so running put again after an
    interruption copies only what is missing; a different file there is
    replaced. Plain files larger than the inline limit stream to the blob
    store a chunk at a time.

    \b
    Examples:
      polystore put plate1.npy results/          # -> results/plate1.npy
      polystore put ./screen data/screen         # ./screen/a/b.npy -> data/screen/a/b.npy
      polystore put --attr project=demo *.json configs/
      polystore put --dry-run --exclude '*.tmp' ./screen data/screen
    """
    user_attrs = _parse_attrs(attr_pairs)
    backend = _put_backend(state, dry_run)
    plan = _plan_put(backend, sources, dest, Filters(include, exclude))
    for skipped in plan.skipped:
        note(state, f"skipped {skipped} (not a regular file or directory)")
    tally = _Tally(files=len(plan.files))
    sizes = {local: local.stat().st_size for local, _ in plan.files}
    try:
        with (
            backend.transaction() if atomic and backend is not None else nullcontext(),
            transfer_progress(state, len(plan.files), sum(sizes.values()), "put") as meter,
        ):
            options = _PutOptions(raw, user_attrs, batch_size, dry_run, as_json)
            _Putter(state, backend, options, sizes, tally, meter).run(plan)
    except BaseException:
        if tally.copied and not atomic and not dry_run:
            message = state.interrupted_note = _progress_note(tally)
            if not interrupted(sys.exc_info()[1]):
                note(state, message)
        raise
    if tally.big_inline and backend is not None and backend.blob_store is not None:
        _note_big_inline(state, backend, tally.big_inline)
    if as_json:
        echo_json(tally.as_json(dry_run))
    else:
        info(state, tally.summary("put", f"into {dest}", dry_run))


def _put_backend(state: State, dry_run: bool) -> SQLBackend | None:
    """The catalog to put into, created if missing; a dry run creates nothing (None)."""
    if not dry_run:
        return state.backend(create=True)
    try:
        return state.backend()
    except NotFoundError:
        return None


def _note_big_inline(state: State, backend: SQLBackend, count: int) -> None:
    note(
        state,
        f"{_plural(count, 'file')} over the inline limit "
        f"({human_size(backend.inline_limit)}) stayed inline: the catalog already held "
        "that content in the database (content is stored once). "
        "`polystore rebalance` moves it to the blob store",
    )


@dataclass(frozen=True)
class _PutOptions:
    """How ``put`` was asked to store files."""

    raw: bool
    attrs: dict[str, Any]
    batch_size: int
    dry_run: bool
    as_json: bool


class _Putter:
    """Puts the files of one plan: each skipped, streamed, or parsed and saved in batches.

    Holds the batch being gathered (the parsed values, the local files they
    came from, their bytes) and flushes it in order: before a file that
    streams, when it is full, and at the end.
    """

    def __init__(
        self,
        state: State,
        backend: SQLBackend | None,
        options: _PutOptions,
        sizes: dict[Path, int],
        tally: _Tally,
        meter: Meter,
    ) -> None:
        self.state, self.backend, self.options = state, backend, options
        self.sizes, self.tally, self.meter = sizes, tally, meter
        self.existing = _Existing(backend)
        self.pending: list[tuple[Any, str, dict[str, Any]]] = []
        self.counted: list[Path] = []
        self.pending_bytes = 0

    def run(self, plan: _PutPlan) -> None:
        """Create the plan's empty directories, then put its files."""
        if self.backend is not None and not self.options.dry_run:
            for path in plan.empty_dirs():
                self.backend.ensure_directory(path)
        for local, target in plan.files:
            self.put(local, target)
        self.flush()

    def put(self, local: Path, target: str) -> None:
        """Skip, stream, or queue one file (a dry run only counts it)."""
        backend, options, tally = self.backend, self.options, self.tally
        size = self.sizes[local]
        streamed = stored_as_bytes(local, raw=options.raw)
        found = self.existing.get(target)
        copy, described = (
            (True, None)
            if backend is None
            else _put_one(backend, local, options.raw, options.attrs, found, streamed)
        )
        if not copy:
            assert backend is not None and found is not None
            if found.store == "inline" and size > backend.inline_limit:
                tally.big_inline += 1
            tally.skipped += 1
            self.meter.bytes(size)
            self.meter.file()
            return
        tally.bytes += size
        if options.dry_run:
            if not options.as_json:  # (--json: stdout is the one JSON object)
                info(self.state, f"would put {local} -> {target}")
            tally.copied += 1
            self.meter.file()
            return
        assert backend is not None
        if (
            streamed is not None
            and (described is None or described.value is None)
            and backend.blob_store is not None
            and size > backend.inline_limit
        ):
            self.stream(backend, local, target, streamed, described)
        else:
            self.queue(local, target, described)

    def stream(
        self,
        backend: SQLBackend,
        local: Path,
        target: str,
        streamed: str,
        described: LocalContent | None,
    ) -> None:
        """Save a large plain file a chunk at a time, after the batch before it."""
        self.flush()  # in order: what is before this file is saved before it
        size = self.sizes[local]
        backend.save_file(
            local,
            target,
            serializer=streamed,
            attrs=self.options.attrs or None,
            known=None if described is None else (size, described.hash),
            advance=self.meter.bytes,
        )
        self.tally.copied += 1
        self.meter.file()
        self.state.interrupted_note = _progress_note(self.tally)
        if backend.stat(target).store == "inline":  # the content was there already
            self.tally.big_inline += 1

    def queue(self, local: Path, target: str, described: LocalContent | None) -> None:
        """Parse a file into the batch; flush the batch once it is full."""
        if described is not None and described.value is not None:
            value, extra, remark = described.value, described.attrs, described.remark
        else:
            value, extra, remark = read_local(local, raw=self.options.raw)
        if remark is not None:
            note(self.state, remark)
        self.pending.append((value, target, extra))
        self.counted.append(local)
        self.pending_bytes += self.sizes[local]
        if len(self.pending) >= self.options.batch_size or self.pending_bytes >= BATCH_BYTES:
            self.flush()
            self.state.interrupted_note = _progress_note(self.tally)

    def flush(self) -> None:
        """Save the batch gathered so far, in one transaction, and count it."""
        if self.pending:
            assert self.backend is not None
            _flush(self.state, self.backend, self.pending, self.options.attrs)
        for local in self.counted:
            self.meter.bytes(self.sizes[local])
        self.meter.file(len(self.counted))
        self.tally.copied += len(self.counted)
        self.pending.clear()
        self.counted.clear()
        self.pending_bytes = 0


def _progress_note(tally: _Tally) -> str:
    return (
        f"{tally.copied} of {tally.files} files were put; run put again to finish "
        "(unchanged files are skipped)"
    )


# -- get -------------------------------------------------------------------------------


def _plan_get(
    backend: SQLBackend, sources: list[str], dest: Path, globbed: set[str], filters: Filters
) -> tuple[list[tuple[StatResult, Path]], list[Path]]:
    """What to write where; directories a glob matched go into DEST under their names."""
    into = bool(globbed) or len(sources) > 1 or dest.is_dir() or str(dest).endswith(("/", os.sep))
    files: list[tuple[StatResult, Path]] = []
    dirs: list[Path] = []
    for source in sources:
        norm = paths.normalize(source)
        top = backend.stat(norm)
        if top.kind == "file":
            name = paths.split(norm)[1]
            if filters.keep(name):
                files.append((top, dest / name if into else dest))
            continue
        base = dest / paths.split(norm)[1] if norm in globbed else dest
        if not filters:
            dirs.append(base)
        for st in backend.query(under=norm):
            rel = st.path[len(norm) + 1 :] if norm else st.path
            if not rel:
                continue
            local = base.joinpath(*paths.split_parts(rel))
            if st.kind == "dir":
                if not filters:
                    dirs.append(local)
            elif filters.keep(rel):
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


#: Plain content (bytes, text) larger than this is written a chunk at a time.
STREAM_OVER = 8 << 20


def _stream_to(backend: SQLBackend, st: StatResult, local: Path, meter: Meter) -> None:
    def write(fh: Any) -> None:
        for chunk in backend.iter_content(st.path):
            fh.write(chunk)
            meter.bytes(len(chunk))

    atomic_write(local, write)


@main.command()
@click.argument(
    "sources", metavar="PATH...", nargs=-1, required=True, shell_complete=complete_catalog_path
)
@click.argument("dest", type=click.Path(path_type=Path))
@_transfer_options
@url_option
@pass_state
def get(
    state: State,
    sources: tuple[str, ...],
    dest: Path,
    dry_run: bool,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    as_json: bool,
) -> None:
    """Copy files and directory trees from the catalog to local DEST.

    The same rules as ``put``, the other way: a directory's contents go under
    DEST; a file goes into DEST when it is a directory, else to DEST. PATH may
    be a glob matched in the catalog (quote it): ``'plate1/*/site1.npy'``.

    Arrays are written with ``np.save`` (``.npy``), or as TIFF to a
    ``.tif``/``.tiff`` name; JSON values as JSON in the layout they were put
    in; text as UTF-8; bytes as they are. A local file that already holds
    exactly that content is skipped; a different one is replaced. Large
    bytes and text stream to disk a chunk at a time.

    \b
    Examples:
      polystore get plate1/A01/site1.npy .
      polystore get plate1 ./plate1          # plate1/A01/... -> ./plate1/A01/...
      polystore get 'plate1/*/site1.npy' ./first-sites/
    """
    backend = state.backend()
    if not dest.parent.is_dir():
        # Like cp: DEST itself may be new, the directory it goes in may not.
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(dest.parent))
    expanded = expand_all(backend, sources)
    globbed = set(expanded) - {paths.normalize(s) for s in sources if not has_magic(s)}
    files, dirs = _plan_get(backend, expanded, dest, globbed, Filters(include, exclude))
    tally = _Tally(files=len(files))
    todo: list[tuple[StatResult, Path]] = []
    algorithm = named(backend.hash_algorithm)
    for st, local in files:
        if local_matches(st, local_name(st, local), backend.serializers, algorithm):
            tally.skipped += 1
        else:
            todo.append((st, local))
            tally.copied += 1
            tally.bytes += st.size or 0
            if dry_run and not as_json:
                info(state, f"would get {st.path} -> {local_name(st, local)}")
    if not dry_run:
        for directory in dirs:
            directory.mkdir(parents=True, exist_ok=True)
        _get_files(state, backend, todo, tally)
    if as_json:
        echo_json(tally.as_json(dry_run))
    else:
        info(state, tally.summary("got", f"into {dest}", dry_run))


def _get_files(
    state: State, backend: SQLBackend, todo: list[tuple[StatResult, Path]], tally: _Tally
) -> None:
    done = 0
    total = sum(st.size or 0 for st, _ in todo)
    small = [(st, local) for st, local in todo if not _streams(st)]
    big = [(st, local) for st, local in todo if _streams(st)]
    with transfer_progress(state, len(todo), total, "get") as meter:
        for batch in _load_batches(small):
            # One load_batch per batch: a consistent snapshot of its files.
            values = backend.load_batch([st.path for st, _ in batch])
            for (st, local), value in zip(batch, values, strict=True):
                local.parent.mkdir(parents=True, exist_ok=True)
                write_local(value, local, st.attrs)
                meter.bytes(st.size or 0)
            del values
            done += len(batch)
            meter.file(len(batch))
            state.interrupted_note = f"{done} of {len(todo)} files were written"
        for st, local in big:
            local.parent.mkdir(parents=True, exist_ok=True)
            _stream_to(backend, st, local, meter)
            done += 1
            meter.file()
            state.interrupted_note = f"{done} of {len(todo)} files were written"


def _streams(st: StatResult) -> bool:
    return st.serializer in ("bytes", "str") and (st.size or 0) > STREAM_OVER
