"""The ``polystore`` command line (also ``python -m polystore``).

One click group, :func:`main`, with one function per command. The modules split
the commands by what they touch:

* :mod:`polystore.cli.app` -- the group, global options, the catalog a command
  opens, and how errors become one line on stderr;
* :mod:`polystore.cli.output` -- tables, JSON and progress bars;
* :mod:`polystore.cli.browse` -- ``ls``, ``tree``, ``cat``, ``stat``, ``du``;
* :mod:`polystore.cli.edit` -- ``rm``, ``mv``, ``cp``;
* :mod:`polystore.cli.transfer` -- ``put`` and ``get`` (local files in and out);
* :mod:`polystore.cli.admin` -- ``query``, ``gc``, ``fsck`` and ``db ...``;
* :mod:`polystore.cli.rebalance` -- ``rebalance``;
* :mod:`polystore.cli.globs` -- catalog globs, ``--include``/``--exclude``;
* :mod:`polystore.cli.complete` -- shell completion of catalog paths;
* :mod:`polystore.cli.snapshots` -- ``snapshot ...``, ``diff``, ``restore``
  and the global ``--at``;
* :mod:`polystore.cli.demo` -- ``demo``.

Importing this package stays light: numpy, SQLAlchemy and rich load inside the
commands that need them.
"""

from __future__ import annotations

# Importing the command modules registers their commands on the group.
import polystore.cli.admin
import polystore.cli.browse
import polystore.cli.demo
import polystore.cli.edit
import polystore.cli.rebalance
import polystore.cli.snapshots
import polystore.cli.transfer  # noqa: F401
from polystore.cli.app import main

__all__ = ["main"]
