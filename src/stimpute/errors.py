"""User-facing errors: every problem with the user's input names the file and the problem."""

from __future__ import annotations

from os import PathLike


class StimputeError(Exception):
    """An error caused by the user's input or settings, printed as one line by the CLI.

    `source` is the file (or option) at fault; `problem` says what is wrong and, where
    possible, what was expected.
    """

    def __init__(self, source: str | PathLike | None, problem: str):
        self.source = None if source is None else str(source)
        self.problem = problem
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.source}: {self.problem}" if self.source else self.problem


class InputError(StimputeError):
    """A file on disk is missing, unreadable or inconsistent."""
