"""Run polystore's benchmarks against raw drivers and print one table.

    .venv/bin/python benchmarks/run.py                 # everything, ~5-10 minutes
    .venv/bin/python benchmarks/run.py --quick         # small sizes, a smoke test
    .venv/bin/python benchmarks/run.py --only save_sqlite --only exists --repeat 9
    .venv/bin/python benchmarks/run.py --no-postgres --json results.json
    .venv/bin/python benchmarks/run.py --only load_one --profile /tmp/prof

Each scenario times polystore and its raw baseline in this process, interleaved
round by round, and reports medians; the ratio is polystore / raw. The goals are
those of issue 3 ("Performance") as issue 19 tightened them. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import FULL, QUICK, Bench, Row, checkout, format_seconds, log, markdown_table
from scenarios import SCENARIOS

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="polystore vs raw drivers, same process, interleaved runs, medians.",
        epilog=f"scenarios: {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--repeat", type=int, default=5, help="timed rounds per scenario (default 5)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run only this scenario (repeatable, or comma-separated)",
    )
    parser.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL scenarios")
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("POLYSTORE_BENCH_PG_URL")
        or os.environ.get("POLYSTORE_TEST_PG_URL")
        or DEFAULT_PG_URL,
        help="PostgreSQL server to use; each run gets a fresh schema, dropped afterwards "
        "(default: $POLYSTORE_BENCH_PG_URL, $POLYSTORE_TEST_PG_URL or %(default)s)",
    )
    parser.add_argument("--json", metavar="FILE", type=Path, help="also write results as JSON")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        type=Path,
        help="after timing, run polystore's side once more under cProfile; "
        "write DIR/<scenario>.prof and a .txt summary",
    )
    parser.add_argument(
        "--profiler",
        choices=("cprofile", "pyinstrument"),
        default="cprofile",
        help="with --profile: cProfile (deterministic) or pyinstrument (sampling, "
        "`pip install pyinstrument`) (default %(default)s)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="where the SQLite files and the real directory go (default: a temp dir)",
    )
    parser.add_argument(
        "--build-budget",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="exists: time allowed to build the large catalog through save_batch before "
        "the remaining nodes are bulk-inserted with SQL (default %(default)s)",
    )
    parser.add_argument(
        "--delete-files",
        type=int,
        metavar="N",
        help="delete_tree: files in the tree saved and deleted (default 100,000; "
        "10,000 with --quick; issue 19 measures 1,000,000)",
    )
    parser.add_argument(
        "--delete-rounds",
        type=int,
        default=3,
        metavar="N",
        help="delete_tree: at most this many rounds (default %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    only: list[str] = []
    for item in args.only or []:
        only += [name.strip() for name in item.split(",") if name.strip()]
    unknown = [name for name in only if name not in SCENARIOS]
    if unknown:
        parser.error(
            f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}"
        )
    args.only = only
    if args.profiler == "pyinstrument":
        try:
            import pyinstrument  # noqa: F401
        except ImportError:
            parser.error("--profiler pyinstrument: pyinstrument is not installed")
    if args.profile is not None:
        try:
            args.profile.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            parser.error(f"--profile {args.profile}: {exc}")
    return args


def postgres_problem(url: str) -> str | None:
    """Why the PostgreSQL server cannot be used, or None if it can."""
    import psycopg
    from sqlalchemy.engine import make_url

    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        with psycopg.connect(conninfo, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"PostgreSQL not reachable at {url}: {str(exc).strip()}"
    return None


def machine_note() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import numpy
    import sqlalchemy

    return {
        "host": platform.node(),
        "cpu": model,
        "cores": os.cpu_count(),
        "system": platform.platform(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "sqlalchemy": sqlalchemy.__version__,
        "numpy": numpy.__version__,
        "loadavg_start": os.getloadavg(),
        "commit": checkout(),
    }


def cell(row: Row, which: str) -> str:
    value = row.polystore if which == "polystore" else row.raw
    if row.kind == "growth":
        return "-" if value is None else f"{value:.2f}x"
    if row.kind == "bytes":
        return "-" if value is None else f"{value / (1 << 20):.2f} MiB"
    text = format_seconds(value)
    return f"{text}/call" if row.per_call and value is not None else text


def table(rows: list[Row]) -> str:
    header = ["scenario", "polystore", "raw", "ratio", "goal", "result"]
    lines = [header]
    for row in rows:
        ratio = "-" if row.ratio is None or row.kind == "growth" else f"{row.ratio:.2f}x"
        if row.kind == "growth":
            goal = f"growth <= {row.goal:g}x"
        else:
            goal = "-" if row.goal is None else f"<= {row.goal:g}x"
        if row.kind == "budget" and row.goal is not None:
            goal = f"<= {format_seconds(row.goal)}"
        lines.append([row.name, cell(row, "polystore"), cell(row, "raw"), ratio, goal, row.verdict])
    return markdown_table(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.only or list(SCENARIOS)
    pg_problem: str | None = None
    wanted_pg = not args.no_postgres and any(SCENARIOS[name].postgres for name in names)
    if wanted_pg:
        pg_problem = postgres_problem(args.pg_url)
    started = dt.datetime.now().astimezone()
    machine = machine_note()
    with tempfile.TemporaryDirectory(prefix="polystore-bench-", dir=args.workdir) as workdir:
        sizes = QUICK if args.quick else FULL
        if args.delete_files:
            sizes = dataclasses.replace(sizes, delete_files=args.delete_files)
        bench = Bench(
            repeat=args.repeat,
            sizes=sizes,
            delete_rounds=args.delete_rounds,
            workdir=Path(workdir),
            pg_url=None if args.no_postgres or pg_problem else args.pg_url,
            profile_dir=args.profile,
            profiler=args.profiler,
            build_budget=args.build_budget,
        )
        rows: list[Row] = []
        clock = time.perf_counter()
        for name in names:
            scenario = SCENARIOS[name]
            if scenario.postgres and bench.pg_url is None:
                reason = "--no-postgres" if args.no_postgres else pg_problem or ""
                rows.append(Row(name=name, what=reason, kind="skip", note=reason))
                continue
            log(f"{name} ...")
            start = time.perf_counter()
            rows += scenario.func(bench)
            log(f"{name}: {time.perf_counter() - start:.1f} s")
        total = time.perf_counter() - clock
    machine["loadavg_end"] = os.getloadavg()

    mode = "quick" if args.quick else "full"
    print(
        f"polystore benchmarks, {started:%Y-%m-%d %H:%M %Z}, {mode} sizes, "
        f"median of {args.repeat} interleaved rounds, {total:.0f} s in all, "
        f"polystore at {machine['commit']}"
    )
    print(
        f"{machine['cpu']} x{machine['cores']}, Python {machine['python']}, "
        f"SQLite {machine['sqlite']}, SQLAlchemy {machine['sqlalchemy']}; load average "
        f"{machine['loadavg_start'][0]:.1f} at start, {machine['loadavg_end'][0]:.1f} at end"
    )
    print()
    print(table(rows))
    print()
    for row in rows:
        print(f"- {row.name}: {row.what}")
        if row.note and row.note != row.what:
            print(f"  note: {row.note}")
    misses = [row.name for row in rows if row.verdict == "MISS"]
    print()
    print(
        f"{len(misses)} of {sum(r.goal is not None for r in rows)} goals missed"
        + (f": {', '.join(misses)}" if misses else "")
    )

    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "date": started.isoformat(),
                    "mode": mode,
                    "repeat": args.repeat,
                    "seconds": total,
                    "machine": machine,
                    "rows": [row.as_json() for row in rows],
                },
                indent=2,
            )
        )
        log(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
