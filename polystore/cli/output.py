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
    "print_records",
    "print_table",
    "progress",
    "spinner",
    "stat_dict",
    "transfer_progress",
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


#: Columns of the ``polystore_catalog`` view that hold JSON: SQLite returns them
#: as text, PostgreSQL's driver already as values.
JSON_COLUMNS = frozenset({"shape", "attrs", "meta"})


def _json_cell(column: str, value: Any) -> Any:
    if column not in JSON_COLUMNS:
        return value
    if value is None:
        return {} if column == "attrs" else None
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value  # not JSON after all: the text as it is
    return value


def print_records(columns: Sequence[str], rows: Sequence[Sequence[Any]], style: str) -> None:
    """Rows as ``json`` (a list of objects), ``nl`` (an object a line) or ``csv``."""
    records = ({c: _json_cell(c, v) for c, v in zip(columns, row, strict=True)} for row in rows)
    if style == "json":
        echo_json(list(records))
    elif style == "nl":
        for record in records:
            click.echo(
                json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=_json_default)
            )
    else:
        import csv
        import io

        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        for record in records:
            writer.writerow([_csv_cell(v) for v in record.values()])
            if buffer.tell() > 1 << 16:
                click.echo(buffer.getvalue(), nl=False)
                buffer.seek(0)
                buffer.truncate()
        click.echo(buffer.getvalue(), nl=False)


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return value


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


class Meter:
    """What a transfer reports as it goes: bytes moved, files done."""

    def __init__(self, update: Callable[..., None] | None = None) -> None:
        self._update = update
        self.files = 0

    def bytes(self, n: int) -> None:
        """``n`` more bytes moved."""
        if self._update is not None and n:
            self._update(advance=n)

    def file(self, n: int = 1) -> None:
        """``n`` more files done (copied or skipped)."""
        self.files += n
        if self._update is not None:
            self._update(files=self.files)


@contextmanager
def transfer_progress(state: State, files: int, total_bytes: int, label: str) -> Iterator[Meter]:
    """A progress bar on stderr counting bytes (speed, ETA) and files.

    Silent off a terminal or with ``--quiet``. ``total_bytes`` is what the
    transfer moves at most; skipped files count as moved.
    """
    console = None if state.quiet or files == 0 else _console(stderr=True)
    if console is None or not console.is_terminal:
        yield Meter()
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[files]}/" + str(files) + " files"),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=max(total_bytes, 1), files=0)

        def update(advance: int = 0, files: int | None = None) -> None:
            if files is None:
                bar.update(task, advance=advance)
            else:
                bar.update(task, files=files)

        yield Meter(update)


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
