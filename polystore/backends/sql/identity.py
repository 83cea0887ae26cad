"""The catalog's identity, and the blob store that belongs to it.

Two catalogs must never share an external blob store: each counts references
to the objects only among its own files, so once the same content is
deleted in one of them, its ``gc()`` deletes the object the other still needs.

So a store belongs to one catalog. Every catalog has an identity, a UUID in
``polystore_identity`` drawn once (revision 0005); a store records the
identity of its catalog in its owner marker
(:meth:`~polystore.blobs.BlobStore.claim`), and when a backend opens it
claims its store:

* no marker yet: the store becomes this catalog's (the marker is created only
  if absent, so of two catalogs opening a fresh store at once exactly one
  wins, and the other is refused);
* the marker names this catalog: nothing more to do;
* it names another catalog: :class:`~polystore.errors.BackendConfigError`,
  before anything is read or written.

A store that cannot be written (a read-only directory or bucket) is read
without being claimed. A catalog opened read-only (SQLite ``mode=ro`` or
``immutable=1``) only checks the marker, writing none, and so does an
in-memory SQLite catalog: it ends with its process, and would leave the store
claimed by a catalog that no longer exists. A store that keeps no
marker (``records_owner`` false: a custom store that does not implement one)
is not checked at all.

A copy of a catalog (a copied SQLite file, a restored dump) has the same
identity: it is the same catalog to a store, fit to replace the original, not
to live beside it on the same store.
"""

from __future__ import annotations

import os
import socket

import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from polystore.backends.sql.models import identity_table
from polystore.blobs.base import OWNER_KEY, BlobStore, StoreOwner
from polystore.errors import BackendConfigError
from polystore.hashing import HashAlgorithm, named

__all__ = ["catalog_id", "claim_store", "describe", "hash_algorithm", "only_checks"]


# Plain text for the driver: a statement compiled by SQLAlchemy would be
# compiled again by every new backend's engine (a third of a millisecond).
_SELECT_ID = (
    f"SELECT {identity_table.c.catalog_id.name} FROM {identity_table.name} "
    f"WHERE {identity_table.c.id.name} = 1"
)


def catalog_id(conn: Connection) -> str:
    """The identity of the catalog ``conn`` is connected to."""
    return str(_identity_column(conn, _SELECT_ID))


_SELECT_ALGORITHM = (
    f"SELECT {identity_table.c.hash_algorithm.name} FROM {identity_table.name} "
    f"WHERE {identity_table.c.id.name} = 1"
)


def hash_algorithm(conn: Connection) -> HashAlgorithm:
    """The algorithm that names the content of the catalog ``conn`` is connected to."""
    return named(_identity_column(conn, _SELECT_ALGORITHM))


def _identity_column(conn: Connection, select: str) -> object:
    found = conn.exec_driver_sql(select).scalar()
    if found is None:
        raise BackendConfigError(
            "the catalog has no identity (its polystore_identity row is missing); it was "
            "changed behind polystore's back"
        )
    return found


def describe(url: sa.URL) -> str:
    """The catalog at ``url`` for people: its URL (no password, SQLite paths absolute) and host."""
    in_memory = url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"
    if url.get_backend_name() == "sqlite" and url.database and not in_memory:
        database = url.database
        if database.startswith("file:"):  # a URI filename (?uri=true)
            database = database[len("file:") :].partition("?")[0]
        where = f"sqlite:///{os.path.abspath(database)}"
    else:
        where = url.render_as_string(hide_password=True)
    return f"{where} on {socket.gethostname()}"


def only_checks(url: sa.URL) -> bool:
    """Whether a catalog at ``url`` checks its store's owner without claiming the store.

    True for SQLite opened read-only (``mode=ro``, ``immutable=1``) and for
    in-memory SQLite.
    """
    if url.get_backend_name() != "sqlite":
        return False
    return (
        url.database in (None, "", ":memory:")
        or url.query.get("mode") in ("ro", "memory")
        or url.query.get("immutable") in ("1", "true")
    )


def claim_store(store: BlobStore, engine: Engine) -> None:
    """Claim ``store`` for the catalog of ``engine``; BackendConfigError if another owns it."""
    if not store.records_owner:
        return
    with engine.connect() as conn:
        me = StoreOwner(catalog_id(conn), describe(engine.url))
    found = store.owner() if only_checks(engine.url) else store.claim(me)
    if found is None or found.id == me.id:
        return
    since = f", since {found.claimed_at}" if found.claimed_at else ""
    raise BackendConfigError(
        f"blob store {store.name!r} at {store.where()} belongs to another catalog: "
        f"{found.id} ({found.description or 'no description'}{since}); this catalog is "
        f"{me.id} ({me.description}). Two catalogs on one store would delete each other's "
        "content in gc(): give this catalog a store of its own (another directory or S3 "
        f"prefix). If the other catalog no longer exists, delete {store.where()}/{OWNER_KEY} "
        "and this catalog claims the store when it next opens"
    )
