"""``rebalance``: move content between the database and the blob store to match the inline limit."""

from __future__ import annotations

import dataclasses

import click

from polystore.cli.app import State, json_option, main, pass_state, url_option
from polystore.cli.output import echo_json, human_size, info, print_table, spinner

__all__ = ["rebalance"]


@main.command()
@click.option(
    "--inline-limit",
    type=click.IntRange(min=0),
    metavar="BYTES",
    help="Content over this many bytes goes to the blob store, the rest into the "
    "database [default: the catalog's inline limit, 1 MiB].",
)
@json_option
@url_option
@pass_state
def rebalance(state: State, inline_limit: int | None, as_json: bool) -> None:
    """Move stored content to where the inline limit says it belongs.

    Content is stored once however many files share it, and stays where it
    was first put: after the limit changes, or after content first saved
    without a blob store (everything inline) is saved again with one, run
    rebalance to move content over the limit to the blob store (``--blob-store``)
    and smaller content into the database. Each blob moves in its own
    transaction; files read the same throughout. Without a blob store nothing
    moves.

    \b
    Examples:
      polystore --blob-store /data/blobs rebalance
      polystore rebalance --inline-limit 65536
    """
    backend = state.backend()
    if backend.blob_store is None:
        raise click.ClickException(
            "this catalog has no blob store, so all content stays in the database; "
            "give one with --blob-store DIR or s3://bucket/prefix"
        )
    with spinner(state, "rebalance: moving content..."):
        report = backend.rebalance(inline_limit)
    if as_json:
        echo_json(dataclasses.asdict(report))
        return
    print_table(
        ["rebalance", ""],
        [
            ["moved to the blob store", report.to_external],
            ["moved into the database", report.to_inline],
            ["bytes moved", human_size(report.bytes_moved)],
        ],
        right=[""],
    )
    limit = backend.inline_limit if inline_limit is None else inline_limit
    info(state, f"inline limit {human_size(limit)}; blob store {backend.blob_store.where()}")
