"""The command line as rclone and aws-s3 users expect it, through the real executable.

Every test runs ``polystore`` in a subprocess (the console script of this
interpreter's environment), on SQLite and on PostgreSQL (``catalog_url``):
skipping unchanged files, ``--dry-run``, ``--include``/``--exclude``, catalog
globs, ``--json`` summaries, ``query`` output formats, ``rebalance``, hints,
Ctrl-C, shell completion, byte progress and streaming memory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from catalog_checks import made_before_0010
from test_cli import local_tree, make_tree, snapshot

from polystore import SQLBackend

POLYSTORE = Path(sys.executable).parent / "polystore"
MiB = 1 << 20


class Polystore:
    """``polystore --url URL [--blob-store DIR] ...`` as a subprocess."""

    def __init__(self, url: str, blob_store: Path | None = None) -> None:
        self.url = url
        self.blob_store = blob_store

    def args(self, *args: str) -> list[str]:
        store = ["--blob-store", str(self.blob_store)] if self.blob_store else []
        return [str(POLYSTORE), "--url", self.url, *store, *args]

    def __call__(
        self, *args: str, code: int = 0, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.args(*args), check=False, capture_output=True, text=True, timeout=300,
            env={**os.environ, "PYTHONWARNINGS": "error", **(env or {})}, cwd=cwd,
        )  # fmt: skip
        assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
        if code == 0:
            assert "Traceback" not in result.stderr, result.stderr
        return result

    def json(self, *args: str, **kw: Any) -> Any:
        return json.loads(self(*args, "--json", **kw).stdout)

    def backend(self) -> SQLBackend:
        return SQLBackend(self.url, blob_store=str(self.blob_store) if self.blob_store else None)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def ps(catalog_url: str, tmp_path: Path) -> Polystore:
    """The CLI on this test's catalog; PostgreSQL gets a blob store directory (SQLite has one)."""
    if catalog_url.startswith("sqlite"):
        return Polystore(catalog_url)
    return Polystore(catalog_url, tmp_path / "blobs")


# -- skipping what is already there ---------------------------------------------------


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_put_skips_unchanged_files(ps: Polystore, tmp_path: Path, algorithm: str) -> None:
    """Local files are hashed by the catalog's algorithm (SHA-256: made before 0010)."""
    if algorithm == "sha256":
        made_before_0010(ps.url)
    src = tmp_path / "src"
    original = make_tree(src)
    total = sum(len(data) for data in original.values())
    first = ps.json("put", str(src), "data")
    assert first == {"copied": len(original), "skipped": 0, "bytes": total,
                     "files": len(original), "dry_run": False}  # fmt: skip
    before = snapshot(ps.url)
    again = ps.json("put", str(src), "data")
    assert again["copied"] == 0 and again["skipped"] == len(original) and again["bytes"] == 0
    assert snapshot(ps.url) == before  # not even a modification time changed

    (src / "notes.txt").write_text("changed", encoding="utf-8")
    np.save(src / "c-order.npy", np.ones(3))
    changed = ps.json("put", str(src), "data")
    assert changed["copied"] == 2 and changed["skipped"] == len(original) - 2
    text = ps("put", str(src), "data").stdout
    assert f"skipped {len(original)} unchanged" in text
    # other attributes make the content different: copied again
    assert ps.json("put", "--attr", "run=2", str(src), "data")["copied"] == len(original)
    assert ps.json("put", "--attr", "run=2", str(src), "data")["copied"] == 0
    with ps.backend() as backend:
        assert backend.load("data/notes.txt") == "changed"
        assert backend.stat("data/raw.bin").attrs == {"run": 2}
        assert backend.hash_algorithm == algorithm


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_get_skips_unchanged_files(ps: Polystore, tmp_path: Path, algorithm: str) -> None:
    if algorithm == "sha256":
        made_before_0010(ps.url)
    src = tmp_path / "src"
    original = make_tree(src)
    ps("put", str(src), "data")
    out = tmp_path / "out"
    first = ps.json("get", "data", str(out))
    assert first["copied"] == len(original) and first["skipped"] == 0
    assert local_tree(out)[0] == original
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = ps.json("get", "data", str(out))
    assert again == {"copied": 0, "skipped": len(original), "bytes": 0,
                     "files": len(original), "dry_run": False}  # fmt: skip
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes
    (out / "raw.bin").write_bytes(b"local edit")
    (out / "sub" / "deeper" / "indent2.json").write_text('{"a": [1, 2], "é": "ü"}')  # layout
    assert ps.json("get", "data", str(out))["copied"] == 2
    assert local_tree(out)[0] == original
    with ps.backend() as backend:
        assert backend.hash_algorithm == algorithm


def test_dry_run_changes_nothing(ps: Polystore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    original = make_tree(src)
    # no catalog yet: a dry run does not create one
    plan = ps.json("put", "--dry-run", str(src), "data")
    assert plan["copied"] == len(original) and plan["dry_run"] is True
    if ps.url.startswith("sqlite"):
        assert not (tmp_path / "catalog.db").exists()
    listing = ps("put", "-n", str(src), "data").stdout
    assert "would put" in listing and "data/sub/fortran.npy" in listing
    assert "nothing was changed" in listing

    ps("put", str(src), "data")
    before = snapshot(ps.url)
    (src / "raw.bin").write_bytes(b"new")
    assert ps.json("put", "--dry-run", str(src), "data")["copied"] == 1
    out = tmp_path / "out"
    assert ps.json("get", "--dry-run", "data", str(out))["copied"] == len(original)
    assert not out.exists()
    assert "would remove" in ps("rm", "-r", "--dry-run", "data").stdout
    assert "would mv data -> moved" in ps("mv", "--dry-run", "data", "moved").stdout
    assert "would cp data/raw.bin -> copy.bin" in ps("cp", "-n", "data/raw.bin", "copy.bin").stdout
    assert "exists" in one_line(ps("cp", "-n", "data/raw.bin", "data/notes.txt", code=1))
    assert snapshot(ps.url) == before


def test_include_and_exclude(ps: Polystore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    ps("put", "--include", "*.npy", "--include", "*.txt", "--exclude", "sub/*order*",
       "--exclude", "empty*", str(src), "data")  # fmt: skip
    with ps.backend() as backend:
        assert backend.list_files("data", recursive=True) == [
            "data/c-order.npy",  # a name pattern matches at any depth; sub/ patterns only there
            "data/notes.txt",
            "data/sub/big-endian.npy",
            "data/sub/fortran.npy",
            "data/sub/record.npy",
            "data/sub/scalar.npy",
            "data/weird [x] %_*.txt",
        ]
    out = tmp_path / "out"
    got = ps.json("get", "--exclude", "*.txt", "--include", "sub/*", "data", str(out))
    assert got["copied"] == 4
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npy")) == [
        "sub/big-endian.npy", "sub/fortran.npy", "sub/record.npy", "sub/scalar.npy",
    ]  # fmt: skip


# -- catalog globs ----------------------------------------------------------------------


@pytest.fixture
def plates(ps: Polystore) -> Polystore:
    with ps.backend() as backend:
        for plate in ("p1", "p2"):
            for well in ("A01", "A02"):
                for site in (1, 2):
                    backend.save(np.full(4, site), f"plates/{plate}/{well}/img{site}.npy")
            backend.save({"plate": plate}, f"plates/{plate}/meta.json")
        backend.save(b"literal", "plates/img[1].bin")
    return ps


def test_globs_in_ls_stat_cat(plates: Polystore) -> None:
    ps = plates
    assert ps("ls", "plates/*/A01/*.npy").stdout.splitlines() == [
        "plates/p1/A01/img1.npy", "plates/p1/A01/img2.npy",
        "plates/p2/A01/img1.npy", "plates/p2/A01/img2.npy",
    ]  # fmt: skip
    assert ps("ls", "plates/p?").stdout.splitlines() == ["plates/p1/", "plates/p2/"]
    entries = ps.json("ls", "plates/p1/A0[2]/img*")
    assert [e["path"] for e in entries] == ["plates/p1/A02/img1.npy", "plates/p1/A02/img2.npy"]
    assert "*" not in "".join(ps("ls", "-l", "plates/*/meta.json").stdout.splitlines()[2:])
    stats = ps.json("stat", "plates/*/meta.json")
    assert [s["attrs"] for s in stats] == [{}, {}] and stats[0]["serializer"] == "json"
    assert ps.json("stat", "plates/p1/meta.json")["path"] == "plates/p1/meta.json"
    cat = ps("cat", "plates/*/meta.json").stdout
    assert '"plate": "p1"' in cat and '"plate": "p2"' in cat
    # `*` never crosses a /
    assert "no catalog path matches" in one_line(ps("ls", "plates/*.npy", code=1))
    # a name that holds a wildcard is taken literally when it exists
    assert ps("cat", "plates/img[1].bin").stdout == "literal"


def test_globs_in_get_rm_cp_mv(plates: Polystore, tmp_path: Path) -> None:
    ps = plates
    out = tmp_path / "out"
    got = ps.json("get", "plates/p1/A01/img*", str(out))  # a new directory: into it
    assert got["copied"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["img1.npy", "img2.npy"]
    dirs = tmp_path / "dirs"
    assert ps.json("get", "plates/p*", str(dirs))["copied"] == 10
    assert (dirs / "p2" / "A02" / "img2.npy").is_file()  # matched directories keep their names
    assert "copied 2 paths" in ps("cp", "plates/p1/A0*", "backup/").stdout
    ps("mv", "plates/p2/A01/img*", "moved/")
    # two matches with one name cannot both move to moved/: all or nothing
    assert "exists" in one_line(ps("cp", "plates/*/A02/img1.npy", "moved/", code=1))
    assert ps("rm", "plates/*/A0*/img1.npy").stdout.strip() == "removed 3 files"
    with ps.backend() as backend:
        assert backend.list_dir("backup") == ["A01", "A02"]
        assert backend.list_files("moved") == ["moved/img1.npy", "moved/img2.npy"]
        left = backend.list_files("plates", recursive=True)
        assert not any(p.endswith("img1.npy") for p in left), left


def test_rm_counts_files(ps: Polystore, tmp_path: Path) -> None:
    with ps.backend() as backend:
        backend.save_batch(
            [b"x%d" % i for i in range(201)], [f"d/sub{i % 2}/f{i}" for i in range(201)]
        )
        backend.ensure_directory("empty")
    assert ps("rm", "-r", "d", "empty").stdout.strip() == "removed 201 files and 4 directories"
    assert "no catalog path matches" in one_line(ps("rm", "-r", "nothing*", code=1))


# -- query ----------------------------------------------------------------------------


def test_query_output_formats(plates: Polystore) -> None:
    ps = plates
    sql = "SELECT path, shape, attrs, size FROM polystore_catalog WHERE path LIKE 'plates/p1/%' ORDER BY path"
    rows = ps.json("query", sql)
    by_path = {row["path"]: row for row in rows}
    image = by_path["plates/p1/A01/img1.npy"]
    assert image["shape"] == [4] and image["attrs"] == {} and isinstance(image["size"], int)
    assert by_path["plates/p1/A01"]["attrs"] == ps.json("stat", "plates/p1/A01")["attrs"] == {}
    lines = ps("query", "--nl", sql).stdout.splitlines()
    assert [json.loads(line) for line in lines] == rows
    csv_lines = ps("query", "--csv", sql).stdout.splitlines()
    assert csv_lines[0] == "path,shape,attrs,size"
    assert "plates/p1/A01/img1.npy,[4],{},32" in csv_lines
    with ps.backend() as backend:
        backend.save(b"x", "tagged", attrs={"well": "A01", "n": [1, 2]})
    tagged = ps.json("query", "SELECT attrs FROM polystore_catalog WHERE path = 'tagged'")
    assert tagged == [{"attrs": {"well": "A01", "n": [1, 2]}}]


# -- placement: rebalance, gc, hints ------------------------------------------------------


def test_rebalance_and_the_inline_hint(ps: Polystore, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(2 * MiB))
    ps("put", str(big), "big.bin")
    assert ps.json("stat", "big.bin")["store"] != "inline"
    moved = ps.json("rebalance", "--inline-limit", str(4 * MiB))
    assert moved == {"to_external": 0, "to_inline": 1, "bytes_moved": 2 * MiB}
    assert ps.json("stat", "big.bin")["store"] == "inline"
    again = ps("put", str(big), "big.bin")  # unchanged: skipped, with a hint
    assert "skipped 1 unchanged" in again.stdout and "polystore rebalance" in again.stderr
    other = ps("put", str(big), "copy.bin")  # the same content elsewhere stays inline too
    assert "polystore rebalance" in other.stderr
    assert ps.json("rebalance")["to_external"] == 1
    assert ps.json("stat", "copy.bin")["store"] != "inline"
    assert "rebalance" in ps("rebalance").stdout
    bare = Polystore(ps.url) if not ps.url.startswith("sqlite") else None
    if bare is not None:  # a PostgreSQL catalog without a blob store
        assert "no blob store" in one_line(bare("rebalance", code=1))


def test_gc_removes_empty_shard_folders(sqlite_url: str, tmp_path: Path) -> None:
    ps = Polystore(sqlite_url)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(2 * MiB))
    ps("put", str(big), "big.bin")
    store = tmp_path / "catalog.db.blobs"
    assert len([p for p in store.iterdir() if p.is_dir()]) == 1
    ps("rm", "big.bin")
    assert ps.json("gc", "--grace", "0")["blobs_deleted"] == 1
    assert [p.name for p in store.iterdir()] == ["polystore-owner.json"]


def test_plain_http_s3_endpoint_hint(catalog_url: str, tmp_path: Path) -> None:
    store = "s3://bucket/prefix?endpoint=http://127.0.0.1:9&access_key_id=a&secret_access_key=b"
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (2 * MiB))
    failed = subprocess.run(
        [str(POLYSTORE), "--url", catalog_url, "--blob-store", store, "put", str(big), "b"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert failed.returncode == 1
    assert "allow_http=true" in one_line(failed)


def test_in_memory_url_is_refused(tmp_path: Path) -> None:
    for args in (["ls"], ["put", str(tmp_path), "x"], ["gc"]):
        failed = Polystore("sqlite://")(*args, code=1, cwd=tmp_path)
        assert "in-memory" in one_line(failed)


# -- the terminal -------------------------------------------------------------------------


def _interruptible(argv: list[str]) -> list[str]:
    """``argv``, run with Ctrl-C as in a terminal.

    A shell starts background jobs (a CI script run with ``&``, say) with
    SIGINT ignored, and a Python program started so leaves it ignored, as it
    should. The command is exec'd from a stub that restores the default first.
    """
    stub = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    return [sys.executable, "-c", stub, *argv]


def _wait_until_reading_stdin(pid: int) -> None:
    """Until process ``pid`` waits in ``read(0, ...)`` (Linux), so a SIGINT lands there."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            fields = Path(f"/proc/{pid}/syscall").read_text().split()
        except OSError:  # not Linux: give the imports time
            time.sleep(3)
            return
        # read() is syscall 0 on x86-64 and 63 on arm64; its first argument, the fd, is 0.
        if len(fields) > 1 and fields[0] in ("0", "63") and int(fields[1], 16) == 0:
            return
        time.sleep(0.05)
    pytest.fail("the command never read its standard input")


def test_ctrl_c_exits_130_with_one_line(catalog_url: str) -> None:
    # `query -` waits on stdin: a SIGINT then lands in the command.
    process = subprocess.Popen(
        _interruptible([str(POLYSTORE), "--url", catalog_url, "query", "-"]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _wait_until_reading_stdin(process.pid)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert [line for line in err.splitlines() if line.strip()] == ["interrupted"]


def test_help_has_no_markup() -> None:
    from test_cli import all_commands

    for command in all_commands():
        result = subprocess.run(
            [str(POLYSTORE), *command, "--help"], capture_output=True, text=True, check=True
        )
        assert "``" not in result.stdout and ":func:" not in result.stdout, command
    main_help = subprocess.run(
        [str(POLYSTORE), "--help"], capture_output=True, text=True, check=True
    )
    assert "``" not in main_help.stdout and "plate1/A01/site1.npy" in main_help.stdout


def complete(url: str, *words: str, env: dict[str, str] | None = None) -> list[str]:
    line = ["polystore", *words]
    result = subprocess.run(
        [str(POLYSTORE)], capture_output=True, text=True, check=True, timeout=60,
        env={**os.environ, **(env or {}), "_POLYSTORE_COMPLETE": "bash_complete",
             "COMP_WORDS": " ".join(line), "COMP_CWORD": str(len(line) - 1)},
    )  # fmt: skip
    # bash_complete prints "type,value" a line
    pairs = [line.partition(",") for line in result.stdout.splitlines()]
    return [value for kind, _, value in pairs if kind == "plain"]


def test_completion_of_catalog_paths(plates: Polystore, tmp_path: Path) -> None:
    url = plates.url
    assert complete(url, "--url", url, "ls", "pla") == ["plates/"]
    assert complete(url, "--url", url, "get", "plates/p1/") == [
        "plates/p1/A01/", "plates/p1/A02/", "plates/p1/meta.json",
    ]  # fmt: skip
    assert complete(url, "cat", "plates/p2/m", env={"POLYSTORE_URL": url}) == [
        "plates/p2/meta.json"
    ]
    assert complete(url, "rm", "--url", url, "plates/p1/A01/i") == [
        "plates/p1/A01/img1.npy", "plates/p1/A01/img2.npy",
    ]  # fmt: skip
    # a missing catalog offers nothing and creates nothing
    missing = f"sqlite:///{tmp_path}/missing.db"
    assert complete(missing, "--url", missing, "ls", "") == []
    assert not (tmp_path / "missing.db").exists()


def test_progress_counts_bytes(ps: Polystore, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * MiB))
    # FORCE_COLOR makes rich draw the bar although stderr is a pipe
    put = ps("put", str(big), "big.bin", env={"FORCE_COLOR": "1"})
    # bytes and files; speed and time left are there too, "?" until rich has two samples
    assert "3.0/3.0 MiB" in put.stderr and "1/1 files" in put.stderr
    get = ps("get", "big.bin", str(tmp_path / "back.bin"), env={"FORCE_COLOR": "1"})
    assert "3.0/3.0 MiB" in get.stderr and "1/1 files" in get.stderr
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()
    quiet = ps("-q", "put", str(big), "other.bin", env={"FORCE_COLOR": "1"})
    assert quiet.stderr == "" and quiet.stdout == ""


# -- streaming ----------------------------------------------------------------------------

_PEAK = """
import resource, subprocess, sys
result = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stderr.write(result.stderr)
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(result.returncode, peak_kib)
"""


def peak_memory(args: list[str]) -> int:
    """Peak resident memory (bytes) of ``args`` run in a fresh process."""
    result = subprocess.run(
        [sys.executable, "-c", _PEAK, *args], capture_output=True, text=True, check=True,
        timeout=600,
    )  # fmt: skip
    code, peak_kib = result.stdout.split()
    assert code == "0", result.stderr
    return int(peak_kib) * 1024


@pytest.mark.slow
def test_put_and_get_of_512_mib_stream(ps: Polystore, tmp_path: Path) -> None:
    size = 512 * MiB
    big = tmp_path / "big.bin"
    block = os.urandom(MiB)
    with open(big, "wb") as fh:
        fh.writelines(block[:-8] + i.to_bytes(8, "little") for i in range(size // MiB))
    put_peak = peak_memory(ps.args("put", str(big), "big.bin"))
    back = tmp_path / "back.bin"
    get_peak = peak_memory(ps.args("get", "big.bin", str(back)))
    print(f"512 MiB: put peak {put_peak / MiB:.0f} MiB, get peak {get_peak / MiB:.0f} MiB")
    assert put_peak < 160 * MiB, put_peak
    assert get_peak < 160 * MiB, get_peak
    assert back.stat().st_size == size
    with ps.backend() as backend:
        st = backend.stat("big.bin")
        assert st.size == size and st.store != "inline"
        from polystore.hashing import named

        assert named(backend.hash_algorithm).of_file(back) == (size, st.hash)
    # a second put of the same file is skipped after one hashing pass
    assert ps.json("put", str(big), "big.bin")["skipped"] == 1


# -- first run ----------------------------------------------------------------------------


def test_postgresql_without_psycopg(pg_url: str, tmp_path: Path) -> None:
    blocked = tmp_path / "blocked" / "psycopg"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError(\"No module named 'psycopg'\")\n")
    env = {"PYTHONPATH": os.pathsep.join([str(blocked.parent), os.environ.get("PYTHONPATH", "")])}
    for args in (["ls"], ["put", str(tmp_path / "blocked"), "x"], ["query", "SELECT 1"]):
        failed = Polystore(pg_url)(*args, code=1, env=env)
        assert "pip install 'polystore[postgres]'" in one_line(failed)


def test_demo_commands_work_pasted_into_a_fresh_shell(tmp_path: Path) -> None:
    """What the demo suggests runs as printed, in a shell whose PATH lacks the venv."""
    bare = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    demo = subprocess.run(
        [str(POLYSTORE), "demo", "--path", "demo", "--plates", "1", "--sites", "1",
         "--size", "32"],
        capture_output=True, text=True, check=True, cwd=tmp_path, env=bare, timeout=300,
    )  # fmt: skip
    lines = demo.stdout.split("Try next", 1)[1].splitlines()[1:]
    commands = [line.strip() for line in lines if line.startswith("  ")]
    assert commands[0].startswith("export POLYSTORE_URL=") and len(commands) > 5
    assert all(POLYSTORE.name in c or c.startswith("export") for c in commands)
    script = "set -e\n" + "\n".join(commands) + "\n"
    pasted = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, cwd=tmp_path, env=bare,
        timeout=300, check=False,
    )  # fmt: skip
    assert pasted.returncode == 0, pasted.stderr
    assert "plate1/A01/site1.npy" in pasted.stdout and (tmp_path / "A01" / "site1.npy").is_file()


def test_ctrl_c_during_put_then_put_again(ps: Polystore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4000):
        (src / f"f{i:04}.txt").write_text(str(i))
    ps("db", "upgrade")
    process = subprocess.Popen(
        _interruptible(ps.args("put", "--batch-size", "1", str(src), "d")),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    with ps.backend() as backend:
        while backend.count_nodes() < 30 and time.monotonic() < deadline:
            time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, (out, err)
    line = one_line(subprocess.CompletedProcess([], 130, out, err))
    assert line.startswith("interrupted: ") and "of 4000 files were put" in line
    done = int(line.split()[1])
    again = ps.json("put", str(src), "d")
    assert again["skipped"] >= done and again["copied"] + again["skipped"] == 4000
    with ps.backend() as backend:
        assert len(backend.list_files("d")) == 4000
