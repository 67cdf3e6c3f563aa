"""The rich consoles of the `bus` command and the bench: a terminal's width, and no width at all elsewhere."""
from __future__ import annotations

from typing import Any

from rich.console import Console, ConsoleDimensions

#: the width of output that is not a terminal: wide enough that no table is cut, no line wrapped
UNBOUNDED = 1_000_000


class BusConsole(Console):
    """A rich Console that lays output out to a terminal's width, and does not cut or wrap anything else.

    rich gives a console that is not a terminal (a pipe, a file, a test's capture) 80
    columns: a table piped to grep or saved to a file had its names folded. Output that is
    not a terminal is as wide as its longest line instead, unless COLUMNS is set (the
    operator asked for that width). The check is made at each print, on the stream of the
    moment.
    """

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        if self.is_terminal or self._width is not None or self._environ.get("COLUMNS", "").isdigit():
            return size
        return ConsoleDimensions(UNBOUNDED, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)


def make_console(**options: Any) -> Console:
    """The console `bus` commands and the bench print with (stderr=True for errors and progress)."""
    return BusConsole(**options)
