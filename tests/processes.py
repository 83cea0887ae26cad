"""Run test workers as separate processes, started together, and collect their reports.

Concurrency is proven with processes, not threads: each worker opens its own
backend, as separate programs sharing a catalog do. A fork server that has
imported polystore once starts workers in milliseconds instead of each
importing SQLAlchemy and numpy again.

A worker is a module-level function ``target(config, role, number, ready, go,
out)``: it opens what it needs, puts ``number`` on ``ready``, waits for ``go``
(so every worker starts its clock together, once all have opened their
backends), works, and puts one picklable report on ``out``.
"""

from __future__ import annotations

import multiprocessing
import queue
from collections.abc import Callable
from typing import Any

import pytest

__all__ = ["join", "run_together"]


def run_together(
    target: Callable[..., None],
    config: dict[str, Any],
    roles: list[str],
    *,
    seconds: float,
) -> list[Any]:
    """One process per role running ``target``; their reports, in the order they came."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["numpy", "sqlalchemy", "polystore.backends.sql", target.__module__])
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=target, args=(config, role, k, ready, go, out))
        for k, role in enumerate(roles)
    ]
    for proc in procs:
        proc.start()
    try:
        for _ in procs:
            ready.get(timeout=120)
        go.set()  # every backend is open: start the clock together
        return [out.get(timeout=seconds + 180) for _ in procs]
    except queue.Empty:
        pytest.fail("a worker process never reported")
    finally:
        join(procs)
        for q in (ready, out):
            q.close()
            q.join_thread()


def join(procs: list[Any]) -> None:
    """Wait for every process; kill one that has not ended within a minute."""
    for proc in procs:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
            proc.join()
