"""A SQLite catalog's WAL is checkpointed by a thread of its own, not in commits.

What is observable: the content a commit left in the ``-wal`` file reaches the
database file soon after, with no further call; the thread ends when the
backend closes, and on its own when idle; a forked process checkpoints with a
thread of its own. (That commits no longer copy the WAL back themselves shows
in ``benchmarks/``: ``save_sqlite``.)
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from polystore.backends.sql import SQLBackend, checkpoints

#: More than the WAL a commit leaves to the thread (16 MiB), less than SQLite's
#: own checkpoint in the commit (64 MiB).
ARRAYS = 24
ARRAY_BYTES = 1 << 20


def _threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("polystore-checkpoint")]


def _values(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random(ARRAY_BYTES // 8) for _ in range(ARRAYS)]


def _wait_for(condition, seconds: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return bool(condition())


def test_a_large_commit_reaches_the_database_file_without_another_call(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    values = _values(0)
    backend = SQLBackend(f"sqlite:///{path}", inline_limit=2 * ARRAY_BYTES)
    try:
        backend.save_batch(values, [f"a/{i}.npy" for i in range(ARRAYS)])
        assert _wait_for(lambda: path.stat().st_size >= ARRAYS * ARRAY_BYTES)
        assert len(_threads()) == 1
        loaded = backend.load_batch([f"a/{i}.npy" for i in range(ARRAYS)])
        assert all(np.array_equal(a, b) for a, b in zip(loaded, values, strict=True))
    finally:
        backend.close()
    assert _threads() == []  # close() stops it
    with SQLBackend(f"sqlite:///{path}") as again:
        assert np.array_equal(again.load("a/7.npy"), values[7])
        assert again.fsck(verify=True).ok


def test_the_thread_ends_when_idle_and_the_next_commit_starts_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoints, "IDLE_SECONDS", 0.05)
    path = tmp_path / "c.db"
    with SQLBackend(f"sqlite:///{path}", inline_limit=2 * ARRAY_BYTES) as backend:
        for round_no in range(2):
            backend.save_batch(_values(round_no), [f"r{round_no}/{i}.npy" for i in range(ARRAYS)])
            assert _wait_for(lambda: _threads() == [])  # done, then idle: ended
        size = path.stat().st_size
        assert size >= 2 * ARRAYS * ARRAY_BYTES  # both commits reached the file
        backend.save(b"small", "small.bin")  # a small commit wakes nothing
        assert _threads() == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_process_checkpoints_with_a_thread_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    with SQLBackend(f"sqlite:///{path}", inline_limit=2 * ARRAY_BYTES) as backend:
        backend.save_batch(_values(0), [f"parent/{i}.npy" for i in range(ARRAYS)])
        assert _wait_for(lambda: path.stat().st_size >= ARRAYS * ARRAY_BYTES)
        pid = os.fork()
        if pid == 0:  # the child: the parent's thread is not here
            code = 1
            try:
                backend.save_batch(_values(1), [f"child/{i}.npy" for i in range(ARRAYS)])
                if _wait_for(lambda: path.stat().st_size >= 2 * ARRAYS * ARRAY_BYTES):
                    code = 0 if len(_threads()) == 1 else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert np.array_equal(backend.load("child/3.npy"), _values(1)[3])
        assert backend.fsck(verify=True).ok
