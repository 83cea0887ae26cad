"""Commands about the catalog as a whole: ``query``, ``gc``, ``fsck`` and ``db ...``."""

from __future__ import annotations

import dataclasses
import sys

import click

from polystore.cli.app import State, json_option, main, pass_state, url_option
from polystore.cli.output import echo_json, human_size, info, print_records, print_table, spinner
from polystore.cli.sql import DEFAULT_TIMEOUT

__all__ = ["db", "fsck", "gc", "query"]


@main.command()
@click.argument("sql")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
    help="Stop the statement after this many seconds (0: no limit).",
)
@click.option(
    "--json", "output", flag_value="json", help="Print the rows as a JSON list of objects."
)
@click.option("--nl", "output", flag_value="nl", help="Print one JSON object a line (JSON Lines).")
@click.option("--csv", "output", flag_value="csv", help="Print CSV with a header row.")
@url_option
@pass_state
def query(state: State, sql: str, timeout: float, output: str | None) -> None:
    """Run one read-only SQL statement and print the rows as a table.

    The ``polystore_catalog`` view has one row per file or directory, with
    columns path, name, kind, size, serializer, dtype, shape, attrs, hash,
    store, created_at and modified_at. Statements that would write
    (``INSERT``, ``UPDATE``, ``DELETE``, ``DROP``, ``ATTACH``, ...) are refused
    and the catalog is left untouched; so, on PostgreSQL, are statements other
    than reads and calls of server functions such as ``pg_reload_conf()``. A
    statement that runs longer than ``--timeout`` is stopped. SQL is ``-`` to
    read it from stdin.

    ``--json``, ``--nl`` and ``--csv`` are for scripts. The view's JSON
    columns (``shape``, ``attrs``) come out as JSON values, not as text, and
    ``attrs`` of a node without attributes as ``{}`` (as ``polystore stat``
    shows it); in CSV they are JSON text.

    This guards against accidents, not against someone determined: give
    untrusted users a database role that may only SELECT.

    \b
    Examples:
      polystore query "SELECT dtype, COUNT(*) AS n FROM polystore_catalog GROUP BY dtype"
      polystore query --json "SELECT path, size FROM polystore_catalog WHERE kind = 'file'"
      polystore query --csv "SELECT path, shape, attrs FROM polystore_catalog" > catalog.csv
    """
    from polystore.cli.sql import run_readonly

    if sql == "-":
        sql = sys.stdin.read()
    state.require_catalog()
    result = run_readonly(state.url, sql, timeout=timeout)
    if output is not None:
        print_records(result.columns, result.rows, output)
    elif result.columns:
        print_table(result.columns, result.rows)
        info(state, f"({len(result.rows)} row{'' if len(result.rows) == 1 else 's'})")


# -- gc and fsck ---------------------------------------------------------------------


@main.command()
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="Age after which an unfinished upload counts as abandoned [default: 1 day].",
)
@json_option
@url_option
@pass_state
def gc(state: State, grace: float | None, as_json: bool) -> None:
    """Remove content no file refers to, and uploads that were abandoned.

    Works from the catalog's own records (reference counts and upload
    intents); it never lists the external blob store. Safe while other
    processes read and write.
    """
    backend = state.backend()
    with spinner(state, "gc: removing unreferenced content..."):
        report = backend.gc(grace=grace)
    if as_json:
        echo_json(dataclasses.asdict(report))
        return
    print_table(
        ["gc", ""],
        [
            ["blobs deleted", report.blobs_deleted],
            ["bytes freed", human_size(report.bytes_freed)],
            ["abandoned uploads", report.intents_expired],
            ["objects deleted from the store", report.objects_deleted],
            *([["rows skipped (see fsck)", report.rows_skipped]] if report.rows_skipped else []),
        ],
        right=[""],
    )


@main.command()
@click.option(
    "--verify",
    is_flag=True,
    help="Also read every blob and check its hash (slow: reads all content).",
)
@json_option
@url_option
@pass_state
def fsck(state: State, verify: bool, as_json: bool) -> None:
    """Check the catalog against its content, both ways.

    Every file's blob exists with the recorded size (and, with --verify, the
    right hash); every object in the external blob store is referenced; every
    reference count is right. Exits with status 1 when something is wrong.
    """
    backend = state.backend()
    with spinner(state, "fsck: reading every blob..." if verify else "fsck: checking blobs..."):
        report = backend.fsck(verify=verify)
    if as_json:
        echo_json(dataclasses.asdict(report) | {"ok": report.ok})
    else:
        print_table(
            ["fsck", ""],
            [
                ["blobs checked", report.blobs_checked],
                ["objects in the blob store", report.objects_checked],
                ["hashes verified", "yes" if report.verified else "no (use --verify)"],
                ["garbage for gc", report.garbage],
                ["uploads pending", report.pending_uploads],
                *[[f"blobs in store {name!r} (not checked)", n]
                  for name, n in sorted(report.other_stores.items())],
            ],
            right=[""],
        )  # fmt: skip
        problems = report.problems()
        for problem in problems:
            click.echo(f"problem: {problem}")
        info(state, "ok" if report.ok else f"{len(problems)} problems")
    if not report.ok:
        click.get_current_context().exit(1)


# -- db ----------------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Manage the catalog's schema: upgrade, downgrade, current, check, history.

    A new catalog is brought to the newest schema when it is first opened; an
    older one must be upgraded explicitly (``polystore db upgrade``) after
    polystore itself was upgraded.
    """


@db.command()
@click.argument("revision", default="head")
@url_option
@pass_state
def upgrade(state: State, revision: str) -> None:
    """Upgrade the catalog's schema to REVISION (default: head).

    Creates the catalog if the database has none. Safe to run again, and
    safe to run from several processes at once.
    """
    from polystore import migrate

    migrate.upgrade(state.url, revision)
    info(state, f"catalog at {state.url} is at revision {migrate.current(state.url)}")


@db.command(context_settings={"ignore_unknown_options": True})
@click.argument("revision")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@url_option
@pass_state
def downgrade(state: State, revision: str, yes: bool) -> None:
    """Downgrade the catalog's schema to REVISION, losing what later revisions added.

    REVISION is a revision id, ``base``, or a number of steps back such as
    ``-1``. ``base`` removes every polystore table and view, with all their
    contents. Asks for confirmation unless --yes is given.
    """
    from polystore import migrate

    if revision.startswith("-") and not revision[1:].isdigit():
        # (Unknown options reach here as REVISION, so that "-1" can.)
        raise click.NoSuchOption(revision)
    if not yes:
        target = migrate.resolve(state.url, revision)
        click.confirm(
            f"Downgrade the catalog at {state.url} to {target}? Data of later revisions "
            + ("(here: the whole catalog) " if target == "base" else "")
            + "is lost",
            abort=True,
        )
    migrate.downgrade(state.url, revision)
    info(state, f"catalog at {state.url} is at revision {migrate.current(state.url) or 'base'}")


@db.command()
@url_option
@pass_state
def current(state: State) -> None:
    """Print the catalog's schema revision (``none`` when there is no catalog)."""
    from polystore import migrate

    revision = migrate.current(state.url)
    if revision is None:
        click.echo("none")
    else:
        click.echo(revision + (" (head)" if revision == migrate.head() else ""))


@db.command()
@url_option
@pass_state
def check(state: State) -> None:
    """Check that the catalog is at head and matches polystore's models.

    Prints each problem found and exits with status 1 if there is any;
    exits 0 only when all is well.
    """
    from polystore import migrate

    problems = migrate.check(state.url)
    for problem in problems:
        click.echo(f"problem: {problem}")
    if problems:
        click.get_current_context().exit(1)
    info(
        state,
        f"ok: the catalog at {state.url} is at head ({migrate.head()}) and matches the models",
    )


@db.command()
@pass_state
def history(state: State) -> None:
    """List the schema revisions this polystore knows, oldest first."""
    from polystore import migrate

    head = migrate.head()
    rows = [
        [revision + (" (head)" if revision == head else ""), (message or "").strip()]
        for revision, message in migrate.history()
    ]
    print_table(["revision", "description"], rows)
