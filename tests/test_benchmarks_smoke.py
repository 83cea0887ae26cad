"""The benchmark runner still runs: one small scenario, quick sizes, one round.

Only that it completes and prints its table is checked, never how long anything
took (tests do not assert on wall time).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


def test_quick_benchmark_prints_a_table(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(RUN),
            "--quick",
            "--repeat",
            "1",
            "--no-postgres",
            "--only",
            "load_one",
            "--workdir",
            str(tmp_path),
            "--json",
            str(tmp_path / "results.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| scenario"))
    for column in ("polystore", "raw", "ratio", "goal", "result"):
        assert column in header
    row = next(line for line in lines if line.startswith("| load_one"))
    cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
    assert len(cells) == 6
    assert cells[-1] in ("PASS", "MISS")
    assert (tmp_path / "results.json").is_file()
