"""Shell completion of catalog paths (bash, zsh, fish through click).

Enable it once per shell (docs/cli.rst)::

    eval "$(_POLYSTORE_COMPLETE=bash_source polystore)"     # ~/.bashrc
    eval "$(_POLYSTORE_COMPLETE=zsh_source polystore)"      # ~/.zshrc
    _POLYSTORE_COMPLETE=fish_source polystore | source      # ~/.config/fish/completions/polystore.fish

Then ``polystore ls pla<TAB>`` asks the catalog (``--url`` on the command
line, else ``POLYSTORE_URL``, else the default) for the entries of the
directory being typed. Completion never creates a catalog and never fails
loudly: when the catalog cannot be read it offers nothing.
"""

from __future__ import annotations

import os
from typing import Any

import click
from click.shell_completion import CompletionItem

from polystore import paths

__all__ = ["complete_catalog_path"]

#: Most names offered at once (a directory of a million files is not listed).
_LIMIT = 1000


def _url(ctx: click.Context) -> str:
    from polystore.cli.app import DEFAULT_URL, State

    state = ctx.find_object(State)
    if state is not None and state.url != DEFAULT_URL:
        return state.url  # --url after the command
    root = ctx.find_root()
    url = root.params.get("url")
    return str(url or os.environ.get("POLYSTORE_URL") or DEFAULT_URL)


def complete_catalog_path(
    ctx: click.Context, _param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """The catalog entries that complete ``incomplete``; directories end with ``/``."""
    try:
        return _complete(_url(ctx), incomplete)
    except Exception:  # noqa: BLE001 -- a completion must never print a traceback
        return []


def _complete(url: str, incomplete: str) -> list[CompletionItem]:
    from polystore.backends.sql.engine import sqlite_file
    from polystore.cli.app import has_polystore_tables

    path = sqlite_file(url)
    if path is not None and not os.path.exists(path):
        return []
    if not has_polystore_tables(url):
        return []
    from polystore.backends.sql import SQLBackend

    parent, _, prefix = incomplete.rpartition("/")
    found: list[Any] = []
    with SQLBackend(url) as backend:
        norm = paths.normalize(parent)
        if not backend.is_dir(norm):
            return []
        for st in backend.scan_dir(norm):
            name = paths.split(st.path)[1]
            if name.startswith(prefix):
                found.append((name, st.kind))
            if len(found) >= _LIMIT:
                break
    head = f"{parent}/" if parent else ""
    return [CompletionItem(head + name + ("/" if kind == "dir" else "")) for name, kind in found]
