"""What commands print: tables (rich), JSON, progress bars, sizes.

Tables go to stdout. On a terminal they fit its width; anywhere else (a pipe, a
file, a test) they are never wrapped, so a line is a row. Progress bars go to
stderr, only on a terminal and never with ``--quiet``. Cell text is never read
as rich markup: a file may well be called ``[red].npy``.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

from polystore import paths

if TYPE_CHECKING:
    from rich.console import Console

    from polystore.backends.base import StatResult
    from polystore.cli.app import State

__all__ = [
    "cell",
    "echo_json",
    "human_size",
    "info",
    "note",
    "print_table",
    "progress",
    "spinner",
    "stat_dict",
]

#: Console width off a terminal: wide enough that no table row ever wraps.
_PIPE_WIDTH = 1 << 14


def _console(*, stderr: bool = False) -> Console:
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:
        console = Console(stderr=stderr, highlight=False, width=_PIPE_WIDTH)
    return console


def cell(value: Any) -> str:
    """A value as table text: JSON for lists and dicts, ISO 8601 for times."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if isinstance(value, dt.datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{memoryview(value).nbytes} bytes>"
    return str(value)


def print_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    right: Sequence[str] = (),
    title: str | None = None,
) -> None:
    """Print rows under a header; columns named in ``right`` are right-aligned."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(
        box=box.SIMPLE_HEAD, title=title, title_justify="left", pad_edge=False, show_edge=False
    )
    for name in columns:
        table.add_column(Text(name), justify="right" if name in right else "left")
    for row in rows:
        table.add_row(*(Text(cell(value)) for value in row))
    console = _console()
    if console.is_terminal:
        console.print(table)
        return
    # Off a terminal there is no colour to keep; drop the padding at line ends.
    with console.capture() as captured:
        console.print(table)
    for line in captured.get().splitlines():
        click.echo(line.rstrip())


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    # Decimal (PostgreSQL numeric), UUID and friends: their text form.
    return str(value)


def echo_json(value: Any) -> None:
    """Print ``value`` as indented JSON."""
    click.echo(json.dumps(value, indent=2, ensure_ascii=False, default=_json_default))


def info(state: State, message: str) -> None:
    """A summary line on stdout, unless ``--quiet``."""
    if not state.quiet:
        click.echo(message)


def note(state: State, message: str) -> None:
    """A remark on stderr (not an error), unless ``--quiet``."""
    if not state.quiet:
        click.echo(f"note: {message}", err=True)


def human_size(size: int | None) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    if size is None:
        return ""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


@contextmanager
def progress(state: State, total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr; yields ``advance(n)``. Silent off a terminal or with --quiet."""
    console = None if state.quiet or total == 0 else _console(stderr=True)
    if console is None or not console.is_terminal:
        yield _ignore
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=total)

        def advance(n: int = 1) -> None:
            bar.advance(task, n)

        yield advance


@contextmanager
def spinner(state: State, label: str) -> Iterator[None]:
    """A spinner on stderr while one long call runs; silent off a terminal or with --quiet."""
    console = None if state.quiet else _console(stderr=True)
    if console is None or not console.is_terminal:
        yield
        return
    with console.status(label):
        yield


def _ignore(n: int = 1) -> None:
    """``advance`` when there is no bar to move."""


def stat_dict(st: StatResult) -> dict[str, Any]:
    """A stat result with the columns of the ``polystore_catalog`` view, for JSON."""
    return {
        "path": st.path,
        "name": paths.split(st.path)[1],
        "kind": st.kind,
        "size": st.size,
        "serializer": st.serializer,
        "dtype": st.dtype,
        "shape": list(st.shape) if st.shape is not None else None,
        "attrs": st.attrs,
        "hash": st.hash,
        "store": st.store,
        "created_at": st.created_at.isoformat() if st.created_at else None,
        "modified_at": st.modified_at.isoformat() if st.modified_at else None,
    }
