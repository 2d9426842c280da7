"""Command-line parsing that keeps bad input to one line: every `srdit` sub-command's parser raises `ArgError`
instead of printing argparse's usage dump, and `fail` prints `error: ...` on stderr and returns exit code 2."""

from __future__ import annotations

import argparse
import sys


class ArgError(Exception):
    """A command-line problem, already phrased as one line (`prog: message`)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an error raises ArgError (one line) instead of printing the usage and exiting."""

    def error(self, message: str):
        raise ArgError(f"{self.prog}: {message}")


def fail(msg: str) -> int:
    """Print `error: msg` on stderr; returns 2, the exit code of bad input."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return 2
