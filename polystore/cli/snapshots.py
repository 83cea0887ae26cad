"""Snapshot commands: ``snapshot create|list|delete``, ``diff``, ``restore``, and ``--at``.

The global ``--at SNAP`` option (declared on the group in :mod:`.app`) makes
the read commands -- :data:`AT_COMMANDS` -- read the catalog as at a snapshot:
:meth:`.State.backend` then hands them ``SQLBackend.at(SNAP)``, which answers
every read they make and refuses every write. Any other command given
``--at`` is a usage error.

A snapshot is named on the command line by its name, or by its id when no
snapshot has that name.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import click

from polystore.cli.app import State, json_option, main, pass_state, url_option
from polystore.cli.output import echo_json, info, print_table

if TYPE_CHECKING:
    from polystore.backends.sql import SQLBackend

__all__ = ["AT_COMMANDS", "check_at", "diff", "restore", "snapshot", "snapshot_ref"]

#: The commands ``--at`` applies to: they only read.
AT_COMMANDS = frozenset({"ls", "tree", "cat", "get", "stat", "du"})
#: What ``diff`` prints for each kind of change (as ``git diff --name-status``).
_LETTERS = {"added": "A", "deleted": "D", "modified": "M"}


def check_at(ctx: click.Context) -> None:
    """Refuse ``--at`` for a command that is not one of :data:`AT_COMMANDS`."""
    if ctx.invoked_subcommand not in AT_COMMANDS:
        raise click.UsageError(
            f"--at reads a snapshot: it works with {', '.join(sorted(AT_COMMANDS))}, "
            f"not {ctx.invoked_subcommand}"
        )


def snapshot_ref(backend: SQLBackend, value: str) -> str | int:
    """The snapshot ``value`` names: a name, else (all digits) an id."""
    if value.isdigit() and all(s.name != value for s in backend.snapshots()):
        return int(value)
    return value


@main.group()
def snapshot() -> None:
    """Take, list and delete snapshots: read-only views of the whole catalog at one instant.

    A snapshot copies no content and costs the same whatever the catalog's
    size. Read one with ``--at``: ``polystore --at NAME ls``.
    """


@snapshot.command("create")
@click.argument("name")
@click.option("-m", "--message", help="Say what the snapshot is for.")
@url_option
@pass_state
def create(state: State, name: str, message: str | None) -> None:
    """Take a snapshot of the catalog as it is now, called NAME.

    \b
    Example:
      polystore snapshot create before-rerun -m "plate 3 as analysed"
    """
    taken = state.backend().snapshot(name, message=message)
    info(state, f"snapshot {taken.name} (id {taken.id}) taken")


@snapshot.command("list")
@json_option
@url_option
@pass_state
def list_(state: State, as_json: bool) -> None:
    """List the snapshots, oldest first."""
    found = state.backend().snapshots()
    if as_json:
        echo_json([asdict(s) for s in found])
        return
    rows = [[s.id, s.name, s.created_at, s.message] for s in found]
    print_table(["id", "name", "created", "message"], rows, right=["id"])


@snapshot.command("delete")
@click.argument("name")
@url_option
@pass_state
def delete(state: State, name: str) -> None:
    """Delete snapshot NAME; ``polystore gc`` then frees the content only it kept."""
    backend = state.backend()
    backend.delete_snapshot(snapshot_ref(backend, name))
    info(state, f"snapshot {name} deleted")


@main.command()
@click.argument("old")
@click.argument("new", required=False)
@click.option("--path", default="", help="Only files at or under this path.")
@json_option
@url_option
@pass_state
def diff(state: State, old: str, new: str | None, path: str, as_json: bool) -> None:
    """List the files that differ between snapshot OLD and NEW (default: the catalog now).

    One line per file: ``A`` added, ``D`` deleted, ``M`` modified (content or
    attrs), then its path. A moved file is deleted at its old path and added
    at its new one.

    \b
    Examples:
      polystore diff before-rerun
      polystore diff monday tuesday --path plate3
    """
    backend = state.backend()
    changes = backend.diff(
        snapshot_ref(backend, old), None if new is None else snapshot_ref(backend, new), path
    )
    if as_json:
        echo_json([asdict(c) for c in changes])
        return
    for change in changes:
        click.echo(f"{_LETTERS[change.change]} {change.path}")


@main.command()
@click.argument("snap", metavar="SNAP")
@click.argument("path", default="")
@url_option
@pass_state
def restore(state: State, snap: str, path: str) -> None:
    """Make PATH (default: the whole catalog) exactly what it was at snapshot SNAP.

    One transaction: files and directories added since are removed, deleted
    ones come back, attrs included; no content is copied. Everything outside
    PATH is untouched.

    \b
    Example:
      polystore restore before-rerun plate3
    """
    backend = state.backend()
    backend.restore(snapshot_ref(backend, snap), path)
    info(state, f"restored {path or 'the catalog'} as at snapshot {snap}")


def open_at(backend: SQLBackend, at: str) -> Any:
    """``backend.at(...)`` for the ``--at`` option's value."""
    return backend.at(snapshot_ref(backend, at))
