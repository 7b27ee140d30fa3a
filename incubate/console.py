"""What a job started by a launcher says to the person at `incubate run`: all it prints to standard
output, and its error line. The launcher names a file in INCUBATE_CONSOLE; the job copies those
lines there and the launcher shows the file as it grows (the job's log.txt keeps everything)."""
from __future__ import annotations

import os
import sys

ENV = "INCUBATE_CONSOLE"


class _Copy:
    """Standard output that also appends what is written to the console file, a whole line at a write."""

    def __init__(self, stream, path: str):
        self.stream = stream
        self.file = open(path, "a", buffering=1, encoding="utf-8", errors="replace")   # line-buffered

    def write(self, text: str) -> int:
        self.file.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.file.flush()
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def attach() -> None:
    """Copy this process's standard output to the launcher's console file, when it names one."""
    path = os.environ.get(ENV)
    if path and not isinstance(sys.stdout, _Copy):
        try:
            sys.stdout = _Copy(sys.stdout, path)
        except OSError:
            pass        # the job still runs; its log.txt has every line


def error(line: str) -> None:
    """The job's one error line: on standard error, and in the console file when there is one."""
    print(line, file=sys.stderr)
    path = os.environ.get(ENV)
    if path:
        try:
            with open(path, "a", encoding="utf-8", errors="replace") as f:
                f.write(line + "\n")
        except OSError:
            pass        # it is on standard error, so in log.txt, all the same
