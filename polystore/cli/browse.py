"""Commands that look without touching: ``ls``, ``tree``, ``cat``, ``stat``, ``du``."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import click

from polystore import paths
from polystore.cli.app import State, json_option, main, pass_state, url_option
from polystore.cli.complete import complete_catalog_path
from polystore.cli.globs import expand, has_magic
from polystore.cli.output import echo_json, human_size, print_table, stat_dict

if TYPE_CHECKING:
    from polystore.backends.base import StatResult
    from polystore.backends.sql import SQLBackend

__all__ = ["cat", "du", "ls", "stat", "tree"]


def _relative(path: str, base: str) -> str:
    return path[len(base) + 1 :] if base else path


def _subtree(backend: SQLBackend, norm: str, kind: str | None = None) -> list[StatResult]:
    """Every node under directory ``norm`` (not ``norm`` itself), ordered by path."""
    return [st for st in backend.query(under=norm, kind=kind) if st.path != norm]


def _long_rows(entries: list[StatResult], base: str, full: bool) -> list[list[Any]]:
    rows = []
    for st in entries:
        name = st.path if full else _relative(st.path, base) or st.path
        rows.append(
            [
                st.kind,
                human_size(st.size) if st.kind == "file" else "",
                st.dtype,
                "x".join(map(str, st.shape)) if st.shape is not None else None,
                st.modified_at.astimezone().strftime("%Y-%m-%d %H:%M") if st.modified_at else None,
                name + ("/" if st.kind == "dir" else ""),
            ]
        )
    return rows


@main.command("ls")
@click.argument("path", default="", shell_complete=complete_catalog_path)
@click.option("-l", "long", is_flag=True, help="Long listing: kind, size, dtype, shape, modified.")
@click.option(
    "-R", "--recursive", is_flag=True, help="List the whole subtree, as full catalog paths."
)
@json_option
@url_option
@pass_state
def ls(state: State, path: str, long: bool, recursive: bool, as_json: bool) -> None:
    """List directory PATH (default: the root), or show file PATH.

    Directories end with ``/``. ``--json`` prints one object per entry with
    the columns of the ``polystore_catalog`` view. PATH may be a glob matched
    in the catalog (quote it): the matches are listed, as full paths.

    \b
    Examples:
      polystore ls
      polystore ls -l plate1/A01
      polystore ls -R --json plate1
      polystore ls 'plate1/*/site1.npy'
    """
    backend = state.backend()
    if has_magic(path) and not backend.exists(path):
        matches = [backend.stat(p) for p in expand(backend, path)]
        if recursive:
            matches = [
                m
                for st in matches
                for m in ([st] if st.kind == "file" else [st, *_subtree(backend, st.path)])
            ]
        _print_entries(matches, "", True, long, as_json)
        return
    norm = paths.normalize(path)
    top = backend.stat(norm)
    if top.kind == "file":
        entries, full = [top], True
    elif recursive:
        entries, full = _subtree(backend, norm), True
    elif long or as_json:
        entries = [backend.stat(paths.join(norm, name)) for name in backend.list_dir(norm)]
        full = False
    else:
        # Names stream from the directory page by page; only directories (usually
        # far fewer than files) are fetched as a set, to mark them with "/".
        dirs = {
            _relative(st.path, norm)
            for st in _subtree(backend, norm, kind="dir")
            if "/" not in _relative(st.path, norm)
        }
        for name in backend.iter_dir(norm):
            click.echo(name + ("/" if name in dirs else ""))
        return
    _print_entries(entries, norm, full, long, as_json)


def _print_entries(
    entries: list[StatResult], norm: str, full: bool, long: bool, as_json: bool
) -> None:
    if as_json:
        echo_json([stat_dict(st) for st in entries])
    elif long:
        columns = ["kind", "size", "dtype", "shape", "modified", "path" if full else "name"]
        print_table(columns, _long_rows(entries, norm, full), right=["size"])
    else:
        for st in entries:
            click.echo(st.path + ("/" if st.kind == "dir" else ""))


@main.command()
@click.argument("path", default="", shell_complete=complete_catalog_path)
@click.option("-L", "--max-depth", type=click.IntRange(min=1), help="Descend at most this deep.")
@url_option
@pass_state
def tree(state: State, path: str, max_depth: int | None) -> None:
    """Draw the directory tree under PATH (default: the root).

    \b
    Example:
      polystore tree -L 2 plate1
    """
    backend = state.backend()
    norm = paths.normalize(path)
    top = backend.stat(norm)
    if top.kind == "file":
        click.echo(norm)
        return
    children: dict[str, list[tuple[str, str]]] = defaultdict(list)
    counts = {"dir": 0, "file": 0}
    for st in _subtree(backend, norm):
        rel = _relative(st.path, norm)
        parent, name = paths.split(rel)
        if max_depth is not None and len(paths.split_parts(rel)) > max_depth:
            continue
        children[parent].append((name, st.kind))
        counts[st.kind] += 1

    click.echo((norm or ".") + "/")

    def draw(rel: str, prefix: str) -> None:
        entries = sorted(children.get(rel, []))
        for i, (name, kind) in enumerate(entries):
            last = i == len(entries) - 1
            click.echo(f"{prefix}{'└── ' if last else '├── '}{name}{'/' if kind == 'dir' else ''}")
            if kind == "dir":
                draw(paths.join(rel, name), prefix + ("    " if last else "│   "))

    draw("", "")
    dirs, files = counts["dir"], counts["file"]
    click.echo(
        f"\n{dirs} director{'y' if dirs == 1 else 'ies'}, {files} file{'' if files == 1 else 's'}"
    )


@main.command()
@click.argument("paths_", metavar="PATH...", nargs=-1, required=True,
                shell_complete=complete_catalog_path)  # fmt: skip
@url_option
@pass_state
def cat(state: State, paths_: tuple[str, ...]) -> None:
    """Print the value stored at PATH, for each PATH in turn.

    Text is printed as it is, bytes are written raw, JSON values are
    pretty-printed and arrays are shown as numpy prints them (summarised
    when large). PATH may be a glob matched in the catalog (quote it).
    """
    backend = state.backend()
    for pattern in paths_:
        for path in expand(backend, pattern):
            _cat_one(backend, path)


def _cat_one(backend: SQLBackend, path: str) -> None:
    st = backend.stat(path)
    if st.kind == "file" and st.serializer == "bytes" and (st.size or 0) > 8 << 20:
        out = sys.stdout.buffer
        for chunk in backend.iter_content(path):
            out.write(chunk)
        out.flush()
        return
    value = backend.load(path)
    if isinstance(value, bytes):
        click.echo(value, nl=False)  # bytes go to the binary stream as they are
    elif isinstance(value, str):
        click.echo(value, nl=False)
    elif value is None or isinstance(value, dict | list | int | float | bool):
        click.echo(json.dumps(value, indent=2, ensure_ascii=False))
    else:
        import numpy as np

        if isinstance(value, np.ndarray):
            click.echo(f"# ndarray dtype={value.dtype} shape={value.shape}")
        click.echo(repr(value))


@main.command()
@click.argument("path", default="", shell_complete=complete_catalog_path)
@json_option
@url_option
@pass_state
def stat(state: State, path: str, as_json: bool) -> None:
    """Show everything the catalog records about PATH.

    Kind, size, serializer, dtype, shape, user attributes, content hash, where
    the content is stored, and creation and modification times. PATH may be a
    glob matched in the catalog (quote it); ``--json`` then prints a list.
    """
    backend = state.backend()
    globbed = has_magic(path) and not backend.exists(path)
    found = [stat_dict(backend.stat(p)) for p in expand(backend, path)]
    if as_json:
        echo_json(found if globbed else found[0])
        return
    for i, info in enumerate(found):
        if info["size"] is not None:
            info["size"] = f"{info['size']} ({human_size(info['size'])})"
        if i:
            click.echo()
        print_table(["field", "value"], [[key, value] for key, value in info.items()])


@main.command()
@click.argument("path", default="", shell_complete=complete_catalog_path)
@click.option("-s", "--summarize", is_flag=True, help="Only the total, not one row per entry.")
@json_option
@url_option
@pass_state
def du(state: State, path: str, summarize: bool, as_json: bool) -> None:
    """Show how much data is stored under PATH (default: the root).

    One row per entry of PATH with its file count and size, then the total.
    ``unique`` counts each distinct content once: files with identical
    content share one stored copy.
    """
    backend = state.backend()
    norm = paths.normalize(path)
    top = backend.stat(norm)
    nodes = [top] if top.kind == "file" else _subtree(backend, norm)
    files = [st for st in nodes if st.kind == "file"]
    # name -> [kind, files, size] for each entry directly in PATH
    entries: dict[str, list[Any]] = {}
    if top.kind == "dir" and not summarize:
        for st in nodes:
            first, _, rest = _relative(st.path, norm).partition("/")
            if not rest:
                entries[first] = [st.kind, 0, 0]
        for st in files:
            first = _relative(st.path, norm).partition("/")[0]
            entries[first][1] += 1
            entries[first][2] += st.size or 0
    unique = {st.hash: st.size or 0 for st in files}
    total_size = sum(st.size or 0 for st in files)
    if as_json:
        echo_json(
            {
                "path": norm,
                "files": len(files),
                "size": total_size,
                "unique_size": sum(unique.values()),
                "entries": [
                    {"name": name, "kind": kind, "files": n, "size": size}
                    for name, (kind, n, size) in sorted(entries.items())
                ],
            }
        )
        return
    rows: list[list[Any]] = [
        [name + ("/" if kind == "dir" else ""), n, human_size(size)]
        for name, (kind, n, size) in sorted(entries.items())
    ]
    rows.append([f"total ({norm or '.'})", len(files), human_size(total_size)])
    rows.append(["unique content", len(unique), human_size(sum(unique.values()))])
    print_table(["entry", "files", "size"], rows, right=["files", "size"])
