"""Schema migrations and versioning, on a SQLite file and on PostgreSQL.

Covers ``polystore.migrate``, ``SQLBackend``'s schema checks on open, the plain
``alembic`` command line from the checkout, coexistence with an application's
own tables and Alembic history, concurrent first opens, and data surviving
upgrade -> downgrade -> upgrade.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import multiprocessing
import os
import re
import shlex
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from catalog_checks import file_kinds, made_before_0010

from polystore import migrate
from polystore.backends.sql import SQLBackend, schema
from polystore.backends.sql.engine import create_catalog_engine
from polystore.backends.sql.kinds import kind_key
from polystore.backends.sql.models import kinds_table
from polystore.blobs import OWNER_KEY, LocalBlobStore
from polystore.errors import BackendConfigError, BackendUnavailableError, SchemaVersionError

ROOT = Path(__file__).resolve().parents[1]
HEAD = schema.HEAD
WRITES = re.compile(r"^\s*(CREATE|DROP|ALTER|INSERT|UPDATE|DELETE|REPLACE)\b", re.IGNORECASE)


# -- helpers -----------------------------------------------------------------------


@contextmanager
def engine_for(url: str) -> Iterator[sa.Engine]:
    engine = create_catalog_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


def schema_objects(url: str) -> set[tuple[str, str]]:
    """Every table, view, index and sequence in the database (or PostgreSQL schema)."""
    with engine_for(url) as engine, engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            sql = "SELECT type, name FROM sqlite_master"
        else:
            sql = (
                "SELECT c.relkind::text, c.relname FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = current_schema()"
            )
        return {(kind, name) for kind, name in conn.execute(sa.text(sql))}


def polystore_objects(url: str) -> set[tuple[str, str]]:
    """The objects whose names polystore's naming convention starts with ``polystore_``."""
    return {(kind, name) for kind, name in schema_objects(url) if "polystore_" in name}


def snapshot(url: str) -> dict[str, Any]:
    """Everything in the database's current schema: definitions and rows."""
    with engine_for(url) as engine, engine.connect() as conn:
        inspector = sa.inspect(conn)
        meta = sa.MetaData()
        meta.reflect(conn)
        result: dict[str, Any] = {
            "views": {v: inspector.get_view_definition(v) for v in inspector.get_view_names()}
        }
        for name, table in sorted(meta.tables.items()):
            result[name] = {
                "columns": [(c.name, str(c.type)) for c in table.columns],
                "indexes": sorted(str(i["name"]) for i in inspector.get_indexes(name)),
                "rows": sorted((tuple(row) for row in conn.execute(table.select())), key=repr),
            }
        return result


@contextmanager
def statements() -> Iterator[list[str]]:
    """Every SQL statement (with its parameters) any engine sends while inside."""
    seen: list[str] = []

    def record(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
    ) -> None:
        seen.append(f"{statement} {params!r}")

    sa.event.listen(sa.Engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", record)


def assert_same(expected: Any, actual: Any) -> None:
    assert type(actual) is type(expected)
    if isinstance(expected, np.ndarray):
        assert actual.dtype == expected.dtype
        assert actual.shape == expected.shape
        assert actual.flags.f_contiguous == expected.flags.f_contiguous
        assert np.array_equal(actual, expected, equal_nan=actual.dtype.kind in "fc")
    else:
        assert actual == expected


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env, check=False
    )


# -- the round trip ----------------------------------------------------------------


def test_upgrade_check_downgrade_base_upgrade(catalog_url: str) -> None:
    assert migrate.current(catalog_url) is None
    migrate.upgrade(catalog_url)
    assert migrate.current(catalog_url) == HEAD == migrate.head()
    assert migrate.check(catalog_url) == []
    created = polystore_objects(catalog_url)
    assert created == schema_objects(catalog_url)  # nothing without polystore_ in its name
    names = {name for _, name in created}
    kinds = ("", "pk_", "ix_", "uq_", "sqlite_autoindex_")  # the last: SQLite's own
    for name in names:
        assert name.startswith(tuple(f"{kind}polystore_" for kind in kinds)), name
    assert {"polystore_nodes", "polystore_blobs", "polystore_upload_intents"} <= names
    assert {"polystore_catalog", schema.VERSION_TABLE} <= names

    migrate.downgrade(catalog_url, "base")
    assert schema_objects(catalog_url) == set()  # nothing left at all
    assert migrate.current(catalog_url) is None

    migrate.upgrade(catalog_url)
    assert migrate.check(catalog_url) == []
    assert polystore_objects(catalog_url) == created


def test_step_by_step_matches_history(catalog_url: str) -> None:
    for revision, _message in migrate.history():
        migrate.upgrade(catalog_url, revision)
        assert migrate.current(catalog_url) == revision
    assert migrate.check(catalog_url) == []
    for revision, _message in reversed(migrate.history()[:-1]):
        migrate.downgrade(catalog_url, revision)
        assert migrate.current(catalog_url) == revision
    migrate.downgrade(catalog_url, "base")
    assert schema_objects(catalog_url) == set()


def test_check_reports_drift(catalog_url: str) -> None:
    migrate.upgrade(catalog_url)
    with engine_for(catalog_url) as engine, engine.begin() as conn:
        conn.execute(sa.text("DROP VIEW polystore_catalog"))
        conn.execute(sa.text("DROP INDEX polystore_nodes_dtype_idx"))
        conn.execute(sa.text("ALTER TABLE polystore_blobs ADD COLUMN extra INTEGER"))
    problems = migrate.check(catalog_url)
    assert len(problems) == 3, problems
    text = "\n".join(problems)
    assert "index polystore_nodes_dtype_idx on polystore_nodes (dtype) is in the models" in text
    assert "column polystore_blobs.extra is in the database but not in the models" in text
    assert "the polystore_catalog view is missing" in text


def test_check_and_current_name_the_state(catalog_url: str) -> None:
    command = f"polystore db upgrade --url {shlex.quote(catalog_url)}"
    assert migrate.check(catalog_url) == [f"there is no catalog at {catalog_url}: run `{command}`"]
    migrate.upgrade(catalog_url, "0001")
    assert migrate.current(catalog_url) == "0001"
    assert migrate.check(catalog_url) == [
        f"the catalog is at revision 0001, head is {HEAD}: run `{command}`"
    ]


def test_wrong_way_and_unknown_targets_are_refused(catalog_url: str) -> None:
    migrate.upgrade(catalog_url)
    with pytest.raises(SchemaVersionError, match="newer than 0001: use downgrade"):
        migrate.upgrade(catalog_url, "0001")
    with pytest.raises(SchemaVersionError, match="Can't locate revision identified by 'zzzz'"):
        migrate.upgrade(catalog_url, "zzzz")
    migrate.downgrade(catalog_url, "0001")
    with pytest.raises(SchemaVersionError, match=f"older than {HEAD}: use upgrade"):
        migrate.downgrade(catalog_url, HEAD)
    assert migrate.current(catalog_url) == "0001"
    migrate.downgrade(catalog_url, "base")
    migrate.downgrade(catalog_url, "base")  # nothing left: does nothing
    with pytest.raises(SchemaVersionError, match=r"no catalog .* to downgrade"):
        migrate.downgrade(catalog_url, "0001")
    assert schema_objects(catalog_url) == set()


def test_bad_urls_are_polystore_errors(tmp_path: Path) -> None:
    with pytest.raises(BackendConfigError, match="unsupported database"):
        migrate.upgrade("mysql://localhost/catalog")
    with pytest.raises(BackendConfigError, match="does not exist"):
        migrate.upgrade(f"sqlite:///{tmp_path}/missing/catalog.db")
    with pytest.raises(BackendUnavailableError, match="cannot reach the catalog"):
        migrate.current("postgresql+psycopg://postgres@127.0.0.1:1/nowhere?connect_timeout=2")


def test_reading_a_missing_sqlite_file_creates_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/absent.db"
    assert migrate.current(url) is None
    assert migrate.check(url) == [
        f"there is no catalog at {url}: run `polystore db upgrade --url {url}`"
    ]
    migrate.downgrade(url, "base")
    assert list(tmp_path.iterdir()) == []


def test_history_is_the_script_directory(tmp_path: Path) -> None:
    # schema.REVISIONS is written out by hand (it is needed without importing
    # Alembic); it must be exactly the scripts' history, oldest first.
    script = ScriptDirectory(str(ROOT / "migrations"))
    walked = [s.revision for s in reversed(list(script.walk_revisions()))]
    assert tuple(walked) == schema.REVISIONS
    assert script.get_heads() == [schema.HEAD]
    assert [r for r, _ in migrate.history()] == walked
    assert all(message for _, message in migrate.history())
    assert schema.migrations_dir() == ROOT / "migrations"


def test_constraints_and_indexes_follow_the_naming_convention(catalog_url: str) -> None:
    migrate.upgrade(catalog_url)
    with engine_for(catalog_url) as engine, engine.connect() as conn:
        inspector = sa.inspect(conn)
        tables = ("polystore_nodes", "polystore_blobs", "polystore_upload_intents")
        for table in (*tables, "polystore_tree_version", "polystore_identity"):
            names = [inspector.get_pk_constraint(table)["name"]]
            names += [i["name"] for i in inspector.get_indexes(table)]
            names += [u["name"] for u in inspector.get_unique_constraints(table)]
            names += [f["name"] for f in inspector.get_foreign_keys(table)]
            names += [c["name"] for c in inspector.get_check_constraints(table)]
            for name in names:
                assert name is not None
                assert re.fullmatch(rf"{table}(_\w+)?_(pkey|idx|key|fkey|check)", name)


# -- SQLBackend and the schema -----------------------------------------------------


def test_fresh_database_is_migrated_not_created(
    catalog_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("create_all must never run on a user's database")

    monkeypatch.setattr(sa.MetaData, "create_all", refuse)
    with statements() as seen, SQLBackend(catalog_url) as backend:
        backend.save(np.arange(3), "a.npy")
    assert any("CREATE VIEW polystore_catalog" in s for s in seen)  # only 0001 does that
    assert migrate.current(catalog_url) == HEAD
    assert migrate.check(catalog_url) == []


def test_older_revision_is_refused_then_auto_upgraded(catalog_url: str) -> None:
    migrate.upgrade(catalog_url, "0001")
    with pytest.raises(SchemaVersionError) as info:
        SQLBackend(catalog_url)
    message = str(info.value)
    assert f"`polystore db upgrade --url {shlex.quote(catalog_url)}`" in message
    assert f"revision 0001, this polystore needs {HEAD}" in message
    assert migrate.current(catalog_url) == "0001"

    with SQLBackend(catalog_url, auto_upgrade=True) as backend:
        backend.save("hello", "x.txt")
        assert backend.load("x.txt") == "hello"
    assert migrate.current(catalog_url) == HEAD
    assert migrate.check(catalog_url) == []


def test_unknown_revision_is_refused_and_nothing_is_touched(catalog_url: str) -> None:
    with SQLBackend(catalog_url) as backend:
        backend.save(np.ones(4), "plate1/a.npy", attrs={"well": "A01"})
    with engine_for(catalog_url) as engine, engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {schema.VERSION_TABLE} SET version_num = 'ffff'"))
    before = snapshot(catalog_url)

    attempts = [
        lambda: SQLBackend(catalog_url),
        lambda: SQLBackend(catalog_url, auto_upgrade=True),
        lambda: migrate.upgrade(catalog_url),
        lambda: migrate.downgrade(catalog_url, "0001"),
        lambda: migrate.downgrade(catalog_url, "base"),
    ]
    with statements() as seen:
        for attempt in attempts:
            with pytest.raises(SchemaVersionError, match="'ffff', which this polystore does not"):
                attempt()
        assert migrate.current(catalog_url) == "ffff"
        (problem,) = migrate.check(catalog_url)
        assert "'ffff'" in problem
    assert [s for s in seen if WRITES.match(s)] == []
    assert snapshot(catalog_url) == before


def test_tables_without_version_table_are_not_adopted(catalog_url: str) -> None:
    with engine_for(catalog_url) as engine, engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE polystore_nodes (id INTEGER PRIMARY KEY)"))
    before = snapshot(catalog_url)
    with pytest.raises(SchemaVersionError, match="not created by polystore's migrations"):
        SQLBackend(catalog_url)
    with pytest.raises(SchemaVersionError, match="not created by polystore's migrations"):
        migrate.upgrade(catalog_url)
    (problem,) = migrate.check(catalog_url)
    assert "not created by polystore's migrations" in problem
    assert snapshot(catalog_url) == before


# -- living inside an application's database ---------------------------------------


def test_coexists_with_an_application_schema(catalog_url: str) -> None:
    with engine_for(catalog_url) as engine, engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE app_items (id INTEGER PRIMARY KEY, name TEXT)"))
        conn.execute(sa.text("INSERT INTO app_items VALUES (1, 'widget'), (2, 'gadget')"))
        conn.execute(sa.text("CREATE INDEX ix_app_items_name ON app_items (name)"))
        conn.execute(sa.text("CREATE VIEW app_names AS SELECT name FROM app_items"))
        conn.execute(
            sa.text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)")
        )
        conn.execute(sa.text("INSERT INTO alembic_version VALUES ('a1b2c3d4e5f6')"))
    app = snapshot(catalog_url)

    made_before_0010(catalog_url)
    with statements() as seen:
        with SQLBackend(catalog_url) as backend:
            backend.save(np.arange(5), "data/x.npy")
            assert backend.list_dir("") == ["data"]
        assert migrate.check(catalog_url) == []
        assert migrate.current(catalog_url) == HEAD
        migrate.downgrade(catalog_url, "0001")
        migrate.upgrade(catalog_url)
        migrate.downgrade(catalog_url, "base")
        migrate.upgrade(catalog_url)
        assert migrate.check(catalog_url) == []

    # Never read: no statement names the application's tables or its version table.
    mentions = re.compile(r"app_items|app_names|(?<!polystore_)alembic_version")
    assert [s for s in seen if mentions.search(s)] == []
    # Never touched: the application's objects are exactly as they were.
    now = snapshot(catalog_url)
    assert {k: v for k, v in now.items() if not k.startswith("polystore_")} | {
        "views": {k: v for k, v in now["views"].items() if not k.startswith("polystore_")}
    } == app


@pytest.mark.slow
def test_alembic_command_line_from_the_checkout(catalog_url: str, tmp_path: Path) -> None:
    alembic = str(Path(sys.executable).with_name("alembic"))
    env = {k: v for k, v in os.environ.items() if k != "POLYSTORE_URL"}
    up = run(alembic, "-x", f"url={catalog_url}", "upgrade", "head", env=env)
    assert up.returncode == 0, up.stderr
    assert migrate.current(catalog_url) == HEAD
    checked = run(alembic, "-x", f"url={catalog_url}", "check", env=env)
    assert checked.returncode == 0, checked.stderr
    assert "No new upgrade operations detected" in checked.stdout

    down = run(alembic, "downgrade", "base", env=env | {"POLYSTORE_URL": catalog_url})
    assert down.returncode == 0, down.stderr
    assert schema_objects(catalog_url) == set()

    nothing = run(alembic, "upgrade", "head", env=env)
    assert nothing.returncode != 0
    assert "no database URL" in nothing.stderr

    # A URL written into an ini file is refused, not used.
    ini = tmp_path / "alembic.ini"
    text = (
        (ROOT / "alembic.ini").read_text().replace("%(here)s/migrations", str(ROOT / "migrations"))
    )
    ini.write_text(text.replace("[alembic]\n", f"[alembic]\nsqlalchemy.url = {catalog_url}\n"))
    refused = run(alembic, "-c", str(ini), "upgrade", "head", env=env)
    assert refused.returncode != 0
    assert "remove it from the file" in refused.stderr
    assert schema_objects(catalog_url) == set()


# -- SQLite: foreign keys while tables are rebuilt ---------------------------------


def _fill(url: str) -> int:
    with SQLBackend(url) as backend:
        backend.save_batch([b"x", "y", {"z": 1}], ["a/b/c.bin", "a/d.txt", "e/f/g.json"])
        return backend.count_nodes()


def _rebuild_nodes_and_blobs(conn: sa.Connection) -> None:
    # What a future revision rebuilding these tables in batch mode does. The
    # view must be dropped first and recreated after: SQLite re-checks views
    # when the rebuilt table is renamed into place (and PostgreSQL will not
    # alter a column a view uses).
    ops = Operations(MigrationContext.configure(conn))
    ops.execute("DROP VIEW polystore_catalog")
    for table in ("polystore_nodes", "polystore_blobs"):
        with ops.batch_alter_table(table, recreate="always") as batch:
            batch.add_column(sa.Column("extra", sa.Integer))
    initial = ScriptDirectory(str(ROOT / "migrations")).get_revision("0001")
    assert initial is not None
    with Operations.context(MigrationContext.configure(conn)):
        initial.module.create_catalog_view()


def _count(url: str, table: str) -> int:
    with engine_for(url) as engine, engine.connect() as conn:
        return int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())


def test_sqlite_batch_rebuild_keeps_every_row(sqlite_url: str) -> None:
    nodes = _fill(sqlite_url)
    with engine_for(sqlite_url) as engine, engine.connect() as plain:
        with schema.migration_transaction(plain) as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 0
            _rebuild_nodes_and_blobs(conn)
        # Back on for everything that follows on this pooled connection.
        assert plain.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    assert _count(sqlite_url, "polystore_nodes") == nodes + 1  # and the root
    assert _count(sqlite_url, "polystore_catalog") == nodes  # the view leaves the root out
    with SQLBackend(sqlite_url) as backend:
        assert backend.load("a/b/c.bin") == b"x"


def test_sqlite_batch_rebuild_with_foreign_keys_on_loses_rows(sqlite_url: str) -> None:
    # Why migration_transaction turns foreign keys off: with them on, dropping
    # the old polystore_nodes cascades into the rebuilt copy.
    assert _fill(sqlite_url) > 0
    with engine_for(sqlite_url) as engine, engine.begin() as conn:
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        _rebuild_nodes_and_blobs(conn)
    assert _count(sqlite_url, "polystore_nodes") == 1  # only the root survived


def test_migrations_refuse_a_sqlite_transaction_with_foreign_keys_on(sqlite_url: str) -> None:
    from alembic import command

    with (
        engine_for(sqlite_url) as engine,
        engine.connect() as conn,
        conn.begin(),
        pytest.raises(SchemaVersionError, match="PRAGMA foreign_keys=OFF"),
    ):
        command.upgrade(schema.alembic_config(conn), "head")
    assert schema_objects(sqlite_url) == set()


# -- several processes opening one fresh database -----------------------------------


def _open_fresh(url: str, barrier: Any, results: Any, index: int) -> None:
    runs: list[str] = []
    real_upgrade = schema.upgrade

    def counting_upgrade(conn: sa.Connection, revision: str = "head") -> None:
        runs.append(revision)
        real_upgrade(conn, revision)

    schema.upgrade = counting_upgrade  # type: ignore[assignment]
    try:
        barrier.wait(timeout=60)
        with SQLBackend(url) as backend:
            backend.save(index, f"proc/{index}.json")
        results.put((index, len(runs), None))
    except Exception as error:  # noqa: BLE001 -- any failure goes back to the parent
        results.put((index, len(runs), repr(error)))


@pytest.mark.slow
@pytest.mark.parametrize("database", ["empty", "application"])
def test_processes_opening_a_fresh_database_migrate_once(catalog_url: str, database: str) -> None:
    if database == "application":
        # The database exists with an application's table in it (on SQLite
        # already in WAL mode), so nothing but polystore's own lock keeps the
        # openers apart; an empty one also races on creating the file.
        with engine_for(catalog_url) as engine, engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE app_items (id INTEGER PRIMARY KEY)"))
    workers = 4
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(workers)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_open_fresh, args=(catalog_url, barrier, results, i))
        for i in range(workers)
    ]
    for proc in procs:
        proc.start()
    outcome = sorted(results.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    assert [error for _, _, error in outcome] == [None] * workers
    assert sum(ran for _, ran, _ in outcome) == 1  # exactly one process migrated
    assert migrate.current(catalog_url) == HEAD
    assert migrate.check(catalog_url) == []
    with SQLBackend(catalog_url) as backend:
        assert backend.list_dir("proc") == [f"{i}.json" for i in range(workers)]


# -- data written at an older revision ---------------------------------------------

VALUES: dict[str, Any] = {
    "plate1/A01.npy": np.arange(12, dtype=np.float32).reshape(3, 4),
    "plate1/A02.npy": np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
    "plate1/big_endian.npy": np.array([1.5, -2.25, np.nan], dtype=">f8"),
    "plate1/flags.npy": np.array([True, False, True]),
    "plate1/scalar.npy": np.array(7, dtype=np.uint64),
    "plate1/empty.npy": np.zeros((0, 3), dtype=np.complex64),
    "plate1/copy_of_A01.npy": np.arange(12, dtype=np.float32).reshape(3, 4),
    "raw/blob.bin": bytes(range(256)),
    "notes/readme.txt": "naïve café ✓",
    "notes/meta.json": {"wells": ["A01", "A02"], "n": 2, "ok": True, "none": None},
    "odd names/50% [x]_*.txt": "still a path",
}


def _write_at_0001(url: str) -> None:
    """A file written with SQL against the 0001 tables while the catalog is at 0001."""
    data = b"written at 0001"
    digest = hashlib.sha256(data).hexdigest()
    now = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    with engine_for(url) as engine, engine.begin() as conn:
        assert (
            conn.execute(sa.text(f"SELECT version_num FROM {schema.VERSION_TABLE}")).scalar()
            == "0001"
        )
        attrs = "CAST(:attrs AS JSONB)" if conn.dialect.name == "postgresql" else ":attrs"
        conn.execute(
            sa.text(
                "INSERT INTO polystore_blobs (hash, size, store, refcount, data, created_at) "
                "VALUES (:hash, :size, 'inline', 1, :data, :now)"
            ),
            {"hash": digest, "size": len(data), "data": data, "now": now},
        )
        conn.execute(
            sa.text(
                "INSERT INTO polystore_nodes (parent_id, name, kind, created_at, modified_at) "
                "VALUES (0, 'legacy', 'dir', :now, :now)"
            ),
            {"now": now},
        )
        parent = conn.execute(
            sa.text("SELECT id FROM polystore_nodes WHERE parent_id = 0 AND name = 'legacy'")
        ).scalar_one()
        conn.execute(
            sa.text(
                "INSERT INTO polystore_nodes (parent_id, name, kind, size, serializer, "
                "serializer_version, attrs, blob_hash, created_at, modified_at) "
                f"VALUES (:parent, 'note.txt', 'file', :size, 'str', 1, {attrs}, :hash, :now, :now)"
            ),
            {
                "parent": parent,
                "size": len(data),
                "attrs": json.dumps({"era": "0001"}),
                "hash": digest,
                "now": now,
            },
        )


def _catalog_rows(url: str) -> dict[str, Any]:
    """Node and blob rows, without the nodes' kind ids (derived, since 0004), their
    epochs (0 until a snapshot is taken, since 0006), the blobs' piece checksums
    (NULL for rows written before 0007) and the catalog identity a downgrade
    below 0005 keeps in the root's ``meta``. Blob rows are by column name: their
    order on SQLite changes at 0009."""
    full = snapshot(url)
    rows = {t: full[t]["rows"] for t in ("polystore_nodes", "polystore_blobs")}
    blob_names = [name for name, _ in full["polystore_blobs"]["columns"]]
    rows["polystore_blobs"] = [
        sorted((k, v) for k, v in zip(blob_names, row, strict=True) if k != "checksums")
        for row in rows["polystore_blobs"]
    ]
    names = [name for name, _ in full["polystore_nodes"]["columns"]]
    meta = names.index("meta")
    nodes = [
        (*row[:meta], None, *row[meta + 1 :]) if row[0] == 0 else row
        for row in rows["polystore_nodes"]
    ]
    for derived in ("epoch", "kind_id"):  # (epoch is last)
        if derived in names:
            at = names.index(derived)
            nodes = [row[:at] + row[at + 1 :] for row in nodes]
    rows["polystore_nodes"] = sorted(nodes, key=repr)
    return rows


def _assert_kinds_derived(url: str) -> int:
    """Every file's kind id is the id of its columns, with a row in polystore_kinds."""
    with engine_for(url) as engine, engine.connect() as conn:
        files = file_kinds(conn)
        kinds = {row.id: row for row in conn.execute(kinds_table.select())}
    for kind_id, *columns in files:
        assert kind_id == kind_key(tuple(columns))[0]  # type: ignore[arg-type]
        row = kinds[kind_id]
        assert row.key == kind_key(tuple(columns))[1]  # type: ignore[arg-type]
        assert (row.serializer, row.serializer_version, row.dtype, row.shape) == tuple(columns[:4])
        assert row.meta == (columns[4] or None)
    assert len(kinds) == len({kind_id for kind_id, *_ in files})
    return len(files)


def _assert_all_loadable(url: str) -> None:
    with SQLBackend(url) as backend:
        loaded = backend.load_batch(list(VALUES))
        for (path, value), batched in zip(VALUES.items(), loaded, strict=True):
            assert_same(value, batched)
            assert_same(value, backend.load(path))
        assert backend.stat("plate1/A01.npy").attrs == {"well": "A01"}
        assert backend.load("legacy/note.txt") == "written at 0001"
        assert backend.stat("legacy/note.txt").attrs == {"era": "0001"}
        assert backend.list_dir("plate1") == sorted(
            p.split("/")[1] for p in VALUES if p.startswith("plate1/")
        )


def test_data_survives_upgrade_downgrade_upgrade(catalog_url: str) -> None:
    # The files are saved by today's SQLBackend (the only writer there is) and the
    # catalog is then taken down to 0001, checked to really be the 0001 schema;
    # one more file is written with plain SQL against the 0001 tables.
    made_before_0010(catalog_url)
    with SQLBackend(catalog_url) as backend:
        for path, value in VALUES.items():
            backend.save(value, path, attrs={"well": "A01"} if path == "plate1/A01.npy" else None)
    migrate.downgrade(catalog_url, "0001")
    assert migrate.current(catalog_url) == "0001"
    names = {name for _, name in polystore_objects(catalog_url)}
    assert "polystore_nodes" in names
    assert "polystore_upload_intents" not in names
    _write_at_0001(catalog_url)
    rows_at_0001 = _catalog_rows(catalog_url)
    with pytest.raises(SchemaVersionError):
        SQLBackend(catalog_url)

    migrate.upgrade(catalog_url)
    assert migrate.check(catalog_url) == []
    assert _catalog_rows(catalog_url) == rows_at_0001  # upgrading changed no row...
    assert _assert_kinds_derived(catalog_url) == len(VALUES) + 1  # ...but gave kind ids
    _assert_all_loadable(catalog_url)

    migrate.downgrade(catalog_url, "0001")
    assert _catalog_rows(catalog_url) == rows_at_0001
    migrate.upgrade(catalog_url)
    assert _catalog_rows(catalog_url) == rows_at_0001
    _assert_all_loadable(catalog_url)


def _identity(url: str) -> str | None:
    with engine_for(url) as engine, engine.connect() as conn:
        if not sa.inspect(conn).has_table("polystore_identity"):
            return None
        return str(conn.execute(sa.text("SELECT catalog_id FROM polystore_identity")).scalar_one())


def _root_meta(url: str) -> Any:
    with engine_for(url) as engine, engine.connect() as conn:
        meta = conn.execute(sa.text("SELECT meta FROM polystore_nodes WHERE id = 0")).scalar()
    return json.loads(meta) if isinstance(meta, str) else meta


def _to_0004_without_identity(url: str) -> None:
    """Take the catalog to 0004 as if it had never been at 0005 (no identity kept)."""
    migrate.downgrade(url, "0004")
    with engine_for(url) as engine, engine.begin() as conn:
        conn.execute(sa.text("UPDATE polystore_nodes SET meta = NULL WHERE id = 0"))


def test_an_older_catalog_gets_an_identity_and_claims_its_store(
    catalog_url: str, more_catalogs: Callable[[], str], tmp_path: Path
) -> None:
    # Two catalogs from before 0005, sharing one store (nothing stopped that
    # then), with their data and a store holding no owner marker.
    store = LocalBlobStore(tmp_path / "blobs")
    other = more_catalogs()
    for url, value in ((catalog_url, VALUES), (other, {"raw/other.bin": bytes(300)})):
        made_before_0010(url)
        with SQLBackend(url, blob_store=store, inline_limit=0) as backend:
            for path, item in value.items():
                backend.save(item, path)
        _to_0004_without_identity(url)
        (store.root / OWNER_KEY).unlink()
        assert _identity(url) is None
    rows_at_0004 = _catalog_rows(catalog_url)

    for url in (catalog_url, other):
        migrate.upgrade(url)
        assert migrate.check(url) == []
    assert _catalog_rows(catalog_url) == rows_at_0004
    assert uuid.UUID(_identity(catalog_url) or "") != uuid.UUID(_identity(other) or "")
    assert store.owner() is None  # upgrading touches no store

    # The first catalog to open claims the store, and reads all it had there.
    with SQLBackend(catalog_url, blob_store=store, inline_limit=0) as backend:
        for path, value in VALUES.items():
            assert_same(value, backend.load(path))
    owner = store.owner()
    assert owner is not None and owner.id == _identity(catalog_url)
    with pytest.raises(BackendConfigError, match="belongs to another catalog"):
        SQLBackend(other, blob_store=store)


def test_identity_survives_downgrade_and_upgrade(catalog_url: str, tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    made_before_0010(catalog_url)
    with SQLBackend(catalog_url, blob_store=store, inline_limit=0) as backend:
        backend.save(b"kept", "f.bin")
    first = _identity(catalog_url)
    assert first is not None and store.owner() is not None
    for target in ("0004", "0001"):
        migrate.downgrade(catalog_url, target)
        assert _identity(catalog_url) is None
        assert _root_meta(catalog_url) == {"polystore_catalog_id": first}
        migrate.upgrade(catalog_url)
        assert _identity(catalog_url) == first
        assert _root_meta(catalog_url) is None  # taken back
        assert migrate.check(catalog_url) == []
    with SQLBackend(catalog_url, blob_store=store) as backend:  # its store still knows it
        assert backend.load("f.bin") == b"kept"
    # Down to base is the end of that catalog: a new one is another catalog.
    migrate.downgrade(catalog_url, "base")
    migrate.upgrade(catalog_url)
    assert _identity(catalog_url) not in (None, first)
    with pytest.raises(BackendConfigError, match="belongs to another catalog"):
        SQLBackend(catalog_url, blob_store=store)


def test_tree_version_never_repeats_across_downgrade_and_upgrade(catalog_url: str) -> None:
    """A process that cached directory ids across a re-created table must not trust them."""
    from polystore.backends.sql import SQLBackend

    made_before_0010(catalog_url)
    with SQLBackend(catalog_url) as reader, SQLBackend(catalog_url) as writer:
        writer.save(b"old", "c/f")
        writer.move("c", "c-moved")
        writer.save(b"old", "c/f")
        assert reader.load("c/f") == b"old"  # caches c's id at this version
        migrate.downgrade(catalog_url, "0002")
        migrate.upgrade(catalog_url)
        writer.move("c", "elsewhere")  # a counter restarted at 0 would now match the cache
        writer.save(b"new", "c/f")
        assert reader.load("c/f") == b"new"


def test_upgrade_to_0004_gives_files_of_several_pages_their_kinds(catalog_url: str) -> None:
    # More files than one page of the backfill (10,000), of three kinds, in
    # more than one directory, and files without a serializer keep no kind id.
    count = 21_000
    values: list[Any] = [np.arange(i % 3 + 1, dtype=np.int16) for i in range(count)]
    made_before_0010(catalog_url)
    with SQLBackend(catalog_url) as backend:
        backend.save_batch(values, [f"d{i % 2}/f{i}" for i in range(count)])
    migrate.downgrade(catalog_url, "0003")
    with engine_for(catalog_url) as engine, engine.begin() as conn:
        conn.execute(sa.text("UPDATE polystore_nodes SET serializer = NULL WHERE name = 'f7'"))
    migrate.upgrade(catalog_url)
    with engine_for(catalog_url) as engine, engine.begin() as conn:
        unset = conn.execute(
            sa.text("SELECT name FROM polystore_nodes WHERE kind = 'file' AND kind_id IS NULL")
        ).all()
        assert [name for (name,) in unset] == ["f7"]
        conn.execute(sa.text("UPDATE polystore_nodes SET serializer = 'ndarray' WHERE name = 'f7'"))
    with SQLBackend(catalog_url) as backend:
        report = backend.fsck()
        assert report.ok and report.without_kind == 1, str(report)
        for i, loaded in enumerate(backend.load_batch([f"d{i % 2}/f{i}" for i in range(count)])):
            assert_same(values[i], loaded)
    with engine_for(catalog_url) as engine, engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM polystore_nodes WHERE name = 'f7'"))  # (no kind id)
    assert _assert_kinds_derived(catalog_url) == count - 1


def test_revision_0004_makes_kind_ids_as_polystore_does() -> None:
    # The revision has its own copy of the key (a revision never imports
    # today's code); both must give every kind the same id and key.
    revision = ScriptDirectory(str(ROOT / "migrations")).get_revision("0004")
    assert revision is not None
    kinds = [
        ("ndarray", 1, "float32", [1024], {"descr": "<f4", "order": "C"}),
        ("json", 1, None, None, None),
        ("str", 2, None, None, {}),
        ("custom", 7, "x", [0, 3], {1: "int key", "é": [1.5, True, None, {"z": -0.0}]}),
    ]
    for kind in kinds:
        assert revision.module._kind_key(kind) == kind_key(kind)  # type: ignore[arg-type]
    assert revision.module._kind_key(("bad", 1, None, None, {"x": float("nan")})) is None


def test_upgrade_to_0004_leaves_files_with_bad_json_without_a_kind(sqlite_url: str) -> None:
    # Rows another program wrote: the upgrade must go through, and give them no kind id.
    made_before_0010(sqlite_url)
    with SQLBackend(sqlite_url) as backend:
        backend.save_batch([np.arange(n) for n in (3, 4, 5, 6)], ["a", "b", "c", "d"])
    migrate.downgrade(sqlite_url, "0003")
    with engine_for(sqlite_url) as engine, engine.begin() as conn:
        conn.execute(sa.text("""UPDATE polystore_nodes SET meta = '{"x": NaN}' WHERE name = 'a'"""))
        conn.execute(sa.text("UPDATE polystore_nodes SET shape = 'not json' WHERE name = 'b'"))
        deep = "[" * 5000 + "]" * 5000  # JSON, nested deeper than Python parses
        conn.execute(
            sa.text("UPDATE polystore_nodes SET shape = :deep WHERE name = 'c'"), {"deep": deep}
        )
    migrate.upgrade(sqlite_url)
    with engine_for(sqlite_url) as engine, engine.connect() as conn:
        kinds = dict(
            conn.execute(
                sa.text("SELECT name, kind_id FROM polystore_nodes WHERE kind = 'file'")
            ).all()
        )
    assert kinds["a"] is None and kinds["b"] is None and kinds["c"] is None
    assert kinds["d"] is not None
    with SQLBackend(sqlite_url) as backend:
        report = backend.fsck()  # (reads the bad rows without failing)
        assert report.without_kind == 3, str(report)
        np.testing.assert_array_equal(backend.load_batch(["d"])[0], np.arange(6))


# -- 0010: the hash that names content ------------------------------------------------


def _algorithm(url: str) -> str:
    with engine_for(url) as engine, engine.connect() as conn:
        return str(conn.execute(sa.text("SELECT hash_algorithm FROM polystore_identity")).scalar())


def test_content_stored_before_0010_keeps_its_sha256_names(
    catalog_url: str, tmp_path: Path
) -> None:
    migrate.upgrade(catalog_url, "0001")
    _write_at_0001(catalog_url)  # content, named by its SHA-256
    migrate.upgrade(catalog_url)
    assert _algorithm(catalog_url) == "sha256"
    old = b"written at 0001"
    with SQLBackend(catalog_url, blob_store=tmp_path / "blobs", inline_limit=64) as backend:
        assert backend.hash_algorithm == "sha256"
        backend.save(old, "again.bin")  # the same content: the same blob
        backend.save(b"x" * 100, "external.bin")
        backend.save_file(_local(tmp_path, b"y" * 200), "streamed.bin", serializer="bytes")
        for path, data in (("again.bin", old), ("external.bin", b"x" * 100)):
            assert backend.stat(path).hash == hashlib.sha256(data).hexdigest()
        assert backend.stat("streamed.bin").hash == hashlib.sha256(b"y" * 200).hexdigest()
        with engine_for(catalog_url) as engine, engine.connect() as conn:
            refcount = conn.execute(
                sa.text("SELECT refcount FROM polystore_blobs WHERE hash = :h"),
                {"h": hashlib.sha256(old).hexdigest()},
            ).scalar()
        assert refcount == 2
        assert backend.load("legacy/note.txt") == old.decode()
        assert b"".join(backend.iter_content("external.bin")) == b"x" * 100
        assert backend.fsck(verify=True).ok
    with SQLBackend(catalog_url, blob_store=tmp_path / "blobs", verify_inline=True) as backend:
        assert backend.load("again.bin") == old


def _local(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / f"local-{len(data)}.bin"
    path.write_bytes(data)
    return path


def test_a_catalog_without_content_at_0010_takes_blake3(catalog_url: str) -> None:
    import blake3

    migrate.upgrade(catalog_url, "0009")  # made before 0010, but never given content
    migrate.upgrade(catalog_url)
    assert _algorithm(catalog_url) == "blake3"
    with SQLBackend(catalog_url) as backend:
        assert backend.hash_algorithm == "blake3"
        backend.save(b"new", "f.bin")
        assert backend.stat("f.bin").hash == blake3.blake3(b"new").hexdigest()


def test_a_catalog_of_blake3_content_refuses_to_go_below_0010(catalog_url: str) -> None:
    with SQLBackend(catalog_url) as backend:
        backend.save(np.arange(5), "x.npy")
    before = _catalog_rows(catalog_url)
    with pytest.raises(SchemaVersionError, match=r"blake3.*only sha256.*Nothing was changed"):
        migrate.downgrade(catalog_url, "0009")
    assert migrate.current(catalog_url) == HEAD
    assert _catalog_rows(catalog_url) == before
    with SQLBackend(catalog_url) as backend:
        assert np.array_equal(backend.load("x.npy"), np.arange(5))
        backend.delete("x.npy")
        backend.gc(grace=0)  # no content left: it may go down, and comes back up as blake3
    migrate.downgrade(catalog_url, "0009")
    migrate.upgrade(catalog_url)
    assert _algorithm(catalog_url) == "blake3"
    with SQLBackend(catalog_url) as backend:
        backend.save(b"kept", "f.bin")
    migrate.downgrade(catalog_url, "base")  # which removes the content with everything else
    assert migrate.current(catalog_url) is None


def test_relative_targets_are_steps_from_the_catalogs_revision(catalog_url: str) -> None:
    """A step back that reaches base removes the catalog, content and all, even one
    whose content BLAKE3 names; a step short of it is refused like ``0009``."""
    with SQLBackend(catalog_url) as backend:
        backend.save(b"kept", "f.bin")
    with pytest.raises(SchemaVersionError, match=r"blake3.*Nothing was changed"):
        migrate.downgrade(catalog_url, "-1")
    assert migrate.current(catalog_url) == HEAD
    steps = len(migrate.history())
    with pytest.raises(SchemaVersionError, match=f"-{steps + 1} steps past the first"):
        migrate.downgrade(catalog_url, f"-{steps + 1}")
    with pytest.raises(SchemaVersionError, match=r"\+1 steps past the newest"):
        migrate.upgrade(catalog_url, "+1")
    with pytest.raises(SchemaVersionError, match="newer than 0009: use downgrade"):
        migrate.upgrade(catalog_url, "-1")
    assert migrate.resolve(catalog_url, f"-{steps}") == "base"
    migrate.downgrade(catalog_url, f"-{steps}")
    assert migrate.current(catalog_url) is None
    assert migrate.resolve(catalog_url, "+2") == migrate.history()[1][0]
    migrate.upgrade(catalog_url, "+2")
    assert migrate.current(catalog_url) == migrate.history()[1][0]


def test_an_algorithm_this_polystore_does_not_know_is_refused(catalog_url: str) -> None:
    with SQLBackend(catalog_url):
        pass
    with engine_for(catalog_url) as engine, engine.begin() as conn:
        conn.execute(sa.text("UPDATE polystore_identity SET hash_algorithm = 'sha3-512'"))
    with pytest.raises(SchemaVersionError, match=r"'sha3-512'.*does not know.*upgrade polystore"):
        SQLBackend(catalog_url)


def test_a_sha256_catalog_names_content_by_sha256_on_every_path(
    catalog_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Staged and parallel hashing, an object found already in the store, rebalance
    both ways, streamed reads, fsck: all by the catalog's SHA-256, none by BLAKE3."""
    from polystore.backends.sql import staging

    def sha(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    monkeypatch.setattr(staging, "STAGE_OVER", 64 << 10)
    monkeypatch.setattr(staging, "PARALLEL_MIN", 64 << 10)
    made_before_0010(catalog_url)
    store = LocalBlobStore(tmp_path / "blobs")
    big = [bytes([n]) * (100 << 10) for n in range(3)]  # staged, hashed on worker threads
    there = b"already in the store, with no row" * 4000
    store.put(sha(there), [there], len(there))
    with SQLBackend(catalog_url, blob_store=store, inline_limit=1024) as backend:
        backend.save_batch([*big, b"small", there], ["b0", "b1", "b2", "small", "there"])
        for path, data in (("b0", big[0]), ("b2", big[2]), ("small", b"small"), ("there", there)):
            assert backend.stat(path).hash == sha(data)
            assert b"".join(backend.iter_content(path)) == data
        assert sorted(o.hash for o in store.scan() if o.hash) == sorted(
            sha(d) for d in (*big, there)
        )
        assert backend.rebalance(inline_limit=1 << 20).to_inline == 4
        assert backend.rebalance(inline_limit=0).to_external == 5
        assert backend.stat("small").store == store.name
        assert backend.load("small") == b"small"
        assert backend.fsck(verify=True).ok


def test_a_catalog_without_its_identity_row_says_so(catalog_url: str) -> None:
    with SQLBackend(catalog_url):
        pass
    with engine_for(catalog_url) as engine, engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM polystore_identity"))
    with pytest.raises(BackendConfigError, match="polystore_identity row is missing"):
        SQLBackend(catalog_url)
