"""How the pipeline talks to the user: notes, warnings and progress bars, all on stderr."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from tqdm import tqdm


class Reporter:
    def __init__(self, *, quiet: bool = False, stream: TextIO | None = None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.notes: list[str] = []
        self.warnings: list[str] = []

    def note(self, message: str) -> None:
        """Something the user should know about the build; also kept for the summary and ``--json``."""
        self.notes.append(message)
        self._print(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self._print(f"warning: {message}")

    def step(self, message: str) -> None:
        self._print(message)

    def progress(self, *, total: int | None, desc: str, unit: str = "B") -> tqdm:
        """A progress bar on the long steps; silent when quiet or when stderr is not a terminal."""
        from tqdm import tqdm  # here: verify and a no-change rebuild never draw one, and start faster without it

        return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024,
                    file=self.stream, leave=False, disable=True if self.quiet else None)

    def _print(self, message: str) -> None:
        if not self.quiet:
            print(message, file=self.stream, flush=True)
