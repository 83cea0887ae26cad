"""The ``polystore`` command line, through click's CliRunner and as a real process.

Commands that touch the catalog run on ``catalog_url`` (a SQLite file and a
fresh PostgreSQL schema); what only the CLI decides runs on SQLite alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np
import pytest
from click.testing import CliRunner, Result

from polystore import SQLBackend, migrate
from polystore.cli import main

VENV_BIN = Path(sys.executable).parent
POLYSTORE = VENV_BIN / "polystore"

Invoke = Callable[..., Result]


@pytest.fixture
def invoke() -> Invoke:
    """Run the CLI in-process; ``code`` is the exit status the test expects."""
    runner = CliRunner()

    def run(*args: str, code: int = 0, stdin: str | None = None, **kwargs: Any) -> Result:
        result = runner.invoke(main, list(args), input=stdin, catch_exceptions=False, **kwargs)
        assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
        return result

    return run


@pytest.fixture
def cli(invoke: Invoke, catalog_url: str) -> Invoke:
    """``invoke`` against this test's catalog."""
    return lambda *args, **kw: invoke("--url", catalog_url, *args, **kw)


@pytest.fixture
def sqlite_cli(invoke: Invoke, sqlite_url: str) -> Invoke:
    return lambda *args, **kw: invoke("--url", sqlite_url, *args, **kw)


def all_commands(group: click.Group = main, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, command in sorted(group.commands.items()):
        found.append((*prefix, name))
        if isinstance(command, click.Group):
            found += all_commands(command, (*prefix, name))
    return found


def snapshot(url: str) -> list[tuple[Any, ...]]:
    """Everything the catalog records, for "nothing changed" checks."""
    with SQLBackend(url) as backend:
        return [
            (st.path, st.kind, st.size, st.hash, st.attrs, st.modified_at) for st in backend.query()
        ]


def one_error_line(result: Result) -> str:
    """The single line a user error prints on stderr."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in result.output
    return lines[0]


# -- help ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", all_commands(), ids=" ".join)
def test_every_command_has_help(invoke: Invoke, command: tuple[str, ...]) -> None:
    result = invoke(*command, "--help")
    assert result.stdout.startswith("Usage: ")
    assert " ".join(command) in result.stdout.splitlines()[0]
    assert len(result.stdout.splitlines()) > 3


def test_the_commands_of_the_design(invoke: Invoke) -> None:
    expected = {"ls", "tree", "put", "get", "cat", "rm", "mv", "cp", "du", "stat", "query"}
    expected |= {"gc", "fsck", "db", "demo"}
    assert expected <= set(main.commands)
    db = main.commands["db"]
    assert isinstance(db, click.Group)
    assert {"upgrade", "downgrade", "current", "check", "history"} <= set(db.commands)
    assert "polystore, version" in invoke("--version").stdout


# -- put and get -------------------------------------------------------------------------

JSON_FILES = {
    # json.dump's defaults, the layout get writes when nothing was recorded
    "default.json": json.dumps({"a": [1, 2.5, None], "b": {"c": True}}),
    "indent2.json": json.dumps({"a": [1, 2], "é": "ü"}, indent=2, ensure_ascii=False) + "\n",
    "indent4.json": json.dumps([{"x": 1}, {"y": "\u2603"}], indent=4),
    "tabs.json": json.dumps({"a": {"b": [1]}}, indent="\t") + "\n",
    "compact.json": json.dumps({"a": [1, 2]}, separators=(",", ":")),
    "scalar.json": "42\n",
    "string.json": '"just a string"',
    "hand-made.json": '{ "x" :  1,\n   "y": [1,2 ] }\n',
}


def make_tree(root: Path) -> dict[str, bytes]:
    """A local tree of every kind of file put types; returns {relative path: bytes}."""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty dir").mkdir()
    np.save(root / "c-order.npy", np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    np.save(root / "sub" / "fortran.npy", np.asfortranarray(np.ones((3, 5), dtype=np.int16)))
    np.save(root / "sub" / "big-endian.npy", np.arange(6, dtype=">f8"))
    np.save(root / "sub" / "scalar.npy", np.array(7, dtype=np.uint8))
    np.save(root / "sub" / "record.npy", np.zeros(2, dtype=[("x", "<i4"), ("y", "<f2")]))
    for name, text in JSON_FILES.items():
        (root / "sub" / "deeper" / name).write_text(text, encoding="utf-8")
    (root / "notes.txt").write_bytes("line one\r\nünïcödé ☃\n\n".encode())
    (root / "empty.txt").write_bytes(b"")
    (root / "raw.bin").write_bytes(bytes(range(256)) * 3)
    (root / "no-extension").write_bytes(b"\x00\x01plain")
    (root / "weird [x] %_*.txt").write_text("odd name", encoding="utf-8")
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def local_tree(root: Path) -> tuple[dict[str, bytes], set[str]]:
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    dirs = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir()}
    return files, dirs


def test_put_then_get_is_byte_identical(cli: Invoke, catalog_url: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    original = make_tree(src)
    result = cli("put", str(src), "data")
    assert f"put {len(original)} files" in result.stdout
    assert "hand-made.json" in result.stderr  # the one kept verbatim says so

    out = tmp_path / "out"
    cli("get", "data", str(out))
    files, dirs = local_tree(out)
    assert files == original
    assert dirs == local_tree(src)[1]

    # put typed the files: values come back as Python objects, not bytes
    with SQLBackend(catalog_url) as backend:
        array = backend.load("data/sub/fortran.npy")
        assert array.dtype == np.int16 and array.flags.f_contiguous
        assert backend.stat("data/sub/big-endian.npy").dtype == ">f8"
        assert backend.load("data/sub/deeper/indent2.json") == {"a": [1, 2], "é": "ü"}
        assert backend.load("data/sub/deeper/scalar.json") == 42
        assert backend.load("data/notes.txt") == "line one\r\nünïcödé ☃\n\n"
        assert backend.load("data/raw.bin") == bytes(range(256)) * 3
        assert backend.load("data/sub/deeper/hand-made.json") == JSON_FILES["hand-made.json"]
        assert backend.is_dir("data/empty dir")


def test_put_destinations(sqlite_cli: Invoke, sqlite_url: str, tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros(3))
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "c.txt").write_text("c")
    sqlite_cli("put", str(tmp_path / "a.npy"), "renamed.npy")  # to a new name
    sqlite_cli("put", str(tmp_path / "a.npy"), "dir/")  # into a directory
    sqlite_cli("put", str(tmp_path / "a.npy"), str(tmp_path / "b.txt"), "many")  # several
    for _ in range(2):  # a tree's contents, the same way every time
        sqlite_cli("put", str(tmp_path / "tree"), "copy")
    with SQLBackend(sqlite_url) as backend:
        assert backend.list_files("", recursive=True) == [
            "copy/sub/c.txt",
            "dir/a.npy",
            "many/a.npy",
            "many/b.txt",
            "renamed.npy",
        ]


def test_put_raw_and_attrs(sqlite_cli: Invoke, sqlite_url: str, tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.arange(3))
    (tmp_path / "b.json").write_text('{"k": 1}')
    sqlite_cli("put", "--raw", "--attr", "project=demo", "--attr", "n=3", str(tmp_path / "a.npy"),
               str(tmp_path / "b.json"), "raw/")  # fmt: skip
    with SQLBackend(sqlite_url) as backend:
        assert backend.load("raw/a.npy") == (tmp_path / "a.npy").read_bytes()
        assert backend.load("raw/b.json") == b'{"k": 1}'
        assert backend.stat("raw/a.npy").attrs == {"project": "demo", "n": 3}


def test_put_small_batches_and_overwrite(
    sqlite_cli: Invoke, sqlite_url: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(7):
        (src / f"f{i}.txt").write_text(str(i))
    sqlite_cli("put", "--batch-size", "2", str(src), "d")
    (src / "f3.txt").write_text("changed")
    sqlite_cli("put", "--batch-size", "2", str(src), "d")
    with SQLBackend(sqlite_url) as backend:
        assert len(backend.list_files("d")) == 7
        assert backend.load("d/f3.txt") == "changed"


def test_put_refuses_a_bad_file_and_atomic_saves_nothing(
    sqlite_cli: Invoke, sqlite_url: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("fine")
    (src / "b.npy").write_bytes(b"not an array")
    result = sqlite_cli("put", "--atomic", "--batch-size", "1", str(src), "x", code=1)
    line = one_error_line(result)
    assert "b.npy" in line and "--raw" in line
    with SQLBackend(sqlite_url) as backend:
        assert not backend.exists("x")


def test_put_checks_paths_before_writing(
    sqlite_cli: Invoke, sqlite_url: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.txt").write_text("fine")
    (src / "back\\slash.txt").write_text("refused")
    result = sqlite_cli("put", str(src), "x", code=1)
    assert "backslash" in one_error_line(result)
    with SQLBackend(sqlite_url) as backend:
        assert not backend.exists("x")


def test_get_single_file_into_directory(cli: Invoke, catalog_url: str, tmp_path: Path) -> None:
    with SQLBackend(catalog_url) as backend:
        backend.save(np.arange(4), "arr")  # an array under a name without .npy
        backend.save({"k": "v"}, "conf.json")
    cli("get", "arr", "conf.json", str(tmp_path))
    assert np.array_equal(np.load(tmp_path / "arr.npy"), np.arange(4))
    assert json.loads((tmp_path / "conf.json").read_text()) == {"k": "v"}


# -- looking around ---------------------------------------------------------------------


@pytest.fixture
def filled(catalog_url: str) -> str:
    with SQLBackend(catalog_url) as backend:
        backend.save(np.zeros((2, 3), dtype=np.uint16), "p1/A01/s1.npy", attrs={"well": "A01"})
        backend.save(np.zeros((2, 3), dtype=np.uint16), "p1/A01/s2.npy", attrs={"well": "A01"})
        backend.save({"well": "A01"}, "p1/A01/meta.json")
        backend.save("hello\n", "p1/readme.txt")
        backend.save(b"\x00\xff", "raw.bin")
        backend.ensure_directory("empty")
    return catalog_url


def test_ls(cli: Invoke, filled: str) -> None:
    assert cli("ls").stdout.splitlines() == ["empty/", "p1/", "raw.bin"]
    assert cli("ls", "p1").stdout.splitlines() == ["A01/", "readme.txt"]
    assert cli("ls", "p1/readme.txt").stdout.splitlines() == ["p1/readme.txt"]
    recursive = cli("ls", "-R", "p1").stdout.splitlines()
    assert recursive == [
        "p1/A01/",
        "p1/A01/meta.json",
        "p1/A01/s1.npy",
        "p1/A01/s2.npy",
        "p1/readme.txt",
    ]
    long = cli("ls", "-l", "p1/A01").stdout
    assert "uint16" in long and "2x3" in long and "s1.npy" in long and "12 B" in long
    entries = json.loads(cli("ls", "--json", "p1/A01").stdout)
    assert [e["name"] for e in entries] == ["meta.json", "s1.npy", "s2.npy"]
    assert entries[1]["shape"] == [2, 3] and entries[1]["attrs"] == {"well": "A01"}
    assert set(entries[0]) == {
        "path", "name", "kind", "size", "serializer", "dtype", "shape", "attrs", "hash",
        "store", "created_at", "modified_at",
    }  # fmt: skip


def test_tree(cli: Invoke, filled: str) -> None:
    out = cli("tree").stdout
    assert "├── p1/" in out and "│   ├── A01/" in out and "s2.npy" in out
    assert out.rstrip().endswith("3 directories, 5 files")
    shallow = cli("tree", "-L", "1").stdout
    assert "A01" not in shallow and "p1/" in shallow


def test_cat(cli: Invoke, filled: str) -> None:
    assert cli("cat", "p1/readme.txt").stdout == "hello\n"
    assert cli("cat", "raw.bin").stdout_bytes == b"\x00\xff"
    assert json.loads(cli("cat", "p1/A01/meta.json").stdout) == {"well": "A01"}
    assert "dtype=uint16" in cli("cat", "p1/A01/s1.npy").stdout


def test_stat_and_du(cli: Invoke, filled: str) -> None:
    info = json.loads(cli("stat", "--json", "p1/A01/s1.npy").stdout)
    assert info["dtype"] == "uint16" and info["shape"] == [2, 3] and info["size"] == 12
    assert info["store"] == "inline" and len(info["hash"]) == 64
    assert "uint16" in cli("stat", "p1/A01/s1.npy").stdout
    usage = json.loads(cli("du", "--json").stdout)
    assert usage["files"] == 5
    assert usage["size"] == 12 + 12 + len(b'{"well":"A01"}') + 6 + 2
    assert usage["unique_size"] == usage["size"] - 12  # the two images share content
    assert {e["name"]: e["files"] for e in usage["entries"]} == {"empty": 0, "p1": 4, "raw.bin": 1}
    assert "total" in cli("du", "p1").stdout
    assert json.loads(cli("du", "-s", "--json", "p1").stdout)["entries"] == []


# -- changing the tree ----------------------------------------------------------------------


def test_rm(cli: Invoke, filled: str) -> None:
    before = snapshot(filled)
    result = cli("rm", "p1", code=1)
    assert "rm -r" in one_error_line(result)
    result = cli("rm", "raw.bin", "missing", code=1)  # all or nothing
    assert "missing" in one_error_line(result)
    assert snapshot(filled) == before
    cli("rm", "empty")  # an empty directory needs no -r
    cli("rm", "-r", "p1", "raw.bin")
    assert cli("ls").stdout == ""
    assert "root" in one_error_line(cli("rm", "-r", "/", code=1))


def test_mv_and_cp(cli: Invoke, filled: str) -> None:
    cli("mv", "p1/readme.txt", "README.txt")
    cli("cp", "p1", "p2")
    cli("mv", "raw.bin", "README.txt", "empty")  # several sources: into the directory
    assert "exists" in one_error_line(cli("cp", "p1/A01/s1.npy", "p1/A01/s2.npy", code=1))
    with SQLBackend(filled) as backend:
        assert backend.list_files("", recursive=True) == [
            "empty/README.txt",
            "empty/raw.bin",
            "p1/A01/meta.json",
            "p1/A01/s1.npy",
            "p1/A01/s2.npy",
            "p2/A01/meta.json",
            "p2/A01/s1.npy",
            "p2/A01/s2.npy",
        ]
        assert backend.stat("p2/A01/s1.npy").hash == backend.stat("p1/A01/s1.npy").hash


# -- query ------------------------------------------------------------------------------------


def test_query_prints_rows(cli: Invoke, filled: str) -> None:
    sql = "SELECT path, dtype FROM polystore_catalog WHERE dtype IS NOT NULL ORDER BY path"
    rows = json.loads(cli("query", "--json", sql).stdout)
    assert rows == [
        {"path": "p1/A01/s1.npy", "dtype": "uint16"},
        {"path": "p1/A01/s2.npy", "dtype": "uint16"},
    ]
    table = cli("query", sql).stdout.splitlines()
    assert table[0].split() == ["path", "dtype"]
    assert table[2].split() == ["p1/A01/s1.npy", "uint16"]
    assert "(2 rows)" in table[-1]
    assert json.loads(cli("query", "--json", "-", stdin="SELECT 1 AS one").stdout) == [{"one": 1}]


WRITES = [
    "DELETE FROM polystore_nodes",
    "UPDATE polystore_nodes SET name = 'x'",
    (
        "INSERT INTO polystore_blobs (hash, size, store, refcount, created_at) "
        "VALUES ('h', 0, 'inline', 0, CURRENT_TIMESTAMP)"
    ),
    "DROP VIEW polystore_catalog",
    "DROP TABLE polystore_blobs",
    "CREATE TABLE intruder (a INTEGER)",
    "WITH gone AS (DELETE FROM polystore_nodes RETURNING id) SELECT * FROM gone",
]


@pytest.mark.parametrize("sql", WRITES)
def test_query_refuses_writes(cli: Invoke, filled: str, sql: str) -> None:
    before = snapshot(filled)
    result = cli("query", sql, code=1)
    line = one_error_line(result)
    assert "read-only" in line or "SQL error" in line  # SQLite has no DELETE ... RETURNING in CTEs
    assert snapshot(filled) == before
    assert cli("db", "check").exit_code == 0


@pytest.mark.parametrize(
    "sql",
    [
        "ATTACH DATABASE ':memory:' AS other",
        "PRAGMA query_only = OFF",
        "PRAGMA writable_schema = ON",
        "SELECT 1; DELETE FROM polystore_nodes",
        "BEGIN",
    ],
)
def test_query_refuses_sqlite_escapes(sqlite_cli: Invoke, sqlite_url: str, sql: str) -> None:
    with SQLBackend(sqlite_url) as backend:
        backend.save("x", "keep.txt")
    before = snapshot(sqlite_url)
    one_error_line(sqlite_cli("query", sql, code=1))
    assert snapshot(sqlite_url) == before


def test_query_allows_read_only_pragmas(sqlite_cli: Invoke, sqlite_url: str) -> None:
    SQLBackend(sqlite_url).close()
    cols = json.loads(sqlite_cli("query", "--json", "PRAGMA table_info(polystore_nodes)").stdout)
    assert "parent_id" in {c["name"] for c in cols}
    sql = "SELECT name FROM pragma_table_info('polystore_blobs') ORDER BY cid"
    assert json.loads(sqlite_cli("query", "--json", sql).stdout)[0] == {"name": "hash"}


@pytest.mark.postgres
def test_query_refuses_postgresql_escapes(invoke: Invoke, pg_url: str) -> None:
    with SQLBackend(pg_url) as backend:
        backend.save("x", "keep.txt")
    before = snapshot(pg_url)
    for sql in ("SELECT 1; DELETE FROM polystore_nodes", "COMMIT; DELETE FROM polystore_nodes",
                "SELECT nextval('polystore_nodes_id_seq')"):  # fmt: skip
        one_error_line(invoke("--url", pg_url, "query", sql, code=1))
    invoke("--url", pg_url, "query", "SET transaction_read_only = off")  # harmless: rolled back
    assert snapshot(pg_url) == before


#: A recursive CTE without end: one counting (CPU only), one returning its rows.
ENDLESS = [
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c",
]


@pytest.mark.parametrize("sql", ENDLESS, ids=["count", "rows"])
def test_query_stops_at_its_time_limit(catalog_url: str, tmp_path: Path, sql: str) -> None:
    """An endless statement stops at ``--timeout`` with one line and exit status 1.

    Run as a process with a deadline of its own, so that a query without a
    limit fails this test instead of hanging the suite.
    """
    with SQLBackend(catalog_url) as backend:
        backend.save(b"x", "keep.bin")
    before = snapshot(catalog_url)
    started = time.monotonic()
    try:
        result = run(
            sys.executable, "-m", "polystore", "--url", catalog_url, "query", "--timeout", "1", sql
        )
    except subprocess.TimeoutExpired:
        pytest.fail("polystore query --timeout 1 was still running after 120 s")
    assert time.monotonic() - started < 30
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("Error: query stopped: it ran for longer than its limit of 1 s")
    assert "--timeout" in lines[0]
    assert snapshot(catalog_url) == before


def test_query_time_limit_default_and_off(cli: Invoke, filled: str) -> None:
    assert "[default: 60.0" in cli("query", "--help").stdout
    rows = json.loads(cli("query", "--timeout", "0", "--json", "SELECT 1 AS one").stdout)
    assert rows == [{"one": 1}]
    cli("query", "--timeout", "-1", "SELECT 1", code=2)  # a usage error


#: What a PostgreSQL superuser's read-only transaction does not stop.
SERVER_SIDE_EFFECTS = [
    "SELECT pg_reload_conf()",
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid()",
    "SELECT pg_cancel_backend(0)",
    "SELECT length(pg_read_file('/etc/hostname'))",
    "select PG_CATALOG.Pg_Read_Binary_File('/etc/hostname')",
    "SELECT \"pg_ls_dir\"('.')",
    "SELECT lo_export(0, '/tmp/polystore-query-lo')",
    "SELECT query_to_xml('SELECT pg_reload_conf()', true, true, '')",
    "SELECT * FROM ts_stat('SELECT to_tsvector(pg_read_file(''/etc/hostname''))')",
    "EXPLAIN ANALYZE SELECT pg_reload_conf()",
    "/* a comment */ SELECT 1 WHERE pg_rotate_logfile ( )",
    "COPY (SELECT 1) TO PROGRAM 'true'",
    "COPY (SELECT 1) TO '/tmp/polystore-query-copy'",
    "DO $$BEGIN PERFORM pg_reload_conf(); END$$",
    "CALL anything()",
    "LOAD 'plpgsql'",
]


@pytest.mark.postgres
@pytest.mark.parametrize("sql", SERVER_SIDE_EFFECTS)
def test_query_refuses_postgresql_server_functions(invoke: Invoke, pg_url: str, sql: str) -> None:
    with SQLBackend(pg_url) as backend:
        backend.save("x", "keep.txt")
    before = snapshot(pg_url)
    line = one_error_line(invoke("--url", pg_url, "query", sql, code=1))
    assert line.startswith("Error: refused: `polystore query`"), line
    assert snapshot(pg_url) == before


@pytest.mark.postgres
def test_query_server_function_names_elsewhere_are_fine(invoke: Invoke, pg_url: str) -> None:
    SQLBackend(pg_url).close()
    sql = (
        "SELECT 'pg_reload_conf()' AS a, $x$ pg_read_file('/') $x$ AS b, 1 AS pg_read_file "
        "-- pg_terminate_backend(1)\n"
    )
    rows = json.loads(invoke("--url", pg_url, "query", "--json", sql).stdout)
    assert rows == [{"a": "pg_reload_conf()", "b": " pg_read_file('/') ", "pg_read_file": 1}]
    shown = json.loads(invoke("--url", pg_url, "query", "--json", "SHOW search_path").stdout)
    assert len(shown) == 1


@pytest.mark.postgres
def test_query_as_the_read_only_role_of_the_docs(invoke: Invoke, pg_url: str) -> None:
    """The role docs/querying.rst creates reads the catalog and can do nothing else.

    Its SQL is taken from the page and run as written, with this test's
    database, schema and a role name of its own.
    """
    import re
    import uuid

    import psycopg
    from sqlalchemy.engine import make_url
    from test_docs import DOCS, code_blocks

    with SQLBackend(pg_url) as backend:
        backend.save("x", "keep.txt", attrs={"k": 1})
    before = snapshot(pg_url)
    [block] = [
        b
        for b in code_blocks((DOCS / "querying.rst").read_text("utf-8"))
        if b.language == "sql" and "CREATE ROLE" in b.code
    ]
    url = make_url(pg_url)
    schema = re.search(r"search_path=(\w+)", str(url.query["options"]))
    assert schema is not None
    role, password = f"ps_reader_{uuid.uuid4().hex[:12]}", "choose-a-password"
    sql = (
        block.code.replace("catalog_reader", role)
        .replace("DATABASE screens", f'DATABASE "{url.database}"')
        .replace("SCHEMA public", f"SCHEMA {schema[1]}")
    )
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    reader = url.set(username=role, password=password)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql)
        other_pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        try:
            rows = invoke(
                "--url", reader.render_as_string(hide_password=False), "query", "--json",
                "SELECT path, attrs FROM polystore_catalog ORDER BY path",
            ).stdout  # fmt: skip
            assert json.loads(rows) == [{"path": "keep.txt", "attrs": {"k": 1}}]
            reader_dsn = reader.set(drivername="postgresql").render_as_string(hide_password=False)
            for statement in (
                "SELECT pg_reload_conf()",
                f"SELECT pg_terminate_backend({other_pid})",
                "SELECT pg_read_file('/etc/hostname')",
                "COPY (SELECT 1) TO PROGRAM 'true'",
                "SELECT count(*) FROM polystore_nodes",
                "DELETE FROM polystore_nodes",
            ):
                with psycopg.connect(reader_dsn, autocommit=True) as as_reader:
                    with pytest.raises(psycopg.Error) as refused:
                        as_reader.execute(statement)
                    assert refused.value.sqlstate in ("42501", "25006"), (statement, refused)
            assert conn.execute("SELECT 1").fetchone() == (1,)  # not terminated
        finally:
            conn.execute(f'DROP OWNED BY "{role}"')
            conn.execute(f'DROP ROLE "{role}"')
    assert snapshot(pg_url) == before


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--url", "mysql://u@h/db", "ls"], "unsupported database 'mysql'"),
        (["--url", "not a url", "ls"], "not a database URL"),
        (["--url", "postgresql+psycopg://postgres@127.0.0.1:1/x", "ls"], "cannot reach"),
        (["--url", "sqlite:////no/such/dir/c.db", "put", "/etc/hostname", "x"], "does not exist"),
        (["ls", "missing"], "No such file or directory: missing"),
        (["cat", "p1"], "Is a directory: p1"),
        (["cat", "p1/../raw.bin"], "'..' is not allowed"),
        (["ls", "raw.bin/inside"], "raw.bin"),
        (["get", "raw.bin", "/no/such/dir/raw.bin"], "No such file or directory"),
        (["put", "/no/such/local/file", "x"], "No such file or directory: /no/such/local/file"),
    ],
)
def test_user_errors_are_one_line(
    invoke: Invoke, sqlite_url: str, args: list[str], expected: str
) -> None:
    with SQLBackend(sqlite_url) as backend:
        backend.save(b"x", "raw.bin")
        backend.ensure_directory("p1")
    result = invoke("--url", sqlite_url, *args, code=1)
    assert expected in one_error_line(result)


def test_missing_catalog_is_not_created(invoke: Invoke, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/typo.db"
    assert "no catalog" in one_error_line(invoke("--url", url, "ls", code=1))
    assert not (tmp_path / "typo.db").exists()


#: Commands that need an existing catalog (all but ``put`` and ``db upgrade``).
NEEDS_A_CATALOG = [
    ["ls"],
    ["tree"],
    ["cat", "a.bin"],
    ["stat", "a.bin"],
    ["du"],
    ["query", "SELECT 1"],
    ["get", "a.bin", "{tmp}"],
    ["rm", "a.bin"],
    ["mv", "a.bin", "b.bin"],
    ["cp", "a.bin", "b.bin"],
    ["gc"],
    ["fsck"],
]


def _database_objects(url: str) -> list[str]:
    import sqlalchemy as sa

    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            return sorted(inspector.get_table_names() + inspector.get_view_names())
    finally:
        engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("command", NEEDS_A_CATALOG, ids=" ".join)
def test_empty_postgresql_database_is_not_made_a_catalog(
    invoke: Invoke, pg_url: str, command: list[str], tmp_path: Path
) -> None:
    assert _database_objects(pg_url) == []
    args = [arg.format(tmp=tmp_path) for arg in command]
    line = one_error_line(invoke("--url", pg_url, *args, code=1))
    assert "no catalog at" in line and "no polystore tables" in line, line
    assert "polystore db upgrade" in line
    assert _database_objects(pg_url) == []  # nothing created
    # Once it is a catalog, the same command gets past the check.
    invoke("db", "upgrade", "--url", pg_url)
    assert "no polystore tables" not in invoke("--url", pg_url, "ls").stderr


@pytest.mark.parametrize("kind", ["empty file", "another application's database"])
def test_sqlite_file_without_a_catalog_is_not_made_one(
    invoke: Invoke, tmp_path: Path, kind: str
) -> None:
    import sqlite3

    db = tmp_path / "app.db"
    if kind == "empty file":
        db.touch()
    else:
        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE things (x)")
        conn.close()
    before = db.read_bytes()
    for command in (["ls"], ["stat", "a.bin"], ["query", "SELECT 1"], ["fsck"]):
        line = one_error_line(invoke("--url", f"sqlite:///{db}", *command, code=1))
        assert "no polystore tables" in line, (command, line)
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]


def test_outdated_schema(invoke: Invoke, catalog_url: str) -> None:
    migrate.upgrade(catalog_url, "0001")
    line = one_error_line(invoke("--url", catalog_url, "ls", code=1))
    assert "polystore db upgrade --url" in line
    assert "problem:" in invoke("db", "check", "--url", catalog_url, code=1).stdout
    invoke("db", "upgrade", "--url", catalog_url)
    invoke("--url", catalog_url, "ls")


@pytest.mark.parametrize(
    "command",
    [
        ["ls"],
        ["ls", "-l", "p1"],
        ["tree"],
        ["cat", "raw.bin"],
        ["stat", "raw.bin"],
        ["du"],
        ["get", "raw.bin", "{tmp}/raw.bin"],
        ["fsck"],
        ["query", "SELECT * FROM polystore_catalog"],
        ["put", "{tmp}/local.txt", "new.txt"],
        ["rm", "raw.bin"],
    ],
    ids=" ".join,
)
def test_damaged_sqlite_catalog(invoke: Invoke, tmp_path: Path, command: list[str]) -> None:
    """Flipped bits in the catalog file: one line that says so and what to do, no change."""
    from catalog_checks import damage_sqlite_table

    db = tmp_path / "catalog.db"
    with SQLBackend(f"sqlite:///{db}") as backend:
        backend.save(b"\x00\xff", "raw.bin")
        backend.save("hello\n", "p1/readme.txt")
    damage_sqlite_table(db, "polystore_nodes")
    (tmp_path / "local.txt").write_text("local")
    before = db.read_bytes()
    args = [arg.format(tmp=tmp_path) for arg in command]
    line = one_error_line(invoke("--url", f"sqlite:///{db}", *args, code=1))
    assert f"the SQLite catalog file {db} is damaged" in line, line
    assert "backup" in line and ".recover" in line, line
    assert db.read_bytes() == before
    assert not (tmp_path / "raw.bin").exists()


def test_rows_written_by_another_program(invoke: Invoke, catalog_url: str) -> None:
    """A hash that is no SHA-256, attrs that are not a JSON object: fsck names the rows
    (exit status 1), commands that need them print one line naming the file."""
    from catalog_checks import catalog_rows, damage_columns, plant_files

    with SQLBackend(catalog_url, inline_limit=64) as backend:
        backend.save(b"x", "a/attrs.bin", attrs={"k": 1})
        plant_files(backend, [("external.bin", "z" * 64, "local")])
        not_json = "{not json" if backend.engine.dialect.name == "sqlite" else "[1]"
        damage_columns(backend, "attrs.bin", attrs=not_json)
        before = catalog_rows(backend)
    fsck = invoke("--url", catalog_url, "fsck", code=1)
    assert "Traceback" not in fsck.output
    assert "problem: damaged row of 'a/attrs.bin': its attrs is not " in fsck.stdout
    assert "problem: damaged row of 'planted/external.bin': its blob hash" in fsck.stdout
    assert f"problem: damaged blob row '{'z' * 64}'" in fsck.stdout
    report = json.loads(invoke("--url", catalog_url, "fsck", "--json", code=1).stdout)
    assert sorted(report["damaged_nodes"]) == ["a/attrs.bin", "planted/external.bin"]
    for command, path in (
        (["cat", "planted/external.bin"], "planted/external.bin"),
        (["stat", "a/attrs.bin"], "a/attrs.bin"),
        (["ls", "-l", "a"], "a/attrs.bin"),
        (["du"], "a/attrs.bin"),
    ):
        line = one_error_line(invoke("--url", catalog_url, *command, code=1))
        assert f"the catalog's record of {path!r} is damaged" in line, (command, line)
    with SQLBackend(catalog_url) as backend:
        assert catalog_rows(backend) == before


def test_read_only_catalog(
    invoke: Invoke, sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with SQLBackend(sqlite_url) as backend:
        backend.save("x", "keep.txt")
    # A relative URI filename: the engine takes "file:/abs" for a directory name.
    monkeypatch.chdir(tmp_path)
    url = "sqlite:///file:catalog.db?mode=ro&uri=true"
    assert "read-only" in one_error_line(invoke("--url", url, "rm", "keep.txt", code=1))
    assert invoke("--url", url, "cat", "keep.txt").stdout == "x"


def test_permission_denied(invoke: Invoke, sqlite_url: str, tmp_path: Path) -> None:
    with SQLBackend(sqlite_url) as backend:
        backend.save(b"x", "raw.bin")
    if os.geteuid() == 0:
        locked = Path("/sys")  # root may write anywhere but sysfs
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
    result = invoke("--url", sqlite_url, "get", "raw.bin", str(locked / "raw.bin"), code=1)
    assert one_error_line(result) == f"Error: Permission denied: {locked / 'raw.bin'}"


def test_debug_shows_the_traceback(sqlite_url: str) -> None:
    SQLBackend(sqlite_url).close()
    result = CliRunner().invoke(main, ["--url", sqlite_url, "--debug", "cat", "missing"])
    assert isinstance(result.exception, FileNotFoundError)


def test_url_from_environment_and_after_the_command(invoke: Invoke, sqlite_url: str) -> None:
    with SQLBackend(sqlite_url) as backend:
        backend.save("x", "here.txt")
    assert invoke("ls", env={"POLYSTORE_URL": sqlite_url}).stdout == "here.txt\n"
    assert invoke("ls", "--url", sqlite_url).stdout == "here.txt\n"


# -- db ----------------------------------------------------------------------------------------


def test_db_commands(cli: Invoke) -> None:
    assert cli("db", "current").stdout.strip() == "none"
    assert "problem:" in cli("db", "check", code=1).stdout
    cli("db", "upgrade")
    head = migrate.head()
    assert cli("db", "current").stdout.strip() == f"{head} (head)"
    assert "ok:" in cli("db", "check").stdout
    cli("db", "downgrade", "0001", code=1, stdin="n\n")  # asked, and declined
    assert cli("db", "current").stdout.strip().startswith(head)
    cli("db", "downgrade", "--yes", "0001")
    assert cli("db", "current").stdout.strip() == "0001"
    cli("db", "downgrade", "--yes", "base")
    assert cli("db", "current").stdout.strip() == "none"


def test_db_downgrade_takes_steps_back(cli: Invoke) -> None:
    """``-1`` is a number of revisions back, not an option; the question names
    where the steps end."""
    cli("db", "upgrade")
    revisions = [revision for revision, _ in migrate.history()]
    cli("db", "downgrade", "-2", "--yes")
    assert cli("db", "current").stdout.strip() == revisions[-3]
    cli("db", "upgrade", "+1")
    assert cli("db", "current").stdout.strip() == revisions[-2]
    asked = cli("db", "downgrade", f"-{len(revisions) - 1}", code=1, stdin="n\n").stdout
    assert "to base? Data of later revisions (here: the whole catalog) is lost" in asked
    assert cli("db", "current").stdout.strip() == revisions[-2]
    assert "No such option '--yess'" in cli("db", "downgrade", "--yess", code=2).stderr
    cli("db", "downgrade", "--yes", f"-{len(revisions) - 1}")
    assert cli("db", "current").stdout.strip() == "none"


def test_db_history(invoke: Invoke) -> None:
    out = invoke("db", "history").stdout
    for revision, _ in migrate.history():
        assert revision in out
    assert "(head)" in out


# -- gc and fsck --------------------------------------------------------------------------------


def test_gc_and_fsck(cli: Invoke, filled: str) -> None:
    checked = json.loads(cli("fsck", "--json").stdout)
    assert checked["ok"] is True and checked["blobs_checked"] >= 4
    assert "ok" in cli("fsck", "--verify").stdout
    cli("rm", "-r", "p1")
    report = json.loads(cli("gc", "--json", "--grace", "0").stdout)
    assert set(report) >= {"blobs_deleted", "bytes_freed", "intents_expired", "objects_deleted"}
    assert "blobs deleted" in cli("gc").stdout
    assert json.loads(cli("fsck", "--json").stdout)["garbage"] == 0


def test_fsck_finds_damage(invoke: Invoke, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/catalog.db"
    store = tmp_path / "blobs"
    with SQLBackend(url, blob_store=str(store), inline_limit=0) as backend:
        backend.save(b"some content", "f.bin")
    for blob in store.glob("*/*"):  # the objects, in their shard directories
        blob.write_bytes(b"damaged!")
    result = invoke("--url", url, "--blob-store", str(store), "fsck", code=1)
    assert "problem:" in result.stdout
    assert (
        json.loads(
            invoke("--url", url, "--blob-store", str(store), "fsck", "--json", code=1).stdout
        )["ok"]
        is False
    )


# -- demo --------------------------------------------------------------------------------------


def test_demo(invoke: Invoke, tmp_path: Path) -> None:
    where = tmp_path / "demo"
    args = ("demo", "--path", str(where), "--plates", "1", "--sites", "1", "--size", "32")
    out = invoke(*args).stdout
    assert "verified" in out and str((where / "catalog.db").resolve()) in out
    assert "Try next" in out and "polystore ls" in out
    assert "staurosporine" in out  # a query table
    with SQLBackend(f"sqlite:///{where}/catalog.db") as backend:
        assert len(backend.list_files("plate1", recursive=True)) == 96 * 2
        assert backend.stat("plate1/B03/site1.npy").attrs["well"] == "B03"
    invoke(*args)  # a second run rebuilds the catalog
    other = tmp_path / "mine"
    other.mkdir()
    (other / "precious.txt").write_text("keep")
    line = one_error_line(invoke("demo", "--path", str(other), code=1))
    assert "not made by" in line
    assert (other / "precious.txt").exists()


# -- the installed console script ------------------------------------------------------------


def run(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, check=False, capture_output=True, text=True, cwd=cwd, timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "error", **(env or {})},
    )  # fmt: skip


def test_console_script_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    original = make_tree(src)
    url = f"sqlite:///{tmp_path}/catalog.db"
    put = run(str(POLYSTORE), "--url", url, "put", str(src), "data")
    assert put.returncode == 0, put.stderr
    get = run(str(POLYSTORE), "--url", url, "get", "data", str(tmp_path / "out"))
    assert get.returncode == 0, get.stderr
    assert local_tree(tmp_path / "out")[0] == original
    listing = run(str(POLYSTORE), "ls", "-R", "data", env={"POLYSTORE_URL": url})
    assert "data/sub/deeper/indent2.json" in listing.stdout.splitlines()


def test_console_script_error_is_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/catalog.db"
    assert run(str(POLYSTORE), "--url", url, "db", "upgrade").returncode == 0
    failed = run(str(POLYSTORE), "--url", url, "cat", "nowhere.npy")
    assert failed.returncode == 1
    assert failed.stderr.splitlines() == ["Error: No such file or directory: nowhere.npy"]
    debug = run(str(POLYSTORE), "--url", url, "--debug", "cat", "nowhere.npy")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_python_dash_m(tmp_path: Path) -> None:
    result = run(sys.executable, "-m", "polystore", "--help", cwd=tmp_path)
    assert result.returncode == 0 and "Usage: python -m polystore" in result.stdout
    assert not (tmp_path / "polystore.db").exists()  # --help opens no catalog


def test_importing_the_cli_stays_light() -> None:
    code = (
        "import sys, polystore.cli; "
        "print(sorted(m for m in ('numpy', 'sqlalchemy', 'rich', 'psycopg') if m in sys.modules))"
    )
    assert run(sys.executable, "-c", code).stdout.strip() == "[]"
