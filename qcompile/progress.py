"""A progress bar on stderr shared by the CLI, calibration and prepare(): a one-line bar on a terminal, one
line per step otherwise (logs, CI)."""
from __future__ import annotations

import sys
import time


class Progress:
    """A one-line bar on a terminal; one line per step otherwise (logs, CI)."""

    def __init__(self, total: int, stream=None, width: int = 28):
        self.total, self.done, self.width = total, 0, width
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self._last_status = 0.0

    def show(self, label: str) -> None:
        filled = self.width * self.done // max(self.total, 1)
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {label}"
        self.stream.write(f"\r\x1b[2K{line}" if self.tty else line + "\n")
        self.stream.flush()

    def advance(self, label: str = "") -> None:
        self.done += 1
        self.show(label)

    def status(self, label: str) -> None:
        """A message between steps: in place on a terminal, at most one line per 5 s otherwise."""
        now = time.monotonic()
        if self.tty or now - self._last_status > 5:
            self._last_status = now
            self.show(label)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
