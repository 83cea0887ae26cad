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
with the transaction and savepoint it belongs to). On PostgreSQL it is also
published in the transaction-local setting ``polystore.epoch``, which the
node trigger compares with before it runs at all (revision 0006): while no
snapshot needs an old row, an update or delete costs no trigger call.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy import Connection

from polystore.backends.sql.engine import driver_fetch

__all__ = ["close_epoch", "current"]

_KEY = "polystore_epoch"
_READ = "SELECT epoch FROM polystore_epoch WHERE id = 1"


# PostgreSQL: read the epoch and publish it, for this transaction, in the
# setting the node trigger's WHEN clause compares with (revision 0006).
_READ_AND_PUBLISH = (
    "SELECT epoch, set_config('polystore.epoch', CAST(epoch AS TEXT), true) "
    "FROM polystore_epoch WHERE id = 1"
)


def _remember(conn: Connection, epoch: int) -> None:
    # With the savepoint it was read in: rolling that back releases its
    # locks and settings on PostgreSQL, so the epoch is then read again.
    conn.info[_KEY] = (conn.get_transaction(), conn.get_nested_transaction(), epoch)


def current(conn: Connection) -> int:
    """The current epoch, for the node rows this transaction writes (see the module doc)."""
    cached = conn.info.get(_KEY)
    if (
        cached is not None
        and cached[0] is conn.get_transaction()
        and (cached[1] is None or cached[1].is_active)
    ):
        return int(cached[2])
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("LOCK TABLE polystore_epoch IN ROW SHARE MODE")
        epoch = int(conn.exec_driver_sql(_READ_AND_PUBLISH).first()[0])  # type: ignore[index]
    else:  # (on the driver's cursor: every save runs this)
        epoch = int(driver_fetch(conn, _READ, ())[0][0])
    _remember(conn, epoch)
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
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(_READ_AND_PUBLISH)
    # This very transaction may go on writing nodes: at the new epoch.
    _remember(conn, epoch + 1)
    return epoch
