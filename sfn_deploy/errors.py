"""Errors a user can act on. The CLI prints them as one line and exits with code 2."""
from __future__ import annotations


class UserError(Exception):
    """Bad input: unreadable file, wrong shapes, unsupported layer, invalid option."""


class UnsupportedOpsError(UserError):
    """The model uses operations the converter cannot map; lists every one of them at once."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(f"{len(problems)} unsupported operation(s): " + "; ".join(problems))
