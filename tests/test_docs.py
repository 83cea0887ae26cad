"""The documentation is tested: its Python examples run, its CLI reference is complete.

Every ``.. code-block:: python`` in ``docs/`` runs. The blocks of one page run
in order, in one namespace, in a fresh temporary working directory, on SQLite
only; each page with Python blocks is its own test. Two conventions, both
invisible in the rendered page:

* A block whose ``:caption:`` is a file name ending in ``.py`` is what the
  reader saves as that file: it is written to the working directory (later
  blocks may import it) instead of being run. A ``test_*.py`` file is then run
  with pytest, as the reader would.
* A block right after the comment ``.. test: skip`` does not run. Keep that for
  examples that need a server (PostgreSQL, S3) -- it is rare on purpose.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from polystore.backends import base
from polystore.cli import main

DOCS = Path(__file__).resolve().parents[1] / "docs"
SKIP_MARK = ".. test: skip"
_DIRECTIVE = re.compile(r"^(?P<indent> *)\.\. code-block:: *(?P<language>\S+) *$")


@dataclass(frozen=True)
class Block:
    line: int
    language: str
    code: str
    caption: str | None
    skip: bool


def code_blocks(text: str) -> list[Block]:
    """Every ``.. code-block::`` of a page, with its caption and skip mark."""
    lines = text.splitlines()
    blocks = []
    for number, line in enumerate(lines):
        match = _DIRECTIVE.match(line)
        if match is None:
            continue
        indent = len(match["indent"])
        previous = next((p.strip() for p in reversed(lines[:number]) if p.strip()), "")
        options: dict[str, str] = {}
        i = number + 1
        while i < len(lines) and lines[i].strip().startswith(":"):
            key, _, value = lines[i].strip()[1:].partition(":")
            options[key] = value.strip()
            i += 1
        body = []
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip(" ")) > indent
        ):
            body.append(lines[i])
            i += 1
        blocks.append(
            Block(
                line=number + 1,
                language=match["language"],
                code=textwrap.dedent("\n".join(body)).strip("\n") + "\n",
                caption=options.get("caption"),
                skip=previous == SKIP_MARK,
            )
        )
    return blocks


def doc_pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.rst") if "_build" not in p.parts)


def python_pages() -> list[Path]:
    return [
        page
        for page in doc_pages()
        if any(b.language == "python" for b in code_blocks(page.read_text("utf-8")))
    ]


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A working directory of its own, SQLite defaults, and a clean class registry."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("POLYSTORE_URL", "POLYSTORE_BLOB_STORE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    classes = dict(base._BACKEND_CLASSES)
    modules = set(sys.modules)
    yield tmp_path
    # Examples register backend classes and import modules they wrote: forget both.
    base._BACKEND_CLASSES.clear()
    base._BACKEND_CLASSES.update(classes)
    for name in set(sys.modules) - modules:
        module_file = getattr(sys.modules[name], "__file__", None) or ""
        if module_file.startswith(str(tmp_path)):
            del sys.modules[name]


@pytest.mark.parametrize("page", python_pages(), ids=lambda p: p.relative_to(DOCS).as_posix())
def test_python_examples_run(page: Path, sandbox: Path) -> None:
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    for block in code_blocks(page.read_text("utf-8")):
        if block.language != "python" or block.skip:
            continue
        where = f"{page.relative_to(DOCS)}:{block.line}"
        if block.caption and block.caption.endswith(".py"):
            target = sandbox / block.caption
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.code, encoding="utf-8")
            if target.name.startswith("test_"):
                _run_pytest(target, where)
            continue
        exec(compile(block.code, where, "exec"), namespace)  # noqa: S102 -- the docs' own code


def _run_pytest(test_file: Path, where: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error",
         test_file.name],
        cwd=test_file.parent, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"{where}: pytest failed\n{result.stdout}\n{result.stderr}"


def test_skip_marks_are_rare() -> None:
    blocks = [b for page in doc_pages() for b in code_blocks(page.read_text("utf-8"))]
    python = [b for b in blocks if b.language == "python"]
    skipped = [b for b in python if b.skip]
    assert len(python) >= 30
    assert len(skipped) <= len(python) // 6, "most examples must run"


def test_the_block_parser() -> None:
    page = textwrap.dedent(
        """\
        Text.

        .. code-block:: python
           :caption: mod.py

           def f():
               return 1

           x = f()

        .. test: skip

        .. code-block:: python

           server_only()

        Done.
        """
    )
    first, second = code_blocks(page)
    assert first.caption == "mod.py" and not first.skip
    assert first.code == "def f():\n    return 1\n\nx = f()\n"
    assert second.skip and second.code == "server_only()\n"


# -- the CLI reference --------------------------------------------------------------------


def all_commands(group: click.Group = main, prefix: tuple[str, ...] = ()) -> list[str]:
    found = []
    for name, command in sorted(group.commands.items()):
        found.append(" ".join((*prefix, name)))
        if isinstance(command, click.Group):
            found += all_commands(command, (*prefix, name))
    return found


@pytest.fixture(scope="module")
def clidoc() -> object:
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        import clidoc
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    return clidoc


@pytest.mark.parametrize("command", all_commands())
def test_every_command_has_help_and_a_reference_entry(command: str, clidoc: object) -> None:
    from click.testing import CliRunner

    result = CliRunner().invoke(main, [*command.split(), "--help"], catch_exceptions=False)
    assert result.exit_code == 0
    assert result.stdout.startswith(f"Usage: polystore {command}")
    reference = "\n".join(clidoc.render(main))  # type: ignore[attr-defined]
    title = f"polystore {command}"
    assert f"\n{title}\n{'-' * len(title)}\n" in reference
    assert ".. polystore-cli::" in (DOCS / "cli.rst").read_text("utf-8")


@pytest.mark.parametrize("command", all_commands())
def test_every_command_is_shown_in_the_guides(command: str) -> None:
    """Beyond the generated reference, the guides show each command in use."""
    guides = "\n".join(page.read_text("utf-8") for page in doc_pages() if page.name != "cli.rst")
    assert f"polystore {command}" in guides


# -- the README ----------------------------------------------------------------------------

README = DOCS.parent / "README.md"


def test_readme_python_runs(sandbox: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text("utf-8"), re.DOTALL)
    assert blocks
    namespace: dict[str, object] = {"__name__": "readme"}
    for number, code in enumerate(blocks):
        exec(compile(code, f"README.md[python block {number}]", "exec"), namespace)  # noqa: S102


def test_readme_starts_with_make_demo_and_make_test() -> None:
    first_block = re.search(r"```bash\n(.*?)```", README.read_text("utf-8"), re.DOTALL)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block[1].splitlines()]
    assert commands[:2] == ["make demo", "make test"]
