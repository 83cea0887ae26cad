"""Peak memory of saving and loading one large array through the local blob store.

    .venv/bin/python benchmarks/blob_memory.py              # a 1 GiB array
    .venv/bin/python benchmarks/blob_memory.py --gib 0.25

Each measurement runs in a fresh subprocess and reads the process's peak
resident set size with ``resource.getrusage`` before and after the operation:

* save: the array exists first (that is the baseline), then ``save()`` hashes it
  and streams it to the store in 8 MiB slices of the array's own buffer;
* load: the baseline is taken before ``load()``, which reads the object into one
  new buffer (hashing it on the way) that becomes the returned array's memory.

"One copy" means: saving adds nothing to the array the caller already holds,
and loading costs the array itself and nothing more.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    import numpy as np
    from polystore import SQLBackend

    def peak():  # bytes; ru_maxrss is in KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    url, options, mode, size = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    backend = SQLBackend(url, **options)
    backend.save(np.zeros(1 << 16), "warm.npy")  # imports and caches, not content
    backend.load("warm.npy")
    if mode == "save":
        array = np.ones(size, dtype=np.uint8)  # every page touched: part of the baseline
        array[:: 1 << 20] = 7
        before = peak()
        start = time.perf_counter()
        backend.save(array, "big.npy")
    else:
        before = peak()
        start = time.perf_counter()
        array = backend.load("big.npy")
        assert array.nbytes == size and array[1 << 20] == 7 and array[1] == 1
    seconds = time.perf_counter() - start
    print(json.dumps({"before": before, "after": peak(), "seconds": seconds}))
    """
)


def measure(url: str, store: str, mode: str, size: int) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, url, json.dumps({"blob_store": store}), mode, str(size)],
        check=True,
        capture_output=True,
        text=True,
    )
    data: dict[str, float] = json.loads(result.stdout)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="array size in GiB")
    parser.add_argument("--workdir", help="where the catalog and the store go")
    args = parser.parse_args(argv)
    size = int(args.gib * (1 << 30))
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        url = f"sqlite:///{tmp}/catalog.db"
        store = f"file://{Path(tmp) / 'blobs'}"
        print(
            "| operation | array | peak RSS before | peak RSS after | growth | growth / array "
            "| time | throughput |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for mode in ("save", "load"):
            m = measure(url, store, mode, size)
            growth = m["after"] - m["before"]
            print(
                f"| {mode} | {size / (1 << 20):.0f} MiB | {m['before'] / (1 << 20):.0f} MiB "
                f"| {m['after'] / (1 << 20):.0f} MiB | {growth / (1 << 20):.0f} MiB "
                f"| {growth / size:.2f} | {m['seconds']:.2f} s "
                f"| {size / m['seconds'] / 1e6:.0f} MB/s |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
