"""Alembic environment for polystore's catalog.

The database comes from, in order: a connection handed over in
``config.attributes["connection"]`` (how polystore itself runs migrations),
``-x url=...`` on the alembic command line, the ``sqlalchemy.url`` option set in
code, or ``POLYSTORE_URL``. A URL written into an ini file is refused: the
catalog a command touches is always named where the command is given.

Only ``polystore_*`` tables are looked at, and the version table is
``polystore_alembic_version``, so an application's own tables and Alembic
history in the same database are never read or touched. When a downgrade
reaches base the (then empty) version table is dropped too, so nothing of
polystore is left behind.

Each run is one transaction under polystore's migration lock, with SQLite's
foreign keys off while batch operations rebuild tables (see
``polystore.backends.sql.schema.migration_transaction`` for why).

Writing a revision: use ``op.batch_alter_table`` for any ALTER (SQLite rebuilds
the table). A revision that rebuilds ``polystore_nodes`` or ``polystore_blobs``,
or changes a column the ``polystore_catalog`` view reads, drops the view first
and recreates it afterwards, on both databases: SQLite refuses to rename the
rebuilt table into place while a view names the dropped one, and PostgreSQL
will not alter a column a view uses. Recreate it from the revision that last
defined it (``op.get_context().script.get_revision("0001").module``) or write
the new definition out in full; never import today's definition from polystore,
which would change what an old revision does. Add the revision to
``polystore.backends.sql.schema.REVISIONS``.
"""

from __future__ import annotations

import configparser
import os
from logging.config import fileConfig
from typing import Any

import sqlalchemy as sa
from alembic import context
from sqlalchemy import Connection

from polystore.backends.sql.engine import create_catalog_engine
from polystore.backends.sql.models import Base
from polystore.backends.sql.schema import (
    VERSION_TABLE,
    include_name,
    migration_transaction,
    sqlite_foreign_keys_off,
)

config = context.config
target_metadata = Base.metadata

# The alembic command line reads logging settings from alembic.ini; polystore's
# own callers build the configuration in code and leave logging to the application.
if config.config_file_name is not None and "connection" not in config.attributes:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    if config.config_file_name is not None:
        ini = configparser.ConfigParser(interpolation=None)
        ini.read(config.config_file_name)
        if ini.has_option(config.config_ini_section, "sqlalchemy.url"):
            raise SystemExit(
                f"{config.config_file_name} sets sqlalchemy.url; polystore takes the catalog "
                "from `-x url=...` or POLYSTORE_URL only: remove it from the file"
            )
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


def _drop_empty_version_table(connection: Connection) -> None:
    # At base polystore leaves nothing behind: Alembic keeps an empty version
    # table after `downgrade base`; drop it. A later upgrade recreates it.
    if context.get_context().opts.get("dont_mutate"):
        return  # `alembic current` and friends only read
    if sa.inspect(connection).has_table(VERSION_TABLE):
        rows = connection.execute(sa.text(f"SELECT count(*) FROM {VERSION_TABLE}")).scalar()
        if rows == 0:
            connection.execute(sa.text(f"DROP TABLE {VERSION_TABLE}"))


def _run(connection: Connection) -> None:
    # SQLite cannot ALTER most things in place: batch mode rebuilds the table.
    _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    # Inside the caller's transaction (or ours), this opens no transaction of its own.
    with context.begin_transaction():
        context.run_migrations()
        _drop_empty_version_table(connection)


def run_migrations_offline() -> None:
    url = _url()
    _configure(url=url, literal_binds=True, render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        if connection.in_transaction():
            # The caller owns the transaction (and the lock): polystore's own
            # schema code does this, with foreign keys already off on SQLite.
            sqlite_foreign_keys_off(connection)
            _run(connection)
        else:
            with migration_transaction(connection) as conn:
                _run(conn)
        return
    engine = create_catalog_engine(_url())
    try:
        with engine.connect() as plain, migration_transaction(plain) as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
