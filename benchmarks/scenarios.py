"""The scenarios of issues 3 and 19 ("Performance"), by name, in running order.

polystore is always driven through its public API (``SQLBackend``) and compared
with a raw baseline doing the same job in the same process (see drivers.py).
"""

from __future__ import annotations

from collections.abc import Callable

from bulk import load_postgres, load_sqlite, save_postgres, save_sqlite
from ecosystem import array_slice, zarr_large, zarr_small
from harness import Bench, Row
from large import hash_reads, large_load, large_save
from lookups import exists, list_dir, load_one
from snapshots import (
    snapshot_cost,
    snapshot_diff,
    snapshot_reads,
    snapshot_save_postgres,
    snapshot_save_sqlite,
)
from tree_ops import delete_tree, move_dir
from zarr_store import zarr_sqlite

__all__ = ["SCENARIOS", "Scenario"]


class Scenario:
    def __init__(self, func: Callable[[Bench], list[Row]], *, postgres: bool = False) -> None:
        self.func = func
        self.postgres = postgres
        self.name = func.__name__


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(save_sqlite),
        Scenario(save_postgres, postgres=True),
        Scenario(load_sqlite),
        Scenario(load_postgres, postgres=True),
        Scenario(load_one),
        Scenario(list_dir),
        Scenario(exists),
        Scenario(move_dir),
        Scenario(delete_tree),
        Scenario(zarr_sqlite),
        Scenario(zarr_small),
        Scenario(zarr_large),
        Scenario(array_slice),
        Scenario(large_save),
        Scenario(large_load),
        Scenario(hash_reads),
        Scenario(snapshot_cost),
        Scenario(snapshot_save_sqlite),
        Scenario(snapshot_save_postgres, postgres=True),
        Scenario(snapshot_reads),
        Scenario(snapshot_diff),
    )
}
