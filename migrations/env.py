"""Alembic environment for polystore's catalog.

The database comes from, in order: a connection handed over in
``config.attributes["connection"]`` (how polystore itself runs migrations),
``-x url=...`` on the alembic command line, the ``sqlalchemy.url`` option set in
code, or ``POLYSTORE_URL``. Only ``polystore_*`` tables are looked at, and the
version table is ``polystore_alembic_version``, so an application's own tables
and Alembic history in the same database are never read or touched.
"""

from __future__ import annotations

import os
from typing import Any

from alembic import context
from sqlalchemy import Connection

from polystore.backends.sql.engine import create_catalog_engine
from polystore.backends.sql.models import Base
from polystore.backends.sql.schema import VERSION_TABLE, include_name

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = (
        context.get_x_argument(as_dictionary=True).get("url")
        or config.get_main_option("sqlalchemy.url")
        or os.environ.get("POLYSTORE_URL")
    )
    if not url:
        raise SystemExit(
            "no database URL: run `alembic -x url=sqlite:///catalog.db ...` or set POLYSTORE_URL"
        )
    return url


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        include_name=include_name,
        compare_type=True,
        **kwargs,
    )


def _run(connection: Connection) -> None:
    # SQLite cannot ALTER most things in place: batch mode rebuilds the table.
    _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    url = _url()
    _configure(url=url, literal_binds=True, render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_catalog_engine(_url())
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
