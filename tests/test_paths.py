"""Path rules: normalisation, rejection, names kept exactly, glob and extension matching."""

from __future__ import annotations

import tempfile
from pathlib import PurePosixPath

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polystore import DiskBackend, InvalidPathError, MemoryBackend, StorageBackend, paths

# Characters that mean something to SQL LIKE, globs, shells or URLs, plus emoji.
AWKWARD = "%_*?[]'\" !#$&;`~^{}()+=,@🚀é日"

names = st.text(
    alphabet=st.one_of(
        st.sampled_from(AWKWARD),
        st.characters(exclude_characters="/\\\x00", exclude_categories=("Cs",)),
    ),
    min_size=1,
    max_size=40,
).filter(lambda n: n not in (".", "..") and len(n.encode("utf-8")) <= paths.MAX_NAME_BYTES)

# Any text, biased towards the characters the rules care about.
raw_paths = st.text(
    alphabet=st.one_of(st.sampled_from("/./..\\\x00ab%_*[]🚀"), st.characters()), max_size=40
)


def escape_glob(name: str) -> str:
    """A pattern that matches ``name`` literally."""
    return "".join(f"[{ch}]" if ch in "*?[" else ch for ch in name)


def expected_to_be_rejected(path: str) -> bool:
    if "\x00" in path or "\\" in path:
        return True
    for part in path.split("/"):
        if part == "..":
            return True
        try:
            if len(part.encode("utf-8")) > paths.MAX_NAME_BYTES:
                return True
        except UnicodeEncodeError:
            return True
    return False


@given(raw_paths)
def test_normal_form_is_idempotent_and_stays_under_the_root(raw: str) -> None:
    try:
        norm = paths.normalize(raw)
    except InvalidPathError:
        assert expected_to_be_rejected(raw)
        return
    assert not expected_to_be_rejected(raw)
    assert paths.normalize(norm) == norm
    assert not norm.startswith("/")
    assert not norm.endswith("/")
    for part in paths.split_parts(norm):
        assert part not in ("", ".", ".."), norm


@given(st.lists(names, min_size=1, max_size=6))
def test_valid_names_are_kept_exactly(parts: list[str]) -> None:
    joined = "/".join(parts)
    assert paths.normalize(joined) == joined
    assert paths.normalize("/" + "/./".join(parts) + "//") == joined
    assert paths.split_parts(joined) == parts
    parent, name = paths.split(joined)
    assert paths.join(parent, name) == joined
    assert name == parts[-1]


@given(names)
def test_an_escaped_name_is_matched_literally(name: str) -> None:
    assert paths.match_name(name, escape_glob(name), None)
    assert paths.match_name(name, "*", None)


@given(names, st.sampled_from([".npy", ".OME.TIFF", ".roi.zip", "csv"]))
def test_extensions_match_case_insensitively(stem: str, ext: str) -> None:
    normal = paths.normalize_extensions([ext])
    assert normal is not None
    dotted = ext if ext.startswith(".") else "." + ext
    assert paths.match_name(stem + dotted.upper(), None, normal)
    assert paths.match_name(stem + dotted.lower(), None, normal)
    assert not paths.match_name(stem + dotted + ".bak", None, normal)


@pytest.mark.parametrize(
    "bad",
    [
        "..",
        "../x",
        "a/../b",
        "a/b/..",
        "/../etc/passwd",
        "a\x00b",
        "a\\b",
        "..\\x",
        "x" * 256,
        "a/" + "é" * 128,
        "\udc80",
    ],
)
def test_rejected_paths(bad: str) -> None:
    with pytest.raises(InvalidPathError):
        paths.normalize(bad)
    with pytest.raises(InvalidPathError):
        paths.normalize_file(bad)


@pytest.mark.parametrize("not_text", [b"a/b", 3, None, ["a"]])
def test_non_text_is_rejected(not_text: object) -> None:
    with pytest.raises(InvalidPathError, match="must be a str"):
        paths.normalize(not_text)  # type: ignore[arg-type]


@pytest.mark.parametrize("root", ["", "/", ".", "./", "//./"])
def test_root_forms(root: str) -> None:
    assert paths.normalize(root) == paths.ROOT
    with pytest.raises(InvalidPathError, match="needs a name"):
        paths.normalize_file(root)


def test_path_like_and_255_byte_names() -> None:
    assert paths.normalize(PurePosixPath("/a/b/c.npy")) == "a/b/c.npy"
    assert paths.normalize("x" * 255) == "x" * 255
    assert paths.normalize("🚀" * 63) == "🚀" * 63  # 252 bytes
    with pytest.raises(InvalidPathError):
        paths.normalize("🚀" * 64)  # 256 bytes


@pytest.mark.parametrize("ext", ["", ".", "..", 3])
def test_bad_extensions(ext: object) -> None:
    with pytest.raises(InvalidPathError):
        paths.normalize_extensions([ext])  # type: ignore[list-item]


def test_extension_needs_a_stem() -> None:
    exts = paths.normalize_extensions(".npy")
    assert exts == (".npy",)
    assert not paths.match_name(".npy", None, exts)
    assert paths.match_name("a.npy", None, exts)


def _check_names_round_trip(backend: StorageBackend, chosen: list[str]) -> None:
    for i, name in enumerate(chosen):
        backend.save(f"{i}".encode(), f"dir/{name}")
    assert backend.list_dir("dir") == sorted(chosen)
    assert backend.list_files("dir") == sorted(f"dir/{n}" for n in chosen)
    for i, name in enumerate(chosen):
        assert backend.load(f"dir/{name}") == f"{i}".encode()
        assert backend.list_files("dir", pattern=escape_glob(name)) == [f"dir/{name}"]


unique_names = st.lists(
    names.filter(lambda n: not n.startswith(".polystore-tmp-")), min_size=1, max_size=5, unique=True
)


@given(unique_names)
def test_names_round_trip_in_memory(chosen: list[str]) -> None:
    _check_names_round_trip(MemoryBackend(), chosen)


# The disk backend picks a format by extension (case-insensitively): bytes go
# only to names it stores raw.
TYPED_SUFFIXES = (".npy", ".json", ".txt", ".csv", ".tif", ".tiff")
raw_names = st.lists(
    names.filter(
        lambda n: not n.startswith(".polystore-tmp-") and not n.lower().endswith(TYPED_SUFFIXES)
    ),
    min_size=1,
    max_size=5,
    unique=True,
)


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(raw_names)
def test_names_round_trip_on_disk(chosen: list[str]) -> None:
    with tempfile.TemporaryDirectory() as root:
        _check_names_round_trip(DiskBackend(root), chosen)


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("a/b.npy", "a/b.npy"),
        ("a/./b", "a/b"),
        ("./a", "a"),
        ("a/.", "a"),
        ("a//b", "a/b"),
        ("/a/", "a"),
        ("...", "..."),
        (".a/b.", ".a/b."),
        ("a/..b/c", "a/..b/c"),
        ("x" * 255, "x" * 255),
    ],
)
def test_plain_looking_paths_normalize_exactly(raw: str, norm: str) -> None:
    """Paths of plain ASCII names take a shortcut; it must agree with the full rules."""
    assert paths.normalize(raw) == norm


@pytest.mark.parametrize("raw", ["a/../b", "..", "a/..", "x" * 256, "a/b\\c", "a\x00"])
def test_plain_looking_bad_paths_are_refused(raw: str) -> None:
    with pytest.raises(InvalidPathError):
        paths.normalize(raw)


def _assert_batch_agrees_with_each_path(batch: list[str]) -> None:
    try:
        expected = [paths.normalize_file(p) for p in batch]
    except InvalidPathError:
        with pytest.raises(InvalidPathError):
            paths.normalize_files(batch)
    else:
        assert paths.normalize_files(batch) == expected


@given(st.lists(raw_paths, max_size=6))
def test_a_batch_normalizes_like_each_path(raw: list[str]) -> None:
    """``normalize_files`` checks a batch in one match; it must agree path by path."""
    _assert_batch_agrees_with_each_path(raw)


@pytest.mark.parametrize(
    "batch",
    [
        ["x.npy\x00.txt"],  # a NUL must not split one path into two plain ones
        ["a", "b\x00"],
        ["a", ".."],
        ["a", ""],
        ["a", "b/"],  # normalizes; the batch shortcut must not return it as given
        ["a", "/b"],
    ],
)
def test_batch_edge_cases_agree_with_each_path(batch: list[str]) -> None:
    _assert_batch_agrees_with_each_path(batch)
