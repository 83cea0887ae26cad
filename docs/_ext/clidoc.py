"""A Sphinx directive that documents the ``polystore`` commands from click itself.

``.. polystore-cli::`` renders, for every command and subcommand, its usage
line, its help text and its options, straight from the click objects in
:mod:`polystore.cli`, so the reference cannot drift from the code.

In help texts, a paragraph that click shows verbatim (marked ``\\b``) becomes a
literal block; every other paragraph is reStructuredText.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import click
from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

__all__ = ["command_entries", "render", "setup"]

PROG = "polystore"


def command_entries(
    command: click.Command, parent: click.Context | None = None, name: str = PROG
) -> Iterator[tuple[click.Context, click.Command]]:
    """``(context, command)`` for ``command`` and every subcommand, depth first."""
    ctx = click.Context(command, info_name=name, parent=parent, **command.context_settings)
    yield ctx, command
    if isinstance(command, click.Group):
        for sub_name in sorted(command.commands):
            yield from command_entries(command.commands[sub_name], ctx, sub_name)


def _help_lines(text: str) -> list[str]:
    lines: list[str] = []
    for paragraph in inspect.cleandoc(text).split("\n\n"):
        if paragraph.startswith("\b\n"):
            body = paragraph[2:].splitlines()
            lines += ["::", "", *(f"   {line}" for line in body), ""]
        else:
            lines += [*paragraph.splitlines(), ""]
    return lines


def _param_lines(ctx: click.Context, param: click.Parameter) -> list[str]:
    if isinstance(param, click.Argument):
        return []
    record = param.get_help_record(ctx)
    if record is None:
        return []
    names, help_text = record
    return [f"``{names}``", f"   {help_text or ''}".rstrip(), ""]


def render(command: click.Command) -> list[str]:
    """The reference for ``command`` and its subcommands, as reStructuredText lines."""
    lines: list[str] = []
    for ctx, cmd in command_entries(command):
        title = ctx.command_path
        anchor = "cli-" + "-".join(ctx.command_path.split()[1:]) if ctx.parent else "cli-main"
        lines += [f".. _{anchor}:", "", title, "-" * len(title), ""]
        usage = cmd.collect_usage_pieces(ctx)
        lines += ["::", "", f"   {ctx.command_path} {' '.join(usage)}", ""]
        lines += _help_lines(cmd.help or "")
        options = [line for p in cmd.get_params(ctx) for line in _param_lines(ctx, p)]
        if options:
            lines += ["**Options**", "", *options]
        if isinstance(cmd, click.Group):
            lines += ["**Commands**", ""]
            for sub_name in sorted(cmd.commands):
                sub = cmd.commands[sub_name]
                ref = f"cli-{'-'.join([*ctx.command_path.split()[1:], sub_name])}"
                summary = sub.get_short_help_str(limit=200)
                lines.append(f"* :ref:`{ctx.command_path} {sub_name} <{ref}>` -- {summary}")
            lines.append("")
    return lines


class PolystoreCLIDirective(SphinxDirective):
    """``.. polystore-cli::`` -- the whole command reference."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        from polystore.cli import main

        node = nodes.section()
        node.document = self.state.document
        content = StringList(render(main), source="<polystore-cli>")
        nested_parse_with_titles(self.state, content, node)
        return list(node.children)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("polystore-cli", PolystoreCLIDirective)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
