"""Commands that change the tree inside the catalog: ``rm``, ``mv``, ``cp``.

Each command runs in one catalog transaction: with several paths, either all of
them are removed, moved or copied, or (on any error) none is.
"""

from __future__ import annotations

import errno

import click

from polystore import paths
from polystore.cli.app import State, main, pass_state, url_option
from polystore.cli.output import info

__all__ = ["cp", "mv", "rm"]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@main.command()
@click.argument("targets", metavar="PATH...", nargs=-1, required=True)
@click.option(
    "-r", "-R", "--recursive", is_flag=True, help="Remove directories and everything in them."
)
@url_option
@pass_state
def rm(state: State, targets: tuple[str, ...], recursive: bool) -> None:
    """Remove files, and directories with -r.

    An empty directory is removed without -r. Content no longer referenced by
    any file is freed (inline content at once, external blobs by ``gc``).

    \b
    Example:
      polystore rm -r plate2
    """
    backend = state.backend()
    for target in targets:
        if paths.normalize(target) == paths.ROOT:
            raise click.ClickException("refusing to remove the catalog root; remove its entries")
    try:
        with backend.transaction():
            for target in targets:
                backend.delete(target, recursive=recursive)
    except OSError as exc:
        if exc.errno == errno.ENOTEMPTY:
            where = f": {exc.filename}" if exc.filename else ""
            raise click.ClickException(
                f"directory not empty{where} (use rm -r to remove it and everything in it)"
            ) from exc
        raise
    info(state, f"removed {_plural(len(targets), 'path')}")


def _destinations(state: State, sources: tuple[str, ...], dest: str) -> list[tuple[str, str]]:
    """``(src, dst)`` pairs with cp/mv rules: into DEST when it is a directory."""
    backend = state.backend()
    norm_dest = paths.normalize(dest)
    into = (
        len(sources) > 1
        or dest.endswith("/")
        or norm_dest == paths.ROOT
        or backend.is_dir(norm_dest)
    )
    pairs = []
    for src in sources:
        norm_src = paths.normalize_file(src)
        target = paths.join(norm_dest, paths.split(norm_src)[1]) if into else norm_dest
        pairs.append((norm_src, target))
    return pairs


@main.command()
@click.argument("sources", metavar="SRC...", nargs=-1, required=True)
@click.argument("dest")
@url_option
@pass_state
def mv(state: State, sources: tuple[str, ...], dest: str) -> None:
    """Move or rename files and directories inside the catalog.

    When DEST is an existing directory, ends with ``/`` or several sources are
    given, each source moves into DEST; otherwise SRC is renamed to DEST, which
    must not exist. Moving a directory rewrites one catalog row, however much
    it holds.

    \b
    Examples:
      polystore mv plate1/A01 plate1/A01-bad
      polystore mv plate1/A01/site1.npy plate1/A01/site2.npy archive/
    """
    pairs = _destinations(state, sources, dest)
    backend = state.backend()
    with backend.transaction():
        for src, dst in pairs:
            backend.move(src, dst)
    info(state, f"moved {_plural(len(pairs), 'path')}")


@main.command()
@click.argument("sources", metavar="SRC...", nargs=-1, required=True)
@click.argument("dest")
@url_option
@pass_state
def cp(state: State, sources: tuple[str, ...], dest: str) -> None:
    """Copy files and directory trees inside the catalog.

    Same rules for DEST as ``mv``. Only catalog rows are copied: the copies
    share their content with the originals, so a copy costs no content space.

    \b
    Example:
      polystore cp plate1 plate1-backup
    """
    pairs = _destinations(state, sources, dest)
    backend = state.backend()
    with backend.transaction():
        for src, dst in pairs:
            backend.copy(src, dst)
    info(state, f"copied {_plural(len(pairs), 'path')}")
