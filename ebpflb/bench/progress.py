"""A progress bar on stderr: weighted steps, elapsed time, what is being measured now."""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 28


class Progress:
    """`total` units of work; advance() as they are done, say() what is going on.

    On a terminal the bar redraws itself in place; otherwise (a log file, CI) each new
    message is one line, so the log says when each step started."""

    def __init__(self, total: float, stream: TextIO | None = None) -> None:
        self.total = max(total, 1e-9)
        self.done = 0.0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self.message = ""
        self._last_len = 0

    def _line(self) -> str:
        frac = min(self.done / self.total, 1.0)
        filled = int(frac * WIDTH)
        elapsed = int(time.monotonic() - self.started)
        bar = "#" * filled + "-" * (WIDTH - filled)
        return f"[{bar}] {frac * 100:3.0f}% {elapsed // 60:02d}:{elapsed % 60:02d} {self.message}"

    def _draw(self) -> None:
        line = self._line()
        if self.tty:
            pad = max(self._last_len - len(line), 0)
            self.stream.write("\r" + line + " " * pad)
            self._last_len = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def say(self, message: str) -> None:
        self.message = message
        self._draw()

    def advance(self, units: float = 1.0) -> None:
        self.done += units
        if self.tty:
            self._draw()

    def note(self, text: str) -> None:
        """A line of its own above the bar (a warning, a skipped mode)."""
        if self.tty:
            self.stream.write("\r" + " " * self._last_len + "\r")
        self.stream.write(text + "\n")
        self._last_len = 0
        if self.tty:
            self._draw()
        self.stream.flush()

    def close(self) -> None:
        self.done = self.total
        self.message = "done"
        self._draw()
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()
