"""Sample values and names for the conformance suite, and a value comparison.

Samples are keyed by *kind*; each kind is saved under the extension that every
built-in backend stores it with (:data:`KIND_EXTENSIONS`), so the same samples
work on memory, disk and SQL. Every call returns fresh objects, so a test may
mutate what it gets.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "AWKWARD_NAMES",
    "KIND_EXTENSIONS",
    "assert_values_equal",
    "long_names",
    "samples",
]

#: Value kind -> the extension its samples are saved under.
KIND_EXTENSIONS = {"array": ".npy", "json": ".json", "str": ".txt", "bytes": ".bin"}

#: Names whose characters are special somewhere (SQL LIKE, globs, shells, URLs)
#: and must be ordinary characters in polystore.
AWKWARD_NAMES = (
    "100%",
    "under_score",
    "star*",
    "question?",
    "[brackets]",
    "quote'single",
    'quote"double',
    "with space",
    " leading space",
    "emoji🚀",
    "ünïcödé",
    "日本語",
    "semi;colon",
    "back`tick",
    "dollar$HOME",
    "hash#tag",
    "amp&er",
    "plus+minus-",
    ".hidden",
    "trailing.",
    "UPPER",
)


def long_names(extension: str) -> list[str]:
    """Names of exactly 255 UTF-8 bytes (the limit), ending with ``extension``."""
    room = 255 - len(extension.encode("utf-8"))
    return [
        "x" * room + extension,
        "é" * (room // 2) + "x" * (room % 2) + extension,
        "🚀" * (room // 4) + "y" * (room % 4) + extension,
    ]


def _arrays() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "float64": np.linspace(-1.0, 1.0, 7),
        "float32_2d": np.arange(12, dtype=np.float32).reshape(3, 4) / 3,
        "float16": np.array([0.5, -2.0, 65504.0], dtype=np.float16),
        "nan_inf": np.array([np.nan, np.inf, -np.inf, -0.0]),
        "int8": np.array([-128, 0, 127], dtype=np.int8),
        "int32_3d": np.arange(24, dtype=np.int32).reshape(2, 3, 4),
        "uint16": np.array([0, 1, 65535], dtype=np.uint16),
        "uint64": np.array([0, 2**64 - 1], dtype=np.uint64),
        "bool": np.array([[True, False], [False, True]]),
        "complex128": np.array([1 + 2j, -0.5j]),
        "zero_d": np.array(3.25),
        "empty_2d": np.empty((0, 3), dtype=np.float32),
        "empty_1d": np.array([], dtype=np.int64),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3)),
        "big_endian_f8": np.arange(5, dtype=">f8"),
        "big_endian_i4_2d": np.arange(6, dtype=">i4").reshape(3, 2),
        "non_contiguous": np.arange(20, dtype=np.float64)[::3],
        "random_64x64": rng.standard_normal((64, 64)),
    }


def samples(kind: str) -> dict[str, Any]:
    """Fresh sample values of one kind: ``array``, ``bytes``, ``str`` or ``json``."""
    if kind == "array":
        return _arrays()
    if kind == "bytes":
        return {
            "empty": b"",
            "ascii": b"hello",
            "all_bytes": bytes(range(256)),
            "nul": b"\x00" * 10,
        }
    if kind == "str":
        return {
            "empty": "",
            "ascii": "hello world",
            "unicode": "ünïcödé ✓ 日本 🚀",
            "newlines": "line1\nline2\r\nline3\r",
            "padded": "  padded  ",
        }
    if kind == "json":
        return {
            "dict": {"a": 1, "b": [1, 2.5, None, True, False], "c": {"nested": "x"}},
            "list": [1, "two", {"three": 3}, [4]],
            "empty_dict": {},
            "empty_list": [],
            "unicode": {"ключ": "значение 🚀", "quote\"'": "\\"},
        }
    raise ValueError(f"unknown sample kind {kind!r}; expected one of {sorted(KIND_EXTENSIONS)}")


def assert_values_equal(actual: Any, expected: Any, context: str = "") -> None:
    """Assert ``actual`` is what was saved as ``expected``.

    Arrays must match in type, dtype (byte order included), shape and values
    (NaN equal to NaN), be writeable, and keep Fortran order when ``expected``
    has it. Anything else must have the same type and compare equal.
    """
    where = f" ({context})" if context else ""
    if isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray), f"expected an ndarray, got {type(actual)}{where}"
        assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}{where}"
        assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}{where}"
        nan_aware = expected.dtype.kind in "fc"
        assert np.array_equal(actual, expected, equal_nan=nan_aware), f"values differ{where}"
        assert actual.flags.writeable, f"loaded array is read-only{where}"
        if expected.flags.f_contiguous and not expected.flags.c_contiguous:
            assert actual.flags.f_contiguous, f"Fortran order lost{where}"
        return
    assert type(actual) is type(expected), f"type {type(actual)} != {type(expected)}{where}"
    assert actual == expected, f"{actual!r} != {expected!r}{where}"
