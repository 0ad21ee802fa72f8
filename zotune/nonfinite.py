"""Counting non-finite steps: a step whose losses are not all finite is skipped (nothing is
applied); too many of them in a row stop the run with an error that says what to lower."""

from __future__ import annotations

from zotune.errors import UserError


class NonFiniteLossError(UserError):
    """Training produced non-finite losses for too many steps in a row (the CLI prints it, no traceback)."""


class NonFiniteSteps:
    """The non-finite steps of a run: all of them (`total`, logged) and the current run of them
    (`in_a_row`), which may not reach `limit` (the setting `max_nonfinite`)."""

    def __init__(self, limit: int, advice: str):
        self.limit, self.advice = limit, advice  # what the error tells the user to do
        self.total = self.in_a_row = 0

    def count(self, step: int, finite: bool) -> None:
        """Count optimizer step `step`; raise `NonFiniteLossError` at the limit."""
        if finite:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise NonFiniteLossError(f"{self.in_a_row} steps in a row had non-finite losses (last at step {step}); "
                                     f"{self.advice}")
