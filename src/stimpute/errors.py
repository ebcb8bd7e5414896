"""User-facing errors: every problem with the user's input names the file and the problem."""

from __future__ import annotations

import warnings
from os import PathLike, fspath


class StimputeError(Exception):
    """An error caused by the user's input or settings, printed as one line by the CLI.

    `source` is the file (or option) at fault; `problem` says what is wrong and, where
    possible, what was expected. `collect` bundles several problems found in one pass so
    the user sees them all at once, one line each.
    """

    def __init__(self, source: str | PathLike | None, problem: str):
        self.source = None if source is None else str(source)
        self.problem = problem
        self.problems: list[StimputeError] = [self]
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.source}: {self.problem}" if self.source else self.problem

    def lines(self) -> list[str]:
        return [p.line() for p in self.problems]

    @classmethod
    def collect(cls, problems: list["StimputeError"]) -> "StimputeError":
        if len(problems) == 1:
            return problems[0]
        error = cls(problems[0].source, problems[0].problem)
        error.problems = list(problems)
        error.args = ("\n".join(error.lines()),)
        return error


class InputError(StimputeError):
    """A file on disk is missing, unreadable or inconsistent."""


def check_text_path(path: str | PathLike) -> None:
    """Refuse a path whose name is not valid UTF-8 (bytes that Python keeps as surrogates):
    outputs record input paths as text (`.h5ad`, config.yaml), which cannot hold it. Called
    before any work, so no run fails at its end; the error shows the bytes escaped."""
    text = fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise StimputeError(shown, "the path is not valid UTF-8 text, which outputs record paths as: rename it") from None


class StimputeWarning(UserWarning):
    """Something in the input was fixed and recorded in the section's report; the CLI
    prints it as one line."""


def warn_default(source: str | PathLike, what: str, value: float, option: str) -> None:
    """The one warning line printed when a geometry default is used."""
    warnings.warn(f"{source}: {what} not found in its metadata; using {value:g} ({option})", StimputeWarning, stacklevel=4)
