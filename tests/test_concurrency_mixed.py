"""Readers and writers at once, in several processes and threads, on one catalog.

For a few seconds, writer processes (two threads each) and reader processes
(two threads each) share one catalog on SQLite or PostgreSQL, with content
inline or in an external blob store:

* writers ``save_batch`` new numbered batches of 20 files whose contents name
  their batch, rewrite whole *slots* (20 files that always change together, to
  a new generation), delete their own older batches recursively, and overwrite
  one hot path;
* readers list everything (``list_files`` recursive, ``list_dir``) and must
  never see part of a batch: a batch directory holds all 20 files or does not
  exist. They ``load_batch`` a slot and must see one generation in all 20
  files -- ``load_batch`` reads one snapshot (REPEATABLE READ on PostgreSQL, one
  read transaction on SQLite), so a rewrite committed half-way through the
  call is invisible to it; and they ``load_batch`` batches they listed, which
  either load whole with the right contents or are gone whole.

Afterwards every batch a writer saw committed and did not delete is there,
byte for byte, and nothing else is (no lost write, no ghost); each slot holds
a generation some writer committed; the hot path holds one of the values
written to it; reference counts match the file rows and ``fsck()`` is clean.
Any exception in any worker -- a lock timeout, a serialization failure that
escaped the retries -- fails the test.

``tests/test_sql_concurrency.py`` covers many writers without readers; this
module is about what readers see. ``POLYSTORE_LONG=1`` runs 30 seconds per case
instead of 3 (``POLYSTORE_MIXED_SECONDS`` sets it).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from catalog_checks import refcounts
from processes import run_together

from polystore import NotFoundError
from polystore.backends.sql import SQLBackend

LONG = os.environ.get("POLYSTORE_LONG", "").lower() in ("1", "true", "yes")
SECONDS = float(os.environ.get("POLYSTORE_MIXED_SECONDS", "").strip() or (30 if LONG else 3))
BATCH = 20
SLOTS = 3
WRITER_PROCESSES = 2
READER_PROCESSES = 2
THREADS = 2
EXTERNAL_LIMIT = 48


def batch_content(batch: str, i: int) -> bytes:
    """File ``i`` of batch ``batch``: names its batch; sizes straddle the external limit."""
    return f"{batch}|{i}|".encode() * (1 + (i * 7) % 9)


def slot_paths(slot: int) -> list[str]:
    return [f"slots/s{slot}/f{i:02d}.bin" for i in range(BATCH)]


def slot_content(slot: int, generation: str, i: int) -> bytes:
    return f"s{slot}|{generation}|{i}|".encode() * (1 + i % 5)


def _open(config: dict[str, Any]) -> SQLBackend:
    return SQLBackend(
        config["url"], blob_store=config["blob_store"], inline_limit=config["inline_limit"]
    )


# -- workers ------------------------------------------------------------------------------


def _writer_thread(backend: SQLBackend, name: str, stop: float, out: dict[str, Any]) -> None:
    rng = random.Random(name)
    mine: list[str] = []  # this thread's live batches
    n = 0
    while time.monotonic() < stop:
        n += 1
        roll = rng.random()
        if roll < 0.4:
            batch = f"{name}b{n}"
            paths = [f"new/{batch}/f{i:02d}.bin" for i in range(BATCH)]
            backend.save_batch([batch_content(batch, i) for i in range(BATCH)], paths)
            mine.append(batch)
            out["committed"].append(batch)
        elif roll < 0.7:
            slot, generation = rng.randrange(SLOTS), f"{name}g{n}"
            values = [slot_content(slot, generation, i) for i in range(BATCH)]
            backend.save_batch(values, slot_paths(slot))
            out["generations"][str(slot)].append(generation)
        elif roll < 0.85 and len(mine) > 2:
            batch = mine.pop(rng.randrange(len(mine)))
            backend.delete(f"new/{batch}", recursive=True)
            out["deleted"].append(batch)
        else:
            value = f"{name}v{n}".encode() * rng.randint(1, 20)
            backend.save(value, "hot/x.bin")
            out["hot"].append(value.decode())
        out["writes"] += 1


def _reader_thread(backend: SQLBackend, name: str, stop: float, out: dict[str, Any]) -> None:
    rng = random.Random(name)
    while time.monotonic() < stop:
        found = backend.list_files("new", recursive=True)
        batches: dict[str, list[str]] = defaultdict(list)
        for path in found:
            batches[path.split("/")[1]].append(path)
        for batch, files in batches.items():
            assert len(files) == BATCH, f"listed {len(files)} of {BATCH} files of {batch}"
        listed = backend.list_dir("new")
        if listed:
            batch = rng.choice(listed)
            try:
                count = len(backend.list_files(f"new/{batch}"))
            except NotFoundError:
                count = BATCH  # deleted, whole, since list_dir
            assert count == BATCH, f"listed {count} of {BATCH} files of {batch}"
        slot = rng.randrange(SLOTS)
        loaded = backend.load_batch(slot_paths(slot))
        generations = {value.split(b"|")[1] for value in loaded}
        assert len(generations) == 1, f"slot {slot} mixes generations {sorted(generations)}"
        generation = generations.pop().decode()
        for i, value in enumerate(loaded):
            assert value == slot_content(slot, generation, i), (slot, i)
        if batches:
            batch = rng.choice(sorted(batches))
            try:
                values = backend.load_batch(sorted(batches[batch]))
            except NotFoundError:
                out["vanished"] += 1  # deleted, whole, since the listing
            else:
                for i, value in enumerate(values):
                    assert value == batch_content(batch, i), (batch, i)
        hot = backend.load("hot/x.bin")
        assert hot.decode().count("v") >= 1
        out["reads"] += 1


def _process(
    config: dict[str, Any], role: str, number: int, ready: Any, go: Any, results: Any
) -> None:
    """One worker process: THREADS threads of one role."""
    outs: list[dict[str, Any]] = []
    errors: list[str] = []
    try:
        backend = _open(config)
    except BaseException:  # noqa: BLE001 -- every failure goes to the parent, which fails
        results.put({"errors": [traceback.format_exc()]})
        ready.put(number)
        return
    ready.put(number)
    go.wait()
    stop = time.monotonic() + config["seconds"]

    def run(t: int) -> None:
        out: dict[str, Any] = {
            "committed": [],
            "deleted": [],
            "generations": defaultdict(list),
            "hot": [],
            "writes": 0,
            "reads": 0,
            "vanished": 0,
        }
        outs.append(out)
        name = f"{role[0]}{number}t{t}"
        try:
            target = _writer_thread if role == "writer" else _reader_thread
            target(backend, name, stop, out)
        except BaseException:  # noqa: BLE001 -- collected, the parent fails the test
            errors.append(f"{name}: {traceback.format_exc()}")

    threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    backend.close()
    results.put({"outs": json.loads(json.dumps(outs)), "errors": errors})


# -- the test -------------------------------------------------------------------------------


def _record(figures: dict[str, Any]) -> None:
    log = os.environ.get("POLYSTORE_RELIABILITY_LOG")
    if log:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"test": test, **figures}) + "\n")


@pytest.mark.parametrize("placement", ["inline", "external"])
def test_readers_never_see_partial_batches(
    catalog_url: str, placement: str, tmp_path: Path
) -> None:
    config: dict[str, Any] = {
        "url": catalog_url,
        "blob_store": None,
        "inline_limit": 1 << 20,
        "seconds": SECONDS,
    }
    if placement == "external":
        config |= {"blob_store": f"file://{tmp_path}/blobs", "inline_limit": EXTERNAL_LIMIT}
    with _open(config) as setup:
        setup.ensure_directory("new")
        for slot in range(SLOTS):
            setup.save_batch([slot_content(slot, "g0", i) for i in range(BATCH)], slot_paths(slot))
        setup.save(b"startv0", "hot/x.bin")

    roles = ["writer"] * WRITER_PROCESSES + ["reader"] * READER_PROCESSES
    reports = run_together(_process, config, roles, seconds=SECONDS)

    errors = [e for report in reports for e in report["errors"]]
    assert not errors, "\n".join(errors)
    outs = [out for report in reports for out in report["outs"]]
    committed = {b for out in outs for b in out["committed"]}
    deleted = {b for out in outs for b in out["deleted"]}
    generations: dict[str, set[str]] = defaultdict(lambda: {"g0"})
    for out in outs:
        for slot, gens in out["generations"].items():
            generations[slot].update(gens)
    hot_values = {"startv0"} | {v for out in outs for v in out["hot"]}

    with _open(config) as backend:
        found = backend.list_files("new", recursive=True)
        by_batch: dict[str, list[str]] = defaultdict(list)
        for path in found:
            by_batch[path.split("/")[1]].append(path)
        assert set(by_batch) == committed - deleted, "lost or ghost batches"
        for batch, files in by_batch.items():
            values = backend.load_batch(sorted(files))
            assert values == [batch_content(batch, i) for i in range(BATCH)], batch
        for slot in range(SLOTS):
            loaded = backend.load_batch(slot_paths(slot))
            generation = loaded[0].split(b"|")[1].decode()
            assert generation in generations[str(slot)]
            assert loaded == [slot_content(slot, generation, i) for i in range(BATCH)]
        assert backend.load("hot/x.bin").decode() in hot_values
        stored, referenced = refcounts(backend)
        assert stored == referenced
        report = backend.fsck(verify=True)
        assert report.ok, str(report)

    figures = {
        "processes": len(roles),
        "threads": len(roles) * THREADS,
        "seconds": SECONDS,
        "writes": sum(out["writes"] for out in outs),
        "reader_rounds": sum(out["reads"] for out in outs),
        "batches_committed": len(committed),
        "batches_deleted": len(deleted),
        "listed_then_vanished": sum(out["vanished"] for out in outs),
    }
    _record(figures)
    assert figures["writes"] > 0 and figures["reader_rounds"] > 0


def test_list_files_reads_one_snapshot(catalog_url: str) -> None:
    """A directory deleted while list_files runs is listed whole, or not found: never empty.

    The delete is made to commit exactly between list_files' statements (after
    the one that resolves the directory), from another backend.
    """
    with SQLBackend(catalog_url) as reader, SQLBackend(catalog_url) as writer:
        writer.save_batch([b"1", b"2", b"3"], ["d/a.bin", "d/b.bin", "d/c.bin"])
        fired: list[str] = []

        def delete_after_first_select(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if not fired and statement.lstrip().upper().startswith("SELECT"):
                fired.append(statement)
                writer.delete("d", recursive=True)

        sa.event.listen(reader.engine, "after_cursor_execute", delete_after_first_select)
        try:
            listed = reader.list_files("d")
        except NotFoundError:
            listed = None
        finally:
            sa.event.remove(reader.engine, "after_cursor_execute", delete_after_first_select)
        assert fired, "list_files ran no SELECT through the engine"
        assert not writer.exists("d")
        assert listed in (None, ["d/a.bin", "d/b.bin", "d/c.bin"])
