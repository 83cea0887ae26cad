"""Crash safety and gc under fire, with real processes, on SQLite and PostgreSQL.

* A writer killed with SIGKILL in the middle of a batch (some objects uploaded,
  one half-written, nothing committed) leaves only upload intents behind, which
  ``gc()`` turns into a clean store: ``fsck()`` finds nothing, every committed
  file loads.
* A writer killed while it stages large content (half of it written to the
  store's ``incoming/``, before its hash is known) leaves that file, which
  ``fsck()`` counts as pending and ``gc()`` sweeps after the grace period.
* ``gc()`` running in a loop while another process saves, overwrites, copies
  and deletes the same few contents (so reference counts keep touching zero)
  never deletes a blob a file refers to, with content uploaded after hashing
  and with content staged while hashed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from polystore.backends.sql import SQLBackend
from polystore.blobs import LocalBlobStore, hash_key

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")

# The pieces of an upload, cut off half-way through the first: the child
# prints "stalled" there and waits to be killed.
_HALF_THEN_STALL = textwrap.dedent(
    """
    import time

    def half_then_stall(pieces):
        for chunk in pieces:
            view = memoryview(chunk)
            yield view[: view.nbytes // 2]
            print("stalled", flush=True)
            time.sleep(60)
            yield view[view.nbytes // 2 :]
    """
)

_WRITER = _HALF_THEN_STALL + textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from polystore import SQLBackend
    from polystore.blobs import LocalBlobStore

    class Stalling(LocalBlobStore):
        # Announces each upload; the 36th stops half-way, for the parent to kill.
        uploads = 0

        def put(self, content_hash, chunks, size, *, token=None):
            Stalling.uploads += 1
            if Stalling.uploads == 36:
                chunks = half_then_stall(chunks)
            return super().put(content_hash, chunks, size, token=token)

    url, root = sys.argv[1], sys.argv[2]
    backend = SQLBackend(url, blob_store=Stalling(root), inline_limit=1024)
    for batch in range(100):
        values = [np.full(1000, batch * 100 + i, dtype=np.int64) for i in range(10)]
        backend.save_batch(values, [f"batch{batch}/f{i}.npy" for i in range(10)])
        print(f"committed {batch}", flush=True)
    """
)


def _kill_when_stalled(script: str, catalog_url: str, root: Path) -> list[str]:
    """Run ``script``, SIGKILL it once it prints ``stalled``; the lines it printed."""
    writer = subprocess.Popen(
        [sys.executable, "-c", script, catalog_url, str(root)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None
    lines = []
    try:
        for line in writer.stdout:
            lines.append(line.strip())
            if line.strip() == "stalled":
                break
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.kill()
        writer.communicate(timeout=30)
    return lines


def test_sigkill_mid_batch_then_gc_leaves_a_clean_catalog(catalog_url: str, tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    lines = _kill_when_stalled(_WRITER, catalog_url, root)
    # Batches 0-2 committed; batch 3 had 5 uploads done and a 6th half-written.
    assert lines == ["committed 0", "committed 1", "committed 2", "stalled"]
    store = LocalBlobStore(root)
    with SQLBackend(catalog_url, blob_store=store, inline_limit=1024) as backend:
        assert not backend.exists("batch3")
        leftovers = list(store.scan())
        assert len([o for o in leftovers if o.token is None]) == 30 + 5
        assert len([o for o in leftovers if o.token is not None]) == 1  # the half-written one
        before = backend.fsck()
        assert before.ok and before.pending_uploads == 10  # accounted for, not yet collected

        assert backend.gc().intents_expired == 0  # too young to call abandoned
        report = backend.gc(grace=0)
        assert (report.intents_expired, report.objects_deleted) == (10, 5)

        after = backend.fsck(verify=True)
        assert after.ok and after.pending_uploads == 0, str(after)
        assert after.objects_checked == 30
        for batch in range(3):
            loaded = backend.load_batch([f"batch{batch}/f{i}.npy" for i in range(10)])
            for i, array in enumerate(loaded):
                np.testing.assert_array_equal(array, np.full(1000, batch * 100 + i, np.int64))


_STAGER = _HALF_THEN_STALL + textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from polystore import SQLBackend
    from polystore.backends.sql import staging
    from polystore.blobs import LocalBlobStore

    staging.STAGE_OVER = 64 << 10

    class Stalling(LocalBlobStore):
        # The third staged content stops half-way, for the parent to kill.
        staged = 0

        def stage(self, chunks, size):
            Stalling.staged += 1
            if Stalling.staged == 3:
                chunks = half_then_stall(chunks)
            return super().stage(chunks, size)

    url, root = sys.argv[1], sys.argv[2]
    backend = SQLBackend(url, blob_store=Stalling(root), inline_limit=1024)
    for i in range(10):
        backend.save(np.full(20_000, i, dtype=np.int64), f"big{i}.npy")
        print(f"committed {i}", flush=True)
    """
)


def test_sigkill_while_staging_then_gc_leaves_a_clean_catalog(
    catalog_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "blobs"
    lines = _kill_when_stalled(_STAGER, catalog_url, root)
    assert lines == ["committed 0", "committed 1", "stalled"]
    store = LocalBlobStore(root)
    with SQLBackend(catalog_url, blob_store=store, inline_limit=1024) as backend:
        assert backend.list_dir("") == ["big0.npy", "big1.npy"]
        staged = [o for o in store.scan() if o.staged]
        assert len(staged) == 1 and staged[0].size == 20_000 * 8 // 2  # half-written
        before = backend.fsck()
        assert before.ok and before.pending_uploads == 1  # accounted for, not yet collected
        assert backend.gc().objects_deleted == 0  # too young to call abandoned
        assert backend.gc(grace=0).objects_deleted == 1
        after = backend.fsck(verify=True)
        assert after.ok and after.pending_uploads == 0, str(after)
        assert not [o for o in store.scan() if o.staged]
        for i in range(2):
            np.testing.assert_array_equal(
                backend.load(f"big{i}.npy"), np.full(20_000, i, dtype=np.int64)
            )


_CHURN = textwrap.dedent(
    """
    import json, random, sys, time
    import numpy as np
    from polystore import SQLBackend
    from polystore.backends.sql import staging

    url, root, seconds, size = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    staging.STAGE_OVER = 64 << 10  # content over it is staged while hashed

    def content(k):
        return np.random.default_rng(k).integers(0, 256, size, dtype=np.uint8).tobytes()

    backend = SQLBackend(url, blob_store=f"file://{root}", inline_limit=1024)
    rng = random.Random(0)
    state = {}  # path -> content number
    paths = [f"d{i % 2}/f{i}.bin" for i in range(6)]
    deadline = time.monotonic() + seconds
    ops = 0
    while time.monotonic() < deadline or ops < 50:
        ops += 1
        path = rng.choice(paths)
        op = rng.random()
        if op < 0.5:
            k = rng.randrange(4)  # few contents: references keep dropping to zero
            backend.save(content(k), path)
            state[path] = k
        elif op < 0.7 and path in state:
            backend.delete(path)
            del state[path]
        elif op < 0.85 and path in state:
            other = rng.choice(paths)
            if other != path:
                if other in state:
                    backend.delete(other)
                backend.copy(path, other)
                state[other] = state[path]
        elif state:
            batch = {p: rng.randrange(4) for p in rng.sample(paths, 3)}
            backend.save_batch([content(k) for k in batch.values()], list(batch))
            state.update(batch)
        # Everything this process believes is stored must load, right now.
        for p, k in state.items():
            assert backend.load(p) == content(k), p
    print(json.dumps({"state": state, "ops": ops}))
    """
)


def _content(k: int, size: int) -> bytes:
    return np.random.default_rng(k).integers(0, 256, size, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("size", [2048, 100 << 10], ids=["uploaded", "staged"])
def test_gc_never_deletes_what_a_concurrent_writer_references(
    catalog_url: str, tmp_path: Path, size: int
) -> None:
    root = tmp_path / "blobs"
    with SQLBackend(catalog_url, blob_store=f"file://{root}", inline_limit=1024) as backend:
        backend.save(b"warm up the schema", "warm.bin")
        writer = subprocess.Popen(
            [sys.executable, "-c", _CHURN, catalog_url, str(root), "2.5", str(size)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        collected = runs = 0
        while writer.poll() is None:
            collected += backend.gc(grace=1).blobs_deleted
            runs += 1
            time.sleep(0.005)
        out, err = writer.communicate()
        assert writer.returncode == 0, err
        assert runs > 10 and collected > 0  # gc really did work while the writer ran
        state = json.loads(out)["state"]
        for path, k in state.items():
            assert backend.load(path) == _content(k, size)
        backend.gc(grace=0)
        report = backend.fsck(verify=True)
        assert report.ok and report.pending_uploads == 0, str(report)
        live = {hash_key(backend.stat(p).hash or "") for p in state}
        assert {o.key for o in LocalBlobStore(root).scan()} == live
