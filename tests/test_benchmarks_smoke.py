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
            "load_one,move_dir,delete_tree",
            "--delete-rounds",
            "1",
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
    for name in ("load_one", "move_dir", "delete_tree"):
        row = next(line for line in lines if line.startswith(f"| {name} "))
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        assert len(cells) == 6
        assert cells[-1] in ("PASS", "MISS")
    assert (tmp_path / "results.json").is_file()


PEERS = RUN.with_name("peers.py")


def test_quick_peer_benchmark_prints_one_table(tmp_path: Path) -> None:
    """benchmarks/peers.py at quick sizes: one table, every workload, a peer missing is a SKIP."""
    result = subprocess.run(
        [sys.executable, str(PEERS), "--quick", "--repeat", "1", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| workload"))
    for column in ("tool", "median", "vs polystore", "rounds"):
        assert column in header
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in lines[lines.index(header) + 2 :]
        if line.startswith("|")
    ]
    workloads = [cells[0] for cells in rows if cells[0]]
    assert len(workloads) == 8, workloads
    polystore = [cells for cells in rows if cells[1] == "polystore"]
    assert len(polystore) == 8
    assert all(cells[3] == "1.00x" for cells in polystore)
    for peer, module in (("h5py", "h5py"), ("diskcache", "diskcache"), ("zarr LocalStore", "zarr")):
        timed = [cells for cells in rows if cells[1] == peer and cells[2] != "-"]
        try:
            __import__(module)
        except ImportError:
            assert not timed, peer
            assert any(line.startswith(f"{peer}: SKIP") for line in lines), result.stdout
        else:
            assert timed, peer
    # plain .npy files take part in every workload
    assert sum(cells[1] == "np.save files" and cells[2] != "-" for cells in rows) == 8
