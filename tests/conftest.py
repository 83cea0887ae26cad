"""Shared fixtures: real SQLite files and a real PostgreSQL server.

Each PostgreSQL test gets a schema of its own (``search_path`` set through the
URL), dropped afterwards, so tests stay independent and can share one server.
Outside CI a PostgreSQL test skips, saying why, when the server is down; under
``CI=true`` every skip is turned into a failure.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

PG_URL = os.environ.get(
    "POLYSTORE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _pg_conninfo() -> str:
    from sqlalchemy.engine import make_url

    url = make_url(PG_URL)
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


_pg_state: dict[str, str | None] = {}


def _pg_unavailable_reason() -> str | None:
    if "reason" not in _pg_state:
        import psycopg

        try:
            with psycopg.connect(_pg_conninfo(), connect_timeout=3) as conn:
                conn.execute("SELECT 1")
            _pg_state["reason"] = None
        except psycopg.Error as exc:
            _pg_state["reason"] = f"PostgreSQL not reachable at {PG_URL}: {exc}".strip()
    return _pg_state["reason"]


def _require_pg() -> None:
    reason = _pg_unavailable_reason()
    if reason is not None:
        if IN_CI:
            pytest.fail(f"{reason} (CI=true: PostgreSQL tests must run)")
        pytest.skip(reason)


@contextmanager
def pg_schema() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh, empty schema, dropped afterwards."""
    _require_pg()
    import psycopg

    schema = f"ps_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_pg_conninfo(), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(_pg_conninfo(), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh, empty schema."""
    with pg_schema() as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: os.PathLike[str]) -> str:
    """A URL for a fresh SQLite file."""
    return f"sqlite:///{tmp_path}/catalog.db"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def catalog_url(request: pytest.FixtureRequest) -> str:
    """Each catalog test runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def more_catalogs(catalog_url: str, tmp_path: Path) -> Iterator[Callable[[], str]]:
    """``more_catalogs()`` is the URL of one more fresh catalog, beside ``catalog_url``'s.

    Another SQLite file, or another PostgreSQL schema: an independent catalog
    on the same kind of database.
    """
    with ExitStack() as stack:

        def more() -> str:
            if catalog_url.startswith("sqlite"):
                return f"sqlite:///{tmp_path}/catalog-{uuid.uuid4().hex[:8]}.db"
            return stack.enter_context(pg_schema())

        yield more


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def fresh_catalog(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[Path], str]]:
    """``fresh_catalog(tmp_path)`` is the URL of an empty, migrated catalog, made cheaply.

    For suites of many small tests (the conformance suites): one migrated
    catalog per module, copied (SQLite) or emptied (PostgreSQL) for each test.
    """
    from polystore.backends.sql import SQLBackend

    if request.param == "sqlite":
        template = tmp_path_factory.mktemp("template") / "catalog.db"
        SQLBackend(f"sqlite:///{template}").close()

        def copy(tmp_path: Path) -> str:
            shutil.copyfile(template, tmp_path / "catalog.db")
            return f"sqlite:///{tmp_path}/catalog.db"

        yield copy
        return

    _require_pg()
    import psycopg

    schema = f"ps_fresh_{uuid.uuid4().hex[:12]}"
    url = f"{PG_URL}{'&' if '?' in PG_URL else '?'}options=-csearch_path%3D{schema}"
    with psycopg.connect(_pg_conninfo(), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        SQLBackend(url).close()

        def empty(tmp_path: Path) -> str:
            with psycopg.connect(_pg_conninfo(), autocommit=True) as conn:
                conn.execute(f'SET search_path TO "{schema}"')
                conn.execute("DELETE FROM polystore_upload_intents")
                conn.execute("DELETE FROM polystore_nodes WHERE id <> 0")
                conn.execute("DELETE FROM polystore_blobs")
            return url

        yield empty
    finally:
        with psycopg.connect(_pg_conninfo(), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def open_backend() -> Iterator[Callable[..., Any]]:
    """``open_backend(url, **options)``: an SQLBackend closed after the test, whatever happens."""
    from polystore.backends.sql import SQLBackend

    opened: list[Any] = []

    def open_(url: str, **options: Any) -> Any:
        opened.append(SQLBackend(url, **options))
        return opened[-1]

    yield open_
    for backend in opened:
        backend.close()


_SERVICE_FIXTURES = {"pg_url", "catalog_url", "s3_store", "s3_url", "s3_server"}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    """Under CI, a test that needs a real server must run: its skip is a failure.

    Skips of conformance tests that do not apply to a backend (a capability it
    does not claim) stay skips.
    """
    report = yield
    needs_service = bool(_SERVICE_FIXTURES & set(getattr(item, "fixturenames", ()))) or any(
        item.iter_markers("postgres")
    )
    skipped = report.skipped and not hasattr(report, "wasxfail")  # type: ignore[attr-defined]
    if IN_CI and needs_service and skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr  # type: ignore[attr-defined]
        if "PostgreSQL" in str(reason) or "S3" in str(reason) or "moto" in str(reason):
            report.outcome = "failed"  # type: ignore[attr-defined]
            report.longrepr = f"skipped under CI=true, which counts as a failure: {reason}"  # type: ignore[attr-defined]
    return report


# -- S3: a moto server on 127.0.0.1, started by the tests themselves ---------------------

S3_BUCKET = "polystore-test"
S3_CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing"}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """The endpoint of an S3 server (moto's server mode, in a subprocess) with one bucket.

    A subprocess, not moto's in-process threaded server: the tests turn warnings
    into errors, which must not reach the server's own threads.
    """
    import socket
    import subprocess
    import sys
    import time

    try:
        import boto3
        import moto.server  # noqa: F401
    except ImportError as exc:  # pragma: no cover - moto[server] is a dev dependency
        pytest.skip(f"S3 tests need moto[server] and boto3: {exc}")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the moto S3 server did not start on port {port}")
                time.sleep(0.05)
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=S3_CREDENTIALS["access_key_id"],
            aws_secret_access_key=S3_CREDENTIALS["secret_access_key"],
        ).create_bucket(Bucket=S3_BUCKET)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def s3_url(s3_server: str) -> str:
    """A blob store URL for a fresh prefix of the test bucket, options in the query."""
    from urllib.parse import urlencode

    query = urlencode(
        {"endpoint": s3_server, "region": "us-east-1", "allow_http": "true", **S3_CREDENTIALS}
    )
    return f"s3://{S3_BUCKET}/t-{uuid.uuid4().hex[:12]}?{query}"


@pytest.fixture
def s3_store(s3_url: str) -> object:
    """An :class:`~polystore.blobs.S3BlobStore` on a fresh prefix (built from its URL)."""
    from polystore.blobs import from_url

    return from_url(s3_url)


@pytest.fixture
def isolated_backend_classes() -> Iterator[None]:
    """Backend classes a test defines register process-wide; forget them afterwards."""
    from polystore.backends import base

    saved = dict(base._BACKEND_CLASSES)
    yield
    base._BACKEND_CLASSES.clear()
    base._BACKEND_CLASSES.update(saved)
