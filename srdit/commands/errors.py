"""The one way a `srdit` command reports bad input: `fail` prints one line `srdit <command>: error: <message>` on
stderr and returns exit code 2. Every command's parser is a `OneLineParser`, whose errors raise `ArgError` instead
of printing argparse's usage dump; the command hands the error to `fail`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

EXIT_USAGE = 2
"Exit code of bad input (argparse's)."
EXIT_FAILURE = 1
"Exit code of a command that failed on good input: a full disk, memory it could not get."


class ArgError(Exception):
    """A command-line problem of command `prog` (e.g. `srdit study plan`), `message` phrased as one line."""

    def __init__(self, prog: str, message: str):
        super().__init__(f"{prog}: {message}")
        self.prog, self.message = prog, message


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an error raises ArgError (one line) instead of printing the usage and exiting."""

    def error(self, message: str):
        raise ArgError(self.prog, message)


def fail(prog: str, message: str, stream=None, code: int = EXIT_USAGE) -> int:
    """Print `<prog>: error: <message>` (prog: `srdit <command>`) on `stream` (default stderr); returns `code`
    (default 2, the exit code of bad input; EXIT_FAILURE for a failure of the machine). The message is one line;
    only a refusal with a list of reasons (the preflight's) adds them below it, one per line."""
    print(f"{prog}: error: {message}", file=stream or sys.stderr, flush=True)
    return code


def os_error_line(e: OSError) -> str:
    """An operating system's error as one line: `<file>: <reason>` (e.g. `RUN/checkpoints/last.pt: no space left
    on device`), the reason alone when the error names no file."""
    reason = e.strerror.lower() if e.strerror else first_line(e)
    return f"{e.filename}: {reason}" if e.filename else reason


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what `fail` prints for an
    error raised below the command (a ValueError, a missing file) whose details would not help the user."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def positive_number(text: str) -> float:
    """argparse `type` of an option that must be a finite number > 0 (a rate, a size): '0', '-1', 'nan', 'inf'
    are refused in the one-line error, not silently replaced by a default."""
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return v


def count(minimum: int) -> Callable[[str], int]:
    """argparse `type` of an integer option with a lower bound (1: a number of things; 0: may be none)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return v

    parse.__name__ = f"integer >= {minimum}"
    return parse
