"""What rich renders, as the plain text a terminal would show (no colour)."""

from __future__ import annotations

import io

from rich.console import Console, RenderableType


def plain_console(width: int = 160) -> Console:
    """A console into memory that is not a terminal: no colour, and no live regions."""
    return Console(file=io.StringIO(), width=width, color_system=None, highlight=False)


def printed(console: Console) -> list[str]:
    """The lines a `plain_console` received, without their trailing padding."""
    assert isinstance(console.file, io.StringIO)
    return [line.rstrip() for line in console.file.getvalue().splitlines()]


def as_text(renderable: RenderableType, width: int = 160) -> str:
    console = plain_console(width)
    console.print(renderable)
    return "\n".join(printed(console))
