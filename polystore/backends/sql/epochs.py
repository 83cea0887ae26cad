"""The catalog's epoch: what every node write is stamped with, and what a snapshot closes.

``polystore_epoch`` holds one counter. A node row records the epoch in which it
was last written (``polystore_nodes.epoch``); a snapshot records the current
epoch ``c`` and raises the counter to ``c + 1``, so it sees exactly the rows
written up to then (:mod:`.history` reads them back).

For a snapshot to hold whole transactions, no transaction may write a row at
epoch ``c`` after the snapshot of ``c`` has committed. Every transaction that
writes nodes calls :func:`current` before it takes any other lock:

* SQLite: a writer holds the database's only write lock, the snapshot waits
  for it; reading the counter is enough.
* PostgreSQL: the writer takes ``ROW SHARE`` on ``polystore_epoch`` (a table
  lock, kept in memory by the lock manager's fast path: no row is written) and
  reads the counter; :func:`close_epoch` takes ``EXCLUSIVE``, which waits for
  every writer holding ``ROW SHARE`` and makes new ones queue behind it (table
  locks are granted in order, so a snapshot is never starved by a stream of
  writers). Taken first, before node or blob locks, it cannot close a cycle
  of waits: a writer waiting for it holds nothing another writer needs.

The value is kept for the rest of the transaction (in ``Connection.info``,
with the transaction it belongs to).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

__all__ = ["close_epoch", "current"]

_KEY = "polystore_epoch"
_READ = "SELECT epoch FROM polystore_epoch WHERE id = 1"


def _transaction(conn: Connection) -> Any:
    return conn.get_transaction()


def current(conn: Connection) -> int:
    """The current epoch, for the node rows this transaction writes (see the module doc)."""
    txn = _transaction(conn)
    cached = conn.info.get(_KEY)
    if cached is not None and txn is not None and cached[0] is txn:
        return int(cached[1])
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("LOCK TABLE polystore_epoch IN ROW SHARE MODE")
    epoch = int(conn.exec_driver_sql(_READ).scalar_one())
    conn.info[_KEY] = (txn, epoch)
    return epoch


def close_epoch(conn: Connection) -> int:
    """Close the current epoch (for a snapshot): return it, and raise the counter.

    On PostgreSQL this waits for the writers in flight and holds new ones off
    until the transaction ends (see the module doc).
    """
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("LOCK TABLE polystore_epoch IN EXCLUSIVE MODE")
    epoch = int(conn.exec_driver_sql(_READ).scalar_one())
    conn.execute(
        sa.text("UPDATE polystore_epoch SET epoch = :next WHERE id = 1"), {"next": epoch + 1}
    )
    # This very transaction may go on writing nodes: at the new epoch.
    conn.info[_KEY] = (_transaction(conn), epoch + 1)
    return epoch
