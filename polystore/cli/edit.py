"""Commands that change the tree inside the catalog: ``rm``, ``mv``, ``cp``.

Each command runs in one catalog transaction: with several paths, either all of
them are removed, moved or copied, or (on any error) none is. Paths may be
catalog globs (:mod:`polystore.cli.globs`); ``--dry-run`` prints what would
happen and changes nothing.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import click

from polystore import paths
from polystore.cli.app import State, json_option, main, pass_state, url_option
from polystore.cli.complete import complete_catalog_path
from polystore.cli.globs import expand_all, has_magic
from polystore.cli.output import echo_json, info

if TYPE_CHECKING:
    from polystore.backends.sql import SQLBackend

__all__ = ["cp", "mv", "rm"]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


dry_run_option = click.option(
    "-n", "--dry-run", is_flag=True, help="Print what would happen; change nothing."
)


def _count(backend: SQLBackend, path: str) -> tuple[int, int]:
    """``(files, directories)`` that removing ``path`` removes, itself included."""
    st = backend.stat(path)
    if st.kind == "file":
        return 1, 0
    files, dirs = 0, 1  # (query lists what is under the directory, not itself)
    for node in backend.query(under=path):
        if node.kind == "file":
            files += 1
        else:
            dirs += 1
    return files, dirs


@main.command()
@click.argument(
    "targets", metavar="PATH...", nargs=-1, required=True, shell_complete=complete_catalog_path
)
@click.option(
    "-r", "-R", "--recursive", is_flag=True, help="Remove directories and everything in them."
)
@dry_run_option
@json_option
@url_option
@pass_state
def rm(
    state: State, targets: tuple[str, ...], recursive: bool, dry_run: bool, as_json: bool
) -> None:
    """Remove files, and directories with -r.

    An empty directory is removed without -r. Content no longer referenced by
    any file is freed (inline content at once, external blobs by ``gc``).
    PATH may be a glob matched in the catalog (quote it).

    \b
    Examples:
      polystore rm -r plate2
      polystore rm --dry-run 'plate1/*/site4.npy'
    """
    backend = state.backend()
    for target in targets:
        if paths.normalize(target) == paths.ROOT:
            raise click.ClickException("refusing to remove the catalog root; remove its entries")
    files = dirs = 0
    try:
        with backend.transaction():
            for path in expand_all(backend, targets):
                n_files, n_dirs = _count(backend, path)
                if n_dirs and not recursive and n_files + n_dirs > 1:
                    raise OSError(errno.ENOTEMPTY, "Directory not empty", path)
                files, dirs = files + n_files, dirs + n_dirs
                if dry_run:
                    kind = "directory" if n_dirs else "file"
                    info(state, f"would remove {kind} {path}")
                else:
                    backend.delete(path, recursive=recursive)
    except OSError as exc:
        if exc.errno == errno.ENOTEMPTY:
            where = f": {exc.filename}" if exc.filename else ""
            raise click.ClickException(
                f"directory not empty{where} (use rm -r to remove it and everything in it)"
            ) from exc
        raise
    if as_json:
        echo_json({"files": files, "directories": dirs, "dry_run": dry_run})
        return
    what = _plural(files, "file")
    if dirs:
        what += f" and {dirs} director{'y' if dirs == 1 else 'ies'}"
    info(state, f"would remove {what}; nothing was changed" if dry_run else f"removed {what}")


def _destinations(
    backend: SQLBackend, sources: tuple[str, ...], dest: str
) -> list[tuple[str, str]]:
    """``(src, dst)`` pairs with cp/mv rules: into DEST when it is a directory.

    Sources may be globs; a glob's matches always go into DEST.
    """
    expanded = expand_all(backend, sources)
    norm_dest = paths.normalize(dest)
    into = (
        len(expanded) > 1
        or len(sources) > 1
        or any(has_magic(src) for src in sources)
        or dest.endswith("/")
        or norm_dest == paths.ROOT
        or backend.is_dir(norm_dest)
    )
    pairs = []
    for src in expanded:
        norm_src = paths.normalize_file(src)
        target = paths.join(norm_dest, paths.split(norm_src)[1]) if into else norm_dest
        pairs.append((norm_src, target))
    return pairs


def _edit(state: State, verb: str, sources: tuple[str, ...], dest: str, dry_run: bool) -> None:
    backend = state.backend()
    operation = backend.move if verb == "mv" else backend.copy
    with backend.transaction():
        pairs = _destinations(backend, sources, dest)
        for src, dst in pairs:
            if dry_run:
                backend.stat(src)  # a missing source fails the dry run too
                if backend.exists(dst):
                    raise FileExistsError(errno.EEXIST, "File exists", dst)
                info(state, f"would {verb} {src} -> {dst}")
            else:
                operation(src, dst)
    done = "moved" if verb == "mv" else "copied"
    if dry_run:
        info(state, f"would have {done} {_plural(len(pairs), 'path')}; nothing was changed")
    else:
        info(state, f"{done} {_plural(len(pairs), 'path')}")


@main.command()
@click.argument(
    "sources", metavar="SRC...", nargs=-1, required=True, shell_complete=complete_catalog_path
)
@click.argument("dest", shell_complete=complete_catalog_path)
@dry_run_option
@url_option
@pass_state
def mv(state: State, sources: tuple[str, ...], dest: str, dry_run: bool) -> None:
    """Move or rename files and directories inside the catalog.

    When DEST is an existing directory, ends with ``/`` or several sources are
    given, each source moves into DEST; otherwise SRC is renamed to DEST, which
    must not exist. Moving a directory rewrites one catalog row, however much
    it holds. SRC may be a glob matched in the catalog (quote it).

    \b
    Examples:
      polystore mv plate1/A01 plate1/A01-bad
      polystore mv plate1/A01/site1.npy plate1/A01/site2.npy archive/
      polystore mv 'plate1/A01/*.npy' archive/
    """
    _edit(state, "mv", sources, dest, dry_run)


@main.command()
@click.argument(
    "sources", metavar="SRC...", nargs=-1, required=True, shell_complete=complete_catalog_path
)
@click.argument("dest", shell_complete=complete_catalog_path)
@dry_run_option
@url_option
@pass_state
def cp(state: State, sources: tuple[str, ...], dest: str, dry_run: bool) -> None:
    """Copy files and directory trees inside the catalog.

    Same rules for DEST as ``mv``. Only catalog rows are copied: the copies
    share their content with the originals, so a copy costs no content space.
    SRC may be a glob matched in the catalog (quote it).

    \b
    Example:
      polystore cp plate1 plate1-backup
    """
    _edit(state, "cp", sources, dest, dry_run)
