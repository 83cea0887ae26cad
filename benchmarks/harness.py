"""Timing machinery shared by the scenarios: interleaved runs, medians, profiles.

The machines these benchmarks run on are shared and noisy, so every scenario
measures polystore and its raw-driver baseline in the same process, round by
round, rotating which side goes first, and quotes medians. Setup and teardown of
each run (fresh databases, opening backends, dropping schemas) are never timed.
"""

from __future__ import annotations

import cProfile
import gc
import io
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "FULL",
    "QUICK",
    "Bench",
    "Row",
    "Side",
    "Sizes",
    "checkout",
    "format_seconds",
    "log",
    "markdown_table",
    "median",
    "step",
    "time_calls",
    "time_runs",
]


def log(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the table."""
    print(message, file=sys.stderr, flush=True)


@dataclass
class Side:
    """One contender in a bulk scenario: ``run`` is timed, the rest is not.

    ``prepare`` builds fresh state for one run (a new database, an open backend)
    and ``cleanup`` disposes of it; ``check`` validates what ``run`` returned, so
    a benchmark cannot silently measure a no-op.
    """

    run: Callable[[Any], Any]
    prepare: Callable[[], Any] = lambda: None
    cleanup: Callable[[Any], None] = lambda state: None
    check: Callable[[Any, Any], None] = lambda state, result: None


@dataclass
class Row:
    """One line of the result table."""

    name: str
    what: str
    polystore: float | None = None  # seconds (median), or a growth factor for kind="growth"
    raw: float | None = None
    #: polystore/raw must be <= goal (for kind="budget": polystore's seconds must
    #: be); None: informational
    goal: float | None = None
    #: "ratio", "budget" (an absolute goal in seconds), "growth", "bytes" (values in
    #: bytes), "info" or "skip"
    kind: str = "ratio"
    per_call: bool = False
    note: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.kind == "growth":
            return self.polystore
        if self.polystore is None or not self.raw:
            return None
        return self.polystore / self.raw

    @property
    def verdict(self) -> str:
        if self.kind == "skip":
            return "SKIP"
        if self.kind == "budget" and self.goal is not None and self.polystore is not None:
            return "PASS" if self.polystore <= self.goal else "MISS"
        if self.goal is None or self.ratio is None:
            return "info"
        return "PASS" if self.ratio <= self.goal else "MISS"

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "what": self.what,
            "kind": self.kind,
            "per_call": self.per_call,
            "polystore": self.polystore,
            "raw": self.raw,
            "ratio": self.ratio,
            "goal": self.goal,
            "verdict": self.verdict,
            "note": self.note,
            "samples": self.samples,
        }


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is; ``--quick`` shrinks everything for a smoke test."""

    batch: int  # arrays per save_batch / load_batch
    calls: int  # timed calls per round in the per-call scenarios
    listing: int  # entries in the list_dir directory
    small_catalog: int  # files in the smaller catalog of the exists scenario
    large_catalog: int  # files in the larger one
    delete_files: int  # files in the tree delete_tree saves and deletes (--delete-files)
    files_per_dir: int = 1000


FULL = Sizes(
    batch=10_000,
    calls=2_000,
    listing=100_000,
    small_catalog=10_000,
    large_catalog=1_000_000,
    delete_files=100_000,
)
QUICK = Sizes(
    batch=1_000,
    calls=200,
    listing=10_000,
    small_catalog=1_000,
    large_catalog=100_000,
    delete_files=10_000,
)


@dataclass
class Bench:
    """What every scenario is given: sizes, repetitions, where to work, profiling."""

    repeat: int
    sizes: Sizes
    workdir: Path
    pg_url: str | None
    profile_dir: Path | None = None
    profiler: str = "cprofile"  # or "pyinstrument", if installed
    #: Seconds the exists scenario may spend building its large catalog through
    #: the public API before it bulk-inserts the rest with SQL.
    build_budget: float = 300.0
    #: Most rounds of delete_tree (each saves and deletes the whole tree).
    delete_rounds: int = 3

    def profile(self, name: str, work: Callable[[], Any]) -> None:
        """Run ``work`` once more under the profiler, if asked to, and keep the report."""
        if self.profile_dir is None:
            return
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        stem = self.profile_dir / name.replace("/", "_").replace("@", "_at_")
        gc.collect()
        if self.profiler == "pyinstrument":
            # A sampling profiler: far less overhead on call-heavy Python code
            # than cProfile, so the shares it reports are closer to the truth.
            from pyinstrument import Profiler

            sampler = Profiler(interval=0.0002)
            with sampler:
                work()
            Path(f"{stem}.txt").write_text(sampler.output_text(unicode=True, show_all=False))
            Path(f"{stem}.html").write_text(sampler.output_html())
            log(f"  profile of {name}: {stem}.txt (+ .html)")
            return
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            work()
        finally:
            profiler.disable()
        profiler.dump_stats(f"{stem}.prof")
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.strip_dirs().sort_stats("cumulative").print_stats(45)
        stats.sort_stats("tottime").print_stats(30)
        Path(f"{stem}.txt").write_text(text.getvalue())
        log(f"  profile of {name}: {stem}.prof (+ .txt summary)")


def _rotated(names: list[str], round_no: int) -> list[str]:
    shift = round_no % len(names)
    return names[shift:] + names[:shift]


def time_runs(
    sides: dict[str, Side],
    repeat: int,
    *,
    warmup: int = 1,
    slow: Collection[str] = (),
    slow_rounds: int = 0,
) -> dict[str, list[float]]:
    """Seconds per run for each side, ``repeat`` rounds, interleaved.

    Each round runs every side once, starting with a different side each round.
    ``warmup`` untimed rounds come first (page cache, pool, statement caches).
    Sides named in ``slow`` skip the warm-up and run only in the first
    ``slow_rounds`` timed rounds.
    """
    times: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for round_no in range(warmup + repeat):
        timed_round = round_no - warmup
        for name in _rotated(names, round_no):
            if name in slow and not 0 <= timed_round < slow_rounds:
                continue
            side = sides[name]
            state = side.prepare()
            try:
                gc.collect()
                start = time.perf_counter()
                result = side.run(state)
                elapsed = time.perf_counter() - start
                side.check(state, result)
            finally:
                side.cleanup(state)
            if timed_round >= 0:
                times[name].append(elapsed)
    return times


def time_calls(
    calls: dict[str, Callable[[], Any]], per_round: int, repeat: int
) -> dict[str, list[float]]:
    """Seconds per call for each side: ``repeat`` rounds of ``per_round`` calls each.

    Every call is timed on its own; within a round each side runs its block of
    calls in turn, starting with a different side each round. One untimed block
    per side warms up first.
    """
    samples: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for name in names:
        for _ in range(min(per_round, 50)):
            calls[name]()
    clock = time.perf_counter_ns
    for round_no in range(repeat):
        for name in _rotated(names, round_no):
            call = calls[name]
            out = samples[name]
            gc.collect()
            for _ in range(per_round):
                start = clock()
                call()
                out.append((clock() - start) / 1e9)
    return samples


def median(values: list[float]) -> float:
    return statistics.median(values)


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.1f} µs"


@dataclass
class Elapsed:
    start: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0

    def so_far(self) -> float:
        return time.perf_counter() - self.start


@contextmanager
def step(message: str) -> Iterator[Elapsed]:
    """Log an untimed setup step and how long it took (also handed back)."""
    log(f"  {message} ...")
    elapsed = Elapsed()
    try:
        yield elapsed
    finally:
        elapsed.seconds = elapsed.so_far()
    log(f"  {message}: {elapsed.seconds:.1f} s")


def checkout() -> str:
    """The commit measured, ``+dirty`` when polystore/ or migrations/ have uncommitted changes."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "polystore", "migrations"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}+dirty" if dirty else commit


def markdown_table(lines: list[list[str]]) -> str:
    """Rows of cells (the first the header) as a Markdown table, columns padded."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for n, line in enumerate(lines):
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |")
        if n == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)
